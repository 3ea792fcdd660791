"""`labelfactory evaluate`: the paper's segmentation experiments on given data sets -> JSON, markdown, PNG plots."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from labelfactory.checkout import SAMPLE_STUDIES, checkout_default
from labelfactory.devices import add_device_argument
from labelfactory.errors import LabelFactoryError
from labelfactory.evaluation.experiments import PAPER_SEGMENTERS, TABLES, Settings, run_experiments, synthetic_fid
from labelfactory.evaluation.report import write_report
from labelfactory.options import add_arguments, from_args
from labelfactory.segmentation.cli import FLAGS as SEGMENTER_FLAGS
from labelfactory.segmentation.data import real_slices, synthetic_pairs
from labelfactory.segmentation.networks import NETWORKS
from labelfactory.segmentation.train import SegmentationConfig

logger = logging.getLogger(__name__)
FLAGS = tuple(f for f in SEGMENTER_FLAGS if f != "network")  # --baseline and --networks choose networks here


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--studies",
        type=Path,
        help=f"real studies with labels/final (test-R, real and hybrid training); checkout default: {SAMPLE_STUDIES}",
    )
    p.add_argument(
        "--synthetic", type=Path, help="synthetic data set folder (images/, labels/) for tables I, III-C and III"
    )
    p.add_argument(
        "--annotated",
        action="append",
        default=[],
        metavar="K=DIR",
        help="table II: synthetic data set made by an interpreter trained on K annotated images (repeat per K)",
    )
    p.add_argument(
        "--tables", default=None, help=f"comma list of {', '.join(TABLES)} (default: every table its data allows)"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="folder for results.json, results.md, table_*.png and TensorBoard logs"
    )
    add_arguments(
        p,
        Settings(),
        ("folds", "test_size"),
        helps={"folds": "patient-wise folds", "test_size": "most pairs in test-G and test-R per fold"},
    )
    p.add_argument(
        "--sizes",
        default=None,
        help="table I: comma list of synthetic training set sizes (default: 1/4, 1/2, all of the pool)",
    )
    p.add_argument(
        "--train-pairs",
        type=int,
        default=None,
        help="synthetic training pairs for tables II, III-C, III (default: the whole pool)",
    )
    p.add_argument(
        "--k-real", type=int, default=30, help="real slices added to the synthetic pairs in the hybrid set (default 30)"
    )
    p.add_argument(
        "--baseline",
        default=Settings().baseline,
        choices=NETWORKS,
        help=f"segmenter of tables I, II, III-C (default {Settings().baseline}, as the paper)",
    )
    p.add_argument("--networks", default=",".join(PAPER_SEGMENTERS), help="table III: comma list of segmenters")
    add_arguments(
        p, SegmentationConfig(), FLAGS, helps={"size": "slice size in pixels", "steps": "training iterations per run"}
    )
    p.add_argument(
        "--fid-weights",
        default=None,
        help="pytorch-fid Inception weights file (FID of the synthetic set is skipped without it)",
    )
    p.add_argument("--fid-images", type=int, default=1000, help="images per side for FID (default 1000; 0 skips FID)")
    p.add_argument(
        "--note", default="", help="a line to put at the top of results.md (e.g. the machine and what was reduced)"
    )
    add_device_argument(p)


def run(args: argparse.Namespace) -> int:
    synthetic = synthetic_pairs(args.synthetic, args.size) if args.synthetic else None
    by_k, folders = {}, {}
    for item in args.annotated:
        k, sep, folder = item.partition("=")
        if not sep or not k.isdigit():
            raise LabelFactoryError(f"--annotated {item!r}: expected K=DIR, e.g. 30=synthetic-k30")
        by_k[int(k)], folders[int(k)] = synthetic_pairs(folder, args.size), folder
    tables = (
        args.tables.split(",")
        if args.tables
        else [t for t in TABLES if (t == "II" and by_k) or (t != "II" and synthetic is not None)]
    )
    if not tables:
        raise LabelFactoryError("nothing to evaluate: pass --synthetic DIR and/or --annotated K=DIR")
    studies = args.studies or checkout_default(SAMPLE_STUDIES, "--studies")
    real = real_slices(studies, args.size)
    train = from_args(SegmentationConfig(), args, FLAGS)
    settings = from_args(
        Settings(baseline=args.baseline, log_dir=args.out / "tensorboard", train=train, device=args.device),
        args,
        ("folds", "test_size"),
    )
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    results = run_experiments(
        real, settings, synthetic, by_k, tables, sizes, args.k_real, args.networks.split(","), args.train_pairs
    )
    results["fid"] = (
        synthetic_fid(synthetic, real, args.fid_weights, args.fid_images)
        if synthetic is not None and args.fid_images > 0
        else None
    )
    results["note"] = args.note
    results["data"].update(
        studies=str(studies), synthetic=str(args.synthetic) if args.synthetic else None, annotated=folders
    )
    for what, path in write_report(results, args.out).items():
        print(f"{what}: {path}")
    return 0
