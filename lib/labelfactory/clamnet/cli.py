"""`labelfactory train-clamnet`: train the ClamNet pair on a folder of studies with image-level labels."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from labelfactory.checkout import SAMPLE_STUDIES, checkout_default
from labelfactory.clamnet.data import load_weak_slices
from labelfactory.clamnet.train import MODEL_FILE, ClamNetConfig, fit_clamnet
from labelfactory.devices import add_device_argument
from labelfactory.options import add_arguments, exposed, from_args

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
    parser.add_argument("--out", type=Path, default=Path(MODEL_FILE), help="checkpoint to write")
    add_arguments(parser, d, FLAGS)
    parser.add_argument(
        "--features", type=int, nargs=6, default=list(d.features), help="BasicUNetPlusPlus widths (6 numbers)"
    )
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    cfg = replace(from_args(ClamNetConfig(), args, FLAGS), features=tuple(args.features))
    studies = args.studies or checkout_default(SAMPLE_STUDIES, "--studies")
    slices = load_weak_slices(
        studies, args.labels, cfg.organ, args.organ_dir, None, cfg.size, cfg.margin_mm, cfg.ct_window, cfg.eta
    )
    fit = fit_clamnet(slices, cfg, out=args.out, device=args.device)
    print(json.dumps({"model": str(args.out), "loss_first": fit.history[0], "loss_last": fit.history[-1], **fit.data}))
    return 0
