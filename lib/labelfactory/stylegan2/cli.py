"""`labelfactory train-stylegan2`: StyleGAN2-ADA on a folder of CT studies.

N processes: `torchrun --nproc_per_node=N -m labelfactory.cli train-stylegan2 ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from labelfactory.checkout import SAMPLE_STUDIES, checkout_default
from labelfactory.devices import add_device_argument, resolve_device
from labelfactory.distributed import init_from_env, is_main, process_group_cleanup
from labelfactory.io.dataset import find_studies
from labelfactory.jsonio import write_json_atomic
from labelfactory.options import add_arguments, add_config_argument, exposed, from_args
from labelfactory.stylegan2.config import PRESETS, StyleGAN2Config, preset
from labelfactory.stylegan2.data import load_training_slices, openkbp_training_slices
from labelfactory.stylegan2.training import train

logger = logging.getLogger(__name__)
# StyleGAN2Config fields a flag sets over the preset's value
FLAGS = exposed(StyleGAN2Config, "cli")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--studies",
        type=Path,
        help=f"folder of CT images (MONAI Label datastore layout) or a JSON datalist; default in a checkout: "
        f"{SAMPLE_STUDIES}",
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
        "--resume-from",
        type=Path,
        default=None,
        help="a published generator file to continue (when --out holds no training state): its weights, its "
        "discriminator and ADA p if it was published with them, its kimg; optimisers restart",
    )
    parser.add_argument(
        "--publish-discriminator",
        action="store_true",
        help="--model also holds the discriminator and ADA p, so a later run can --resume-from it (about 2x the size)",
    )
    parser.add_argument(
        "--preset", default="auto", choices=["auto", *PRESETS], help="auto: paper256 with a GPU, demo on CPU"
    )
    add_config_argument(parser)
    add_arguments(
        parser,
        StyleGAN2Config(),
        FLAGS,
        unset="the preset's",
    )
    parser.add_argument(
        "--fid-weights", type=Path, default=None, help="pytorch-fid Inception weights (default: the torch hub cache)"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--summary", type=Path, default=None, help="also write the final stats and data as JSON here")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    with process_group_cleanup():
        init_from_env()
        cfg = from_args(preset(args.preset), args, FLAGS)
        if args.openkbp is not None:
            images, data_info = openkbp_training_slices(args.openkbp, args.split, cfg.resolution)
        else:
            studies = find_studies(args.studies or checkout_default(SAMPLE_STUDIES, "--studies"))
            images = load_training_slices([s.image for s in studies], cfg.resolution)
            data_info = {"images": sorted(s.id for s in studies), "slices": len(images)}
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
            resume_from=args.resume_from,
            publish_discriminator=args.publish_discriminator,
            device=resolve_device(args.device),
        )
        if is_main():
            print(json.dumps({k: v for k, v in stats.items() if k != "history"}, indent=1))
            if args.summary is not None:
                write_json_atomic({**stats, **data_info}, args.summary)
    return 0
