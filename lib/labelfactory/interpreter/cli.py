"""`labelfactory train-interpreter`: fit the pixel-classifier ensemble on annotated generated images."""

from __future__ import annotations

import argparse
from pathlib import Path

from labelfactory.errors import LabelFactoryError

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[3] / "apps" / "labelfactory" / "model"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generator", default=str(DEFAULT_MODEL_DIR / "stylegan2.pt"), help="generator file (default: the app's model/stylegan2.pt)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--datastore", help="MONAI Label datastore folder: every generated image with a final label")
    src.add_argument("--labels", help="folder of masks named seed<N>.nii.gz (or .seg.nrrd); w from the seed and --truncation-psi")
    p.add_argument("--truncation-psi", type=float, default=0.7, help="with --labels: the psi the images were generated with")
    p.add_argument("--out", default=None, help="interpreter file (default: interpreter.pt beside the generator)")
    p.add_argument("--members", type=int, default=10)
    p.add_argument("--hidden", type=int, nargs=2, default=[256, 128], metavar=("H1", "H2"))
    p.add_argument("--epochs", type=int, default=30, help="at most this many epochs (early stopping may end sooner)")
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pixels-per-image", type=int, default=1024, help="pixels each member draws from each image per step")
    p.add_argument("--class-weights", type=float, nargs="+", default=None, help="one cross-entropy weight per class value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from labelfactory.gan.checkpoint import load_generator
    from labelfactory.interpreter.labeller import save_interpreter
    from labelfactory.interpreter.records import load_records, records_from_datastore_folder, records_from_seed_masks
    from labelfactory.interpreter.train import TrainConfig, train_ensemble
    from labelfactory.labels import LABEL_NAMES

    G = load_generator(args.generator)
    cfg = TrainConfig(members=args.members, hidden=tuple(args.hidden), max_epochs=args.epochs, patience=args.patience, lr=args.lr,
                      pixels_per_image=args.pixels_per_image, class_weights=tuple(args.class_weights) if args.class_weights else None, seed=args.seed)
    K = max(LABEL_NAMES.values()) + 1
    if args.datastore:
        items = records_from_datastore_folder(args.datastore)
        if not items:
            raise LabelFactoryError(f"{args.datastore}: no labelled generated images; label some generated images first")
        records = load_records(G, items, K, cfg.ignore_index)
    else:
        records = records_from_seed_masks(G, args.labels, args.truncation_psi, K, cfg.ignore_index)
    ens, history = train_ensemble(G, records, K, cfg, progress=not args.no_progress)
    out = Path(args.out) if args.out else Path(args.generator).with_name("interpreter.pt")
    data = {"images": [r.name for r in records], "count": len(records), "history": history}
    save_interpreter(out, ens, LABEL_NAMES, cfg.to_dict(), data, G)
    print(f"interpreter: {len(records)} images, {len(history['epoch_loss'])} epochs, loss {history['best_loss']:.4f} -> {out}")
    return 0
