"""`labelfactory train-datasetgan`: fit the pixel-classifier ensemble on annotated generated images."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from labelfactory.checkout import APP_MODEL_DIR, checkout_default
from labelfactory.datasetgan.labeller import MODEL_FILE
from labelfactory.datasetgan.train import DatasetGANConfig
from labelfactory.devices import add_device_argument, module_device
from labelfactory.errors import LabelFactoryError
from labelfactory.latent_record import TRUNCATION_PSI
from labelfactory.options import add_arguments, exposed, from_args
from labelfactory.stylegan2.checkpoint import MODEL_FILE as GENERATOR_FILE

FLAGS = exposed(DatasetGANConfig, "cli")


def generator_arg(p: argparse.ArgumentParser) -> None:
    """--generator, shared with `synthesize`; resolve it with `generator_path`."""
    p.add_argument(
        "--generator",
        type=Path,
        help=f"generator file (default in a source checkout: {APP_MODEL_DIR}/{GENERATOR_FILE})",
    )


def generator_path(args: argparse.Namespace) -> Path:
    return args.generator or checkout_default(f"{APP_MODEL_DIR}/{GENERATOR_FILE}", "--generator")


def configure(p: argparse.ArgumentParser) -> None:
    d = DatasetGANConfig()
    generator_arg(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--datastore", help="MONAI Label datastore folder: every generated image with a final label")
    src.add_argument(
        "--labels", help="folder of masks named seed<N>.nii.gz (or .seg.nrrd); w from the seed and --truncation-psi"
    )
    p.add_argument(
        "--truncation-psi",
        type=float,
        default=TRUNCATION_PSI,
        help=f"with --labels: the psi the images were generated with (default: {TRUNCATION_PSI})",
    )
    p.add_argument(
        "--out", type=Path, default=None, help=f"interpreter file (default: {MODEL_FILE} beside the generator)"
    )
    add_arguments(
        p,
        d,
        FLAGS,
        deprecated={"max_epochs": "--epochs"},
    )
    p.add_argument("--hidden", type=int, nargs=2, default=list(d.hidden), metavar=("H1", "H2"))
    p.add_argument(
        "--class-weights", type=float, nargs="+", default=None, help="one cross-entropy weight per class value"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--label-map",
        default="totalsegmentator",
        help="the masks' label map (labelfactory.labels: totalsegmentator, openkbp), recorded in the model",
    )
    add_device_argument(p)


def run(args: argparse.Namespace) -> int:
    from labelfactory.datasetgan.records import load_records, records_from_datastore_folder, records_from_seed_masks
    from labelfactory.datasetgan.train import fit_interpreter
    from labelfactory.labels import label_map
    from labelfactory.stylegan2.checkpoint import load_generator

    generator = generator_path(args)
    G = load_generator(generator, args.device)
    weights = tuple(args.class_weights) if args.class_weights else None
    cfg = replace(from_args(DatasetGANConfig(), args, FLAGS), hidden=tuple(args.hidden), class_weights=weights)
    label_names = label_map(args.label_map).values
    K = max(label_names.values()) + 1
    if args.datastore:
        items = records_from_datastore_folder(args.datastore)
        if not items:
            raise LabelFactoryError(
                f"{args.datastore}: no labelled generated images; label some generated images first"
            )
        records = load_records(G, items, K, cfg.ignore_index)
    else:
        records = records_from_seed_masks(G, args.labels, args.truncation_psi, K, cfg.ignore_index)
    fit = fit_interpreter(
        G, records, label_names, cfg, args.out or generator.with_name(MODEL_FILE), progress=not args.no_progress
    )
    epochs, loss = len(fit.history["epoch_loss"]), fit.history["best_loss"]
    print(f"interpreter: {len(records)} images, {epochs} epochs, loss {loss:.4f} on {module_device(G)} -> {fit.path}")
    return 0
