"""`labelfactory train-gan`: StyleGAN2-ADA on a folder of CT studies.

N processes: `torchrun --nproc_per_node=N -m labelfactory.cli train-gan ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from labelfactory.checkout import SAMPLE_STUDIES, checkout_default
from labelfactory.distributed import init_from_env, is_main, process_group_cleanup
from labelfactory.gan.config import PRESETS, preset
from labelfactory.gan.data import load_training_slices, openkbp_training_slices, real_image_paths
from labelfactory.gan.training import train

logger = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--studies",
        type=Path,
        help=f"folder of CT images (MONAI Label datastore layout); default in a checkout: {SAMPLE_STUDIES}",
    )
    parser.add_argument(
        "--openkbp",
        type=Path,
        default=None,
        help="train on an OpenKBP folder's body-centred crops instead of --studies (see labelfactory.datasets.openkbp)",
    )
    parser.add_argument("--split", default="train", help="with --openkbp: the split to train on")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/stylegan2"),
        help="run folder: state, preview.png, TensorBoard, train_stats.json (resumed when it exists)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="also publish the EMA generator here (e.g. apps/labelfactory/model/stylegan2.pt)",
    )
    parser.add_argument(
        "--preset", default="auto", choices=["auto", *PRESETS], help="auto: paper256 with a GPU, demo on CPU"
    )
    for name, typ in (
        ("resolution", int),
        ("total-kimg", float),
        ("snapshot-kimg", float),
        ("fid-kimg", float),
        ("batch-size", int),
        ("r1-gamma", float),
        ("seed", int),
    ):
        parser.add_argument(f"--{name}", type=typ, default=None)
    parser.add_argument("--no-augment", action="store_true", help="train without ADA")
    parser.add_argument(
        "--mixed-precision",
        action="store_true",
        help="main phases with the top 4 resolutions of G and D in bf16 (CPU with AVX-512 BF16, GPU)",
    )
    parser.add_argument(
        "--fid-weights", type=Path, default=None, help="pytorch-fid Inception weights (default: the torch hub cache)"
    )
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    with process_group_cleanup():
        init_from_env()
        cfg = preset(args.preset).with_overrides(
            resolution=args.resolution,
            total_kimg=args.total_kimg,
            snapshot_kimg=args.snapshot_kimg,
            fid_kimg=args.fid_kimg,
            batch_size=args.batch_size,
            r1_gamma=args.r1_gamma,
            seed=args.seed,
            augment=False if args.no_augment else None,
            mixed_precision=True if args.mixed_precision else None,
        )
        if args.openkbp is not None:
            images, data_info = openkbp_training_slices(args.openkbp, args.split, cfg.resolution)
        else:
            paths = real_image_paths(args.studies or checkout_default(SAMPLE_STUDIES, "--studies"))
            images = load_training_slices(paths, cfg.resolution)
            data_info = {"images": [p.name for p in paths], "slices": len(images)}
        logger.info(
            "training StyleGAN2-ADA at %d^2 on %d slices for %g kimg", cfg.resolution, len(images), cfg.total_kimg
        )
        stats = train(
            cfg,
            images,
            args.out,
            publish_path=args.model,
            data_info=data_info,
            fid_weights=args.fid_weights,
            progress=not args.no_progress,
        )
        if is_main():
            print(json.dumps({k: v for k, v in stats.items() if k != "history"}, indent=1))
    return 0
