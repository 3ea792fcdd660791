"""`labelfactory synthesize`: generate a labelled data set of CT slices, the most uncertain pairs dropped.

Several processes: `torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT] -m labelfactory.cli synthesize
...` splits the seeds over the ranks (all writing one shared --out); the folder is what one process makes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from labelfactory import distributed
from labelfactory.datasetgan.cli import generator_arg, generator_path
from labelfactory.datasetgan.labeller import MODEL_FILE
from labelfactory.datasetgan.synthesis import BLOCK
from labelfactory.devices import PRECISIONS, add_device_argument
from labelfactory.latent_record import TRUNCATION_PSI
from labelfactory.stylegan2.identity import parse_seeds


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", required=True, help="output folder (images/, labels/, manifest.csv, preview.png); rerunning resumes"
    )
    generator_arg(p)
    p.add_argument("--interpreter", type=Path, default=None, help=f"default: {MODEL_FILE} beside the generator")
    p.add_argument("--seeds", default="0-99", help="seeds, e.g. 0-999 or 5,7,100-120 (default 0-99)")
    p.add_argument("--truncation-psi", type=float, default=TRUNCATION_PSI, help=f"(default: {TRUNCATION_PSI})")
    p.add_argument(
        "--drop-fraction", type=float, default=0.1, help="drop this fraction of the most uncertain pairs (default 0.1)"
    )
    p.add_argument("--png", action="store_true", help="also write PNG images and masks")
    p.add_argument(
        "--block",
        type=int,
        default=None,
        help=f"seeds generated together, in fixed blocks [kB, (k+1)B); a folder holds one B (default: the "
        f"folder's own, {BLOCK} for a new one)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="the interpreter's arithmetic: auto (bf16 on CUDA, fp32 on the CPU), fp32 or bf16; recorded per pair",
    )
    p.add_argument("--no-progress", action="store_true")
    add_device_argument(p)


def run(args: argparse.Namespace) -> int:
    from labelfactory.datasetgan.labeller import load_interpreter
    from labelfactory.datasetgan.synthesis import synthesize
    from labelfactory.stylegan2.checkpoint import load_generator

    seeds = parse_seeds(args.seeds)
    generator = generator_path(args)
    with distributed.process_group_cleanup():
        distributed.init_from_env()  # under torchrun: the seeds are split over the ranks
        G = load_generator(generator, args.device)
        interp = load_interpreter(args.interpreter or generator.with_name(MODEL_FILE), G, args.precision)
        res = synthesize(
            interp,
            seeds,
            args.out,
            truncation_psi=args.truncation_psi,
            drop_fraction=args.drop_fraction,
            png=args.png,
            progress=not args.no_progress,
            block=args.block,
        )
        if distributed.is_main():
            kept, dropped = len(res.kept), len(res.dropped)
            print(f"synthesize: {len(res.generated)} new pairs; {kept} kept, {dropped} dropped -> {res.out}")
    return 0
