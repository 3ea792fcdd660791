"""`labelfactory train-segmentation`: a 2D segmenter on synthetic pairs, real labelled studies, or both (hybrid)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from labelfactory import distributed
from labelfactory.devices import add_device_argument, resolve_device
from labelfactory.io import Window
from labelfactory.io.dataset import find_studies
from labelfactory.jsonio import write_json_atomic
from labelfactory.labels import label_map
from labelfactory.options import add_arguments, add_config_argument, exposed, from_args
from labelfactory.segmentation.data import training_sets, unlabelled_record, unlabelled_slices
from labelfactory.segmentation.train import SegmentationConfig, train_segmenter

FLAGS = exposed(SegmentationConfig, "cli")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--synthetic", type=Path, help="synthetic data set folder (images/, labels/), from labelfactory synthesize"
    )
    p.add_argument(
        "--studies",
        type=Path,
        help="real studies with labels/final (a folder, or a JSON datalist): real training slices and validation Dice",
    )
    p.add_argument(
        "--real",
        default=None,
        help="real slices to train on: 'all' (default without --synthetic), 0 (default with it), or a number (hybrid)",
    )
    p.add_argument(
        "--val-patients",
        type=int,
        default=1,
        help="real patients held out for validation Dice when real slices are trained on (default 1)",
    )
    p.add_argument(
        "--unlabelled",
        type=Path,
        default=None,
        help="studies without labels (a folder, or a JSON datalist) for the Mean Teacher (--consistency > 0)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="model file to write (e.g. apps/labelfactory/model/segmentation.pt)"
    )
    d = SegmentationConfig()
    add_config_argument(p)
    add_arguments(p, d, FLAGS)
    p.add_argument("--log-dir", type=Path, default=None, help="TensorBoard folder (default: <out>.logs)")
    p.add_argument(
        "--label-map",
        default="totalsegmentator",
        help="the labels' map (labelfactory.labels: totalsegmentator, openkbp), recorded in the model",
    )
    p.add_argument("--summary", type=Path, default=None, help="also write the JSON summary to this file")
    add_device_argument(p)


def run(args: argparse.Namespace) -> int:
    """Train, write the best model to --out, print a JSON summary. Under torchrun, one process per device."""
    with distributed.process_group_cleanup():
        real = args.real if args.real is not None else ("0" if args.synthetic else "all")
        k_real = None if real == "all" else int(real)
        config = from_args(SegmentationConfig(label_names=label_map(args.label_map).values), args, FLAGS)
        train, real, val, info = training_sets(
            args.studies,
            args.synthetic,
            k_real,
            args.val_patients,
            config.size,
            config.label_names,
            Window(*config.window),
            config.slicing,
        )
        unlabelled = None
        if config.consistency > 0 and args.unlabelled is not None:
            window = Window(*config.window)
            unlabelled = unlabelled_slices(find_studies(args.unlabelled), config.size, window, config.slicing)
            info |= unlabelled_record(unlabelled)
        result = train_segmenter(
            train,
            val,
            config,
            out=args.out,
            log_dir=args.log_dir or args.out.with_suffix(".logs"),
            data=info,
            real_set=real,
            device=resolve_device(args.device),
            unlabelled_set=unlabelled,
        )
        if distributed.is_main():
            summary = {
                "model": str(result.path),
                "network": config.network,
                "best_val_dice": result.best_val_dice,
                "best_step": result.best_step,
                "steps": result.steps,
                "history": result.history,
                "data": info,
            }
            print(json.dumps(summary, indent=2))
            if args.summary is not None:
                write_json_atomic(summary, args.summary)
    return 0
