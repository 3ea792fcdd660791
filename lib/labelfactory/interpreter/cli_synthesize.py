"""`labelfactory synthesize`: generate a labelled data set of CT slices, the most uncertain pairs dropped."""

from __future__ import annotations

import argparse
from pathlib import Path

from labelfactory.errors import LabelFactoryError
from labelfactory.interpreter.cli import DEFAULT_MODEL_DIR


def parse_seeds(text: str) -> list[int]:
    """'0-99,200,300-310' -> the seeds, in order, inclusive ranges."""
    seeds = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            a, _, b = part.partition("-")
            seeds.extend(range(int(a), int(b) + 1) if b else [int(a)])
    except ValueError:
        raise LabelFactoryError(f"--seeds {text!r}: give numbers and ranges like 0-99,200") from None
    if not seeds or min(seeds) < 0:
        raise LabelFactoryError(f"--seeds {text!r}: give at least one seed, none negative")
    return seeds


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (images/, labels/, manifest.csv, preview.png); rerunning resumes")
    p.add_argument("--generator", default=str(DEFAULT_MODEL_DIR / "stylegan2.pt"))
    p.add_argument("--interpreter", default=None, help="default: interpreter.pt beside the generator")
    p.add_argument("--seeds", default="0-99", help="seeds, e.g. 0-999 or 5,7,100-120 (default 0-99)")
    p.add_argument("--truncation-psi", type=float, default=0.7)
    p.add_argument("--drop-fraction", type=float, default=0.1, help="drop this fraction of the most uncertain pairs (default 0.1)")
    p.add_argument("--png", action="store_true", help="also write PNG images and masks")
    p.add_argument("--coarse-to-fine", action="store_true", help="faster approximate upsampling (see benchmarks/interpreter.py for its agreement)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from labelfactory.gan.checkpoint import load_generator
    from labelfactory.interpreter.labeller import load_interpreter
    from labelfactory.synthesis import synthesize

    seeds = parse_seeds(args.seeds)
    G = load_generator(args.generator)
    interp = load_interpreter(args.interpreter or Path(args.generator).with_name("interpreter.pt"), G, coarse_to_fine=args.coarse_to_fine)
    res = synthesize(interp, seeds, args.out, truncation_psi=args.truncation_psi, drop_fraction=args.drop_fraction,
                     png=args.png, progress=not args.no_progress)
    print(f"synthesize: {len(res.generated)} new pairs; {len(res.kept)} kept, {len(res.dropped)} dropped -> {res.out}")
    return 0
