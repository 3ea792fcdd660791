"""`labelfactory train-datasetgan`: fit the pixel-classifier ensemble on annotated generated images."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from labelfactory import distributed
from labelfactory.checkout import APP_MODEL_DIR, checkout_default
from labelfactory.datasetgan.labeller import MODEL_FILE
from labelfactory.datasetgan.train import DatasetGANConfig
from labelfactory.devices import add_device_argument, module_device
from labelfactory.errors import LabelFactoryError
from labelfactory.jsonio import read_json, write_json_atomic
from labelfactory.latent_record import TRUNCATION_PSI
from labelfactory.options import add_arguments, add_config_argument, exposed, from_args
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
    src.add_argument(
        "--items",
        type=Path,
        help="JSON list of [image id, latent record, label file] (what the server's multi_gpu launch trains on)",
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
    add_config_argument(p)
    add_arguments(
        p,
        d,
        FLAGS,
        deprecated={"max_epochs": "--epochs"},
    )
    p.add_argument(
        "--hidden", type=int, nargs=2, default=None, metavar=("H1", "H2"), help=f"hidden widths (default {d.hidden})"
    )
    p.add_argument(
        "--class-weights", type=float, nargs="+", default=None, help="one cross-entropy weight per class value"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--label-map",
        default="totalsegmentator",
        help="the masks' label map (labelfactory.labels: totalsegmentator, openkbp, or a JSON file of name -> value), "
        "recorded in the model",
    )
    p.add_argument("--summary", type=Path, default=None, help="also write the JSON summary to this file (rank 0)")
    add_device_argument(p)


def run(args: argparse.Namespace) -> int:
    """Fit and write the interpreter, print one line. Under torchrun, the members are split over the processes."""
    with distributed.process_group_cleanup():
        distributed.init_from_env()
        return _fit(args)


def _fit(args: argparse.Namespace) -> int:
    from labelfactory.datasetgan.records import load_records, records_from_datastore_folder, records_from_seed_masks
    from labelfactory.datasetgan.train import fit_interpreter, fit_summary
    from labelfactory.stylegan2.checkpoint import load_generator

    generator = generator_path(args)
    G = load_generator(generator, args.device)
    cfg = from_args(DatasetGANConfig(), args, FLAGS)
    cfg = replace(cfg, hidden=tuple(args.hidden) if args.hidden else cfg.hidden)
    cfg = replace(cfg, class_weights=tuple(args.class_weights) if args.class_weights else cfg.class_weights)
    label_names = _label_names(args.label_map)
    K = max(label_names.values()) + 1
    if args.labels:
        records = records_from_seed_masks(G, args.labels, args.truncation_psi, K, cfg.ignore_index)
    else:
        items = read_json(args.items, []) if args.items else records_from_datastore_folder(args.datastore)
        if not items:
            raise LabelFactoryError(
                f"{args.items or args.datastore}: no labelled generated images; label some generated images first"
            )
        records = load_records(G, items, K, cfg.ignore_index)
    out = args.out or generator.with_name(MODEL_FILE)
    fit = fit_interpreter(G, records, label_names, cfg, out, progress=not args.no_progress)
    if distributed.is_main():
        epochs, loss = len(fit.history["epoch_loss"]), fit.history["best_loss"]
        print(f"interpreter: {len(records)} images, {epochs} epochs, loss {loss:.4f} on {module_device(G)} -> {out}")
        if args.summary is not None:
            write_json_atomic({"model": str(out), **fit_summary(fit, G, cfg)}, args.summary)
    return 0


def _label_names(spec: str) -> dict[str, int]:
    """`--label-map`: a registered map's name -> value, or those of a JSON file {name: value}."""
    from labelfactory.labels import label_map

    if not spec.endswith(".json"):
        return label_map(spec).values
    names = read_json(spec)
    if not isinstance(names, dict):
        raise LabelFactoryError(f"--label-map {spec}: no JSON object of label name -> value there")
    return {str(k): int(v) for k, v in names.items()}
