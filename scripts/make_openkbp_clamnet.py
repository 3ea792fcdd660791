"""Give the OpenKBP sample its ClamNet (issue 30.3): image-level labels in the datastore, a model trained on them.

1. Labels: each datastore image's info gets `image_labels` (as `PUT /datastore/image/info` stores them, in the
   datastore's index `datastore_v2.json`): every slice normal, the slices holding a parotid gland (the expert contours
   in `datastore/organs/`, values 3 and 4) abnormal, eta from `ramp_eta` (1 inside the run, down to 0.2 at its ends).
2. Model: `fit_clamnet` on the datastore's slices with those labels, as Train `clamnet` does on the served sample
   (organ: the body; the recipe below, recorded in the file, so Train retrains alike), then the threshold with the
   best pooled Dice on those four patients' parotids, written to `models/clamnet.pt` with its SHA-256.
3. Figures: per-patient Dice and pixel AUROC of that model on the six train-split patients of `cases/`, which it
   never saw (its four training patients are OpenKBP validation patients), printed as JSON for `models/README.md`.

Usage: python scripts/make_openkbp_clamnet.py [--steps 200] [--target self]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from monailabel.datastore.local import LocalDatastore

from labelfactory.checkpoints import hash_path, previous_path, sha256_of
from labelfactory.clamnet.data import load_weak_slices
from labelfactory.clamnet.evaluate import best_threshold, per_patient
from labelfactory.clamnet.image_labels import INFO_KEY, ramp_eta
from labelfactory.clamnet.infer import predict_crops
from labelfactory.clamnet.openkbp import PAROTIDS, WeakTask, load_weak_task
from labelfactory.clamnet.train import MODEL_FILE, ClamNetConfig, fit_clamnet, save_clamnet
from labelfactory.datasets.openkbp import WINDOW, read_cases
from labelfactory.io import read_image
from labelfactory.tasks.clamnet import datastore_image_labels

SAMPLE = Path(__file__).resolve().parents[1] / "sample-data" / "openkbp"
STORE, MODELS, CASES = SAMPLE / "datastore", SAMPLE / "models", SAMPLE / "cases"
INDEX = "datastore_v2.json"


def recipe(steps: int, target: str) -> ClamNetConfig:
    """The shipped config: 64^2 body crops at OpenKBP's window, a small UNet++ pair (as benchmarks/clamnet_weak.py)."""
    task = WeakTask(target="parotid")
    return ClamNetConfig(
        size=task.size,
        features=(8, 8, 16, 32, 64, 8),
        steps=steps,
        batch=8,
        organ="body",
        margin_mm=task.margin_mm,
        window=(WINDOW.level, WINDOW.width),
        marker_fraction=0.1,
        target=target,
        marker="parotid",
    )


def parotid_rows(case: str) -> list[dict]:
    """`image_labels` of one datastore image: normal, except the slices holding a parotid (with their eta)."""
    organs = read_image(STORE / "organs" / f"{case}.nii.gz")
    holds = np.isin(organs.array, PAROTIDS).reshape(len(organs.array), -1).any(1)
    eta = ramp_eta(holds, float(organs.spacing[2]), WeakTask.ramp_mm, WeakTask.eta_floor)
    rows = [{"slice": int(z), "label": "abnormal", "eta": round(float(eta[z]), 3)} for z in np.nonzero(holds)[0]]
    return [{"label": "normal"}, *rows]


def label_datastore(work: Path) -> LocalDatastore:
    """A working copy of the datastore with the labels in its images' info; its index is copied back to STORE."""
    copy = work / "datastore"
    shutil.copytree(STORE, copy, ignore=shutil.ignore_patterns(INDEX, ".lock"))
    ds = LocalDatastore(str(copy), extensions=("*.nii.gz",))
    for image_id in ds.list_images():
        ds.update_image_info(image_id, {INFO_KEY: parotid_rows(image_id)})
    shutil.copyfile(copy / INDEX, STORE / INDEX)
    return ds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument(
        "--target", default="self", help="the rule with the best train-patient Dice on parotid (docs/RESULTS.md 6b)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = recipe(args.steps, args.target)
    with tempfile.TemporaryDirectory() as tmp:
        ds = label_datastore(Path(tmp))
        slices = load_weak_slices(
            Path(tmp) / "datastore", None, cfg.organ, [], None, cfg.size, cfg.margin_mm, cfg.ct_window, cfg.eta,
            datastore_image_labels(ds),
        )  # fmt: skip
    t0 = time.time()
    fit = fit_clamnet(slices, cfg, device="cpu")
    train_s = time.time() - t0
    own = load_weak_task(read_cases(CASES, "validation"), WeakTask(target="parotid", size=cfg.size))
    threshold, own_dice = best_threshold(
        predict_crops(fit.pair, own.x, own.organ), own.truth[:, 0] > 0.5, own.organ[:, 0]
    )
    out = MODELS / MODEL_FILE
    for old in (out, hash_path(out), previous_path(out), hash_path(previous_path(out))):
        old.unlink(missing_ok=True)  # a rebuild replaces the shipped file, keeping no previous version beside it
    save_clamnet(fit.pair, replace(cfg, threshold=threshold), fit.data, out, fit.history)
    held_out = load_weak_task(read_cases(CASES, "train"), WeakTask(target="parotid", size=cfg.size))
    scores = per_patient(predict_crops(fit.pair, held_out.x, held_out.organ), held_out, threshold)
    print(
        json.dumps(
            {
                "sha256": sha256_of(MODELS / MODEL_FILE),
                "train_s": round(train_s),
                "threshold": threshold,
                "training_patients_pooled_dice": own_dice,
                "held_out": {p: {k: s[k] for k in ("dice", "auroc")} for p, s in scores.items()},
                "held_out_mean": {k: float(np.mean([s[k] for s in scores.values()])) for k in ("dice", "auroc")},
                "data": fit.data,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
