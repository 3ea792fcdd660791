"""`labelfactory train-clamnet`: train the ClamNet pair on a folder of studies with image-level labels."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from labelfactory import distributed
from labelfactory.checkout import SAMPLE_STUDIES, checkout_default
from labelfactory.clamnet.data import load_weak_slices
from labelfactory.clamnet.image_labels import ImageLabel
from labelfactory.clamnet.train import MODEL_FILE, ClamNetConfig, fit_clamnet
from labelfactory.devices import add_device_argument
from labelfactory.jsonio import read_json, write_json_atomic
from labelfactory.options import add_arguments, add_config_argument, exposed, from_args

FLAGS = exposed(ClamNetConfig, "cli")


def configure(parser: argparse.ArgumentParser) -> None:
    d = ClamNetConfig()
    parser.add_argument(
        "--studies",
        type=Path,
        help=f"folder of studies (MONAI Label datastore layout); default in a checkout: {SAMPLE_STUDIES}",
    )
    parser.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="image-level labels CSV (default: image_labels.csv in or beside the studies)",
    )
    parser.add_argument(
        "--organ-dir",
        type=Path,
        action="append",
        default=None,
        help="folder of <study>/mask_<organ>.nii.gz (repeatable; default: 'reference' in or beside the studies)",
    )
    parser.add_argument(
        "--image-labels",
        type=Path,
        default=None,
        help="JSON list of image-level label rows {image, slice, abnormal, eta} that win over the CSV's "
        "(the datastore's, as the server's multi_gpu launch writes them)",
    )
    parser.add_argument("--out", type=Path, default=Path(MODEL_FILE), help="checkpoint to write")
    add_config_argument(parser)
    add_arguments(parser, d, FLAGS)
    parser.add_argument(
        "--features",
        type=int,
        nargs=6,
        default=None,
        help=f"BasicUNetPlusPlus widths (6 numbers; default {d.features})",
    )
    parser.add_argument("--summary", type=Path, default=None, help="also write the JSON summary to this file (rank 0)")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Train, write --out, print a JSON summary. Under torchrun, each process trains on its share of every batch."""
    with distributed.process_group_cleanup():
        cfg = from_args(ClamNetConfig(), args, FLAGS)
        cfg = replace(cfg, features=tuple(args.features) if args.features else cfg.features)
        studies = args.studies or checkout_default(SAMPLE_STUDIES, "--studies")
        rows = [ImageLabel(**r) for r in read_json(args.image_labels, [])] if args.image_labels else None
        slices = load_weak_slices(
            studies, args.labels, cfg.organ, args.organ_dir, None, cfg.size, cfg.margin_mm, cfg.ct_window, cfg.eta, rows
        )
        fit = fit_clamnet(slices, cfg, out=args.out, device=args.device)
        if distributed.is_main():
            summary = {"model": str(args.out), "steps": cfg.steps, "loss_first": fit.history[0]}
            summary |= {"loss_last": fit.history[-1], **fit.data}
            print(json.dumps(summary))
            if args.summary is not None:
                write_json_atomic(summary, args.summary)
    return 0
