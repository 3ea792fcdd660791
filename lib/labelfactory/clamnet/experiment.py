"""A weak-segmentation experiment: ClamNet vs Grad-CAM vs a fully supervised UNet++ (the ceiling), ClamNet ablations.

Every method trains on the train patients' slices for the same number of optimizer steps and
batch size (ClamNet from image-level labels and eta, Grad-CAM's classifier from the labels, the
ceiling from the pixel truth), maps the threshold patients (train patients) to choose its
threshold (best pooled Dice; each map has its own scale), and is scored on the evaluation patients
with that threshold: Dice, IoU, pixel ROC AUC, the slice-level call, per patient and pooled.
Each method's record is written to `work/<method>.json` (maps of the picture slices beside, `.pt`)
so an interrupted run resumes with the methods it had not finished.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labelfactory.clamnet.cam import CamConfig, cam_maps, train_classifier
from labelfactory.clamnet.data import WeakSlices
from labelfactory.clamnet.evaluate import best_threshold, map_scores, per_patient
from labelfactory.clamnet.infer import predict_crops
from labelfactory.clamnet.supervised import CeilingConfig, ceiling_maps, train_ceiling
from labelfactory.clamnet.train import ClamNetConfig, train_clamnet
from labelfactory.jsonio import write_json_atomic

logger = logging.getLogger(__name__)
BASELINES = ("clamnet", "gradcam", "supervised")
FLOOR = "body"  # no training: the whole organ (body) marked on every slice, the floor a map must beat
# ablation -> (what it changes, ClamNetConfig overrides, data change)
ABLATIONS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "no_dice_term": ("loss: cross-entropy term only", {"dice_term": False}, None),
    "no_same_pairs": ("pairing: no SAME (view) pairs", {"mix": (0.0, 1.0, 1.0)}, None),
    "no_normal_pairs": ("pairing: no NORMAL-NORMAL pairs", {"mix": (1.0, 0.0, 1.0)}, None),
    "eta_constant": ("eta = 1 on every abnormal slice (no ramp)", {}, "eta_one"),
    "no_organ_gate": ("crop without organ: targets and map over the whole crop", {}, "no_organ"),
    "fraction_0.25": ("marker fraction 0.25 instead of 0.1", {"marker_fraction": 0.25}, None),
    "near_negatives": (
        "pairing: negatives from the 4 nearest normal slices of the same patient",
        {"near_negatives": 4},
        None,
    ),
    "target_cam": ("target: a CAM seed of a classifier on the same labels (targets.py)", {"target": "cam"}, None),
    "target_difference": (
        "target: the difference from the patient's 4 nearest normal slices (targets.py)",
        {"target": "difference"},
        None,
    ),
    "level_self": (
        "pairing: NORMAL / NEGATIVE partners from other patients at the same level (pairs.level_normals)",
        {"pairing": "level"},
        None,
    ),
    "level_difference": (
        "target: the difference from the 4 most similar normal slices of other patients at the same level, aligned",
        {"target": "difference", "pairing": "level"},
        None,
    ),
}


@dataclass
class Budget:
    """The same for every method: optimizer steps, batch (pairs for ClamNet, slices otherwise), seed; widths of each of
    ClamNet's two UNet++ and of the Grad-CAM classifier's stages (a similar size); the ceiling keeps the project's."""

    steps: int = 300
    batch: int = 8
    seed: int = 0
    features: tuple[int, ...] = (8, 8, 16, 32, 64, 8)
    cam_widths: tuple[int, ...] = (16, 32, 64, 128)
    clamnet_lr: float = 1e-3
    lr: float = 1e-3
    marker_fraction: float = 0.1
    picture_slices: int = 6


def _ablated_data(slices: WeakSlices, change: str | None) -> WeakSlices:
    if change is None:
        return slices
    if change == "eta_one":
        return replace(slices, eta=torch.ones_like(slices.eta))
    if change == "no_organ":
        return replace(slices, organ=torch.ones_like(slices.organ))
    raise ValueError(f"unknown data change {change}")


def method_spec(method: str) -> tuple[dict[str, Any], str | None]:
    """A ClamNet method name -> (ClamNetConfig overrides, data change); ValueError for an unknown name."""
    if method == "clamnet":
        return {}, None
    name = method.removeprefix("clamnet_")
    if name == method or name not in ABLATIONS:
        raise ValueError(f"unknown method {method}; choose from {BASELINES} or clamnet_<{'|'.join(ABLATIONS)}>")
    return ABLATIONS[name][1], ABLATIONS[name][2]


def fit(method: str, slices: WeakSlices, budget: Budget) -> Callable[[WeakSlices], torch.Tensor]:
    """Train `method` on `slices`; returns its map function: WeakSlices -> (N, S, S) maps, 0 outside the organ."""
    b = budget
    if method == FLOOR:
        return lambda t: t.organ[:, 0].clone()
    if method == "gradcam":
        cfg = CamConfig(steps=b.steps, batch=b.batch, lr=b.lr, seed=b.seed, widths=tuple(b.cam_widths))
        classifier = train_classifier(slices, cfg)[0]
        return lambda t: cam_maps(classifier, t.x, t.organ, batch=64)
    if method == "supervised":
        cfg = CeilingConfig(steps=b.steps, batch=b.batch, lr=b.lr, seed=b.seed)
        network = train_ceiling(slices, cfg)[0]
        return lambda t: ceiling_maps(network, t.x, t.organ)
    overrides = method_spec(method)[0]
    cfg = ClamNetConfig(
        size=int(slices.x.shape[-1]),
        features=tuple(b.features),
        steps=b.steps,
        batch=b.batch,
        lr=b.clamnet_lr,
        seed=b.seed,
        marker_fraction=b.marker_fraction,
        **overrides,
    )
    pair = train_clamnet(slices, cfg)[0]
    return lambda t: predict_crops(pair, t.x, t.organ, batch=64)


def picture_indices(slices: WeakSlices, k: int) -> list[int]:
    """k abnormal slices from distinct patients (round robin): in each, the slice of median target area."""
    studies = np.array(slices.study)
    area = slices.truth[:, 0].flatten(1).sum(1).numpy()
    picks = []
    for s in dict.fromkeys(slices.study):
        rows = np.nonzero((studies == s) & (area > 0))[0]
        if len(rows):
            picks.append(int(rows[np.argsort(area[rows])[len(rows) // 2]]))
    return picks[:k]


def run_method(
    method: str, train: WeakSlices, threshold_set: WeakSlices, evaluation: WeakSlices, budget: Budget, work: Path
) -> dict[str, Any]:
    """Train one method, choose its threshold on `threshold_set`, score it on `evaluation`; the record is cached in
    work/<method>.json (returned as is when there)."""
    record_path = work / f"{method}.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    change = None if method in (*BASELINES, FLOOR) else method_spec(method)[1]
    t0 = time.time()
    predict = fit(method, _ablated_data(train, change), budget)
    train_s = time.time() - t0
    thr_data, eval_data = _ablated_data(threshold_set, change), _ablated_data(evaluation, change)
    thr_maps = predict(thr_data)
    threshold, thr_dice = best_threshold(thr_maps, thr_data.truth[:, 0] > 0.5, thr_data.organ[:, 0])
    t1 = time.time()
    maps = predict(eval_data)
    infer_ms = 1000 * (time.time() - t1) / max(1, len(eval_data))
    record = {
        "method": method,
        "train_s": train_s,
        "infer_ms_per_slice": infer_ms,
        "threshold": threshold,
        "threshold_set_dice": thr_dice,
        "pooled": map_scores(maps, evaluation, threshold),  # scored on the real organ (AUROC over the body's pixels)
        "per_patient": per_patient(maps, evaluation, threshold),
    }
    picks = picture_indices(evaluation, budget.picture_slices)
    torch.save({"indices": picks, "maps": maps[picks].clone()}, work / f"{method}.pt")
    write_json_atomic(record, record_path)
    logger.info(f"{method}: Dice {record['pooled']['dice']:.3f} AUROC {record['pooled']['auroc']} ({train_s:.0f} s)")
    return record


def run_experiment(
    methods: list[str],
    train: WeakSlices,
    threshold_set: WeakSlices,
    evaluation: WeakSlices,
    budget: Budget,
    work: str | Path,
) -> dict[str, Any]:
    """Every method in turn (see run_method); returns {"budget", "data", "methods": {name: record}, "ratios"}."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    records = {m: run_method(m, train, threshold_set, evaluation, budget, work) for m in methods}
    return {
        "budget": asdict(budget),
        "data": {
            n: describe(s) for n, s in (("train", train), ("threshold", threshold_set), ("evaluation", evaluation))
        },
        "methods": records,
        "ratios": ratios(records),
    }


def describe(slices: WeakSlices) -> dict[str, Any]:
    return {
        "patients": len(set(slices.study)),
        "slices": len(slices),
        "abnormal_slices": int(slices.abnormal.sum()),
        "target_pixels": int(slices.truth.sum()),
    }


def ratios(records: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """ClamNet over Grad-CAM and over the ceiling, pooled Dice and AUROC (None where a method is missing)."""
    out: dict[str, float | None] = {}
    for other in ("gradcam", "supervised"):
        for metric in ("dice", "auroc"):
            a = records.get("clamnet", {}).get("pooled", {}).get(metric)
            b = records.get(other, {}).get("pooled", {}).get(metric)
            out[f"clamnet_over_{other}_{metric}"] = a / b if a is not None and b else None
    return out
