"""Evaluation: hand-checked Dice / IoU / mIoU, patient-wise folds that never leak, and the paper's tables end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from labelfactory.errors import LabelFactoryError
from labelfactory.evaluation.experiments import Experiments, Settings
from labelfactory.evaluation.metrics import confusion_matrix, scores
from labelfactory.evaluation.splits import check_disjoint, group_folds, train_test
from labelfactory.evaluation.statistics import mean_sd
from labelfactory.segmentation.data import RealSlices
from labelfactory.segmentation.train import SegmentationConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dice_and_iou_match_hand_counts():
    truth = torch.tensor([[0, 1, 1, 2], [0, 1, 1, 2]])
    pred = torch.tensor([[0, 1, 0, 2], [1, 1, 1, 0]])
    s = scores(confusion_matrix(pred, truth, 4), {"background": 0, "a": 1, "b": 2, "c": 3})
    # class a: TP 3, FP 1, FN 1 -> IoU 3/5, Dice 6/8; class b: TP 1, FN 1 -> IoU 1/2, Dice 2/3
    assert s["iou"]["a"] == pytest.approx(3 / 5) and s["dice"]["a"] == pytest.approx(6 / 8)
    assert s["iou"]["b"] == pytest.approx(1 / 2) and s["dice"]["b"] == pytest.approx(2 / 3)
    # background: TP 1, FP 2 (a->0, b->0), FN 1 (0->a) -> IoU 1/4
    assert s["iou"]["background"] == pytest.approx(1 / 4)
    assert math.isnan(s["iou"]["c"])  # absent from both: no score, left out of the mean
    assert s["miou"] == pytest.approx((3 / 5 + 1 / 2) / 2)
    assert s["mean_dice"] == pytest.approx((6 / 8 + 2 / 3) / 2)
    assert scores(confusion_matrix(pred, truth, 4), include_background=True)["miou"] == pytest.approx(
        (1 / 4 + 3 / 5 + 1 / 2) / 3
    )
    perfect = scores(confusion_matrix(truth, truth, 3))
    assert perfect["miou"] == 1.0 and perfect["mean_dice"] == 1.0
    assert mean_sd([0.5, 0.7, float("nan")]) == pytest.approx((0.6, math.sqrt(0.02)))  # sample SD


def test_metrics_pool_pixels_over_the_whole_set():
    truth = torch.zeros(2, 4, 4, dtype=torch.long)
    truth[0, :2] = 1  # 8 pixels of class 1 on the first image
    truth[1, 0, 0] = 1  # 1 pixel on the second
    pred = truth.clone()
    pred[1, 0, 0] = 0  # the sliver is missed
    s = scores(confusion_matrix(pred, truth, 2))
    assert s["iou"]["1"] == pytest.approx(8 / 9)  # per-image averaging would give (1 + 0) / 2


def test_patient_folds_never_leak():
    rng = np.random.default_rng(1)
    groups = [f"patient{p}" for p in rng.integers(0, 12, 300)]
    folds = group_folds(groups, 5, seed=3)
    assert sorted(i for f in folds for i in f) == list(range(300))
    for k in range(5):
        train, test = train_test(folds, k)
        assert {groups[i] for i in train}.isdisjoint({groups[i] for i in test})
        check_disjoint(groups, train, test)
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= max(groups.count(g) for g in set(groups))
    assert folds == group_folds(groups, 5, seed=3)
    with pytest.raises(LabelFactoryError, match="two splits"):
        check_disjoint(["a", "a", "b"], [0], [1, 2])
    with pytest.raises(LabelFactoryError, match="pass fewer folds"):
        group_folds(["a", "b"], 5)


def test_experiment_splits_keep_each_patient_in_one_role():
    groups = [f"p{i % 6}" for i in range(60)]
    real = RealSlices(torch.zeros(60, 1, 8, 8), torch.zeros(60, 8, 8, dtype=torch.long), groups)
    ex = Experiments(real, Settings(folds=3, test_size=7, train=SegmentationConfig(size=8)))
    tested = set()
    for f in range(3):
        split = ex.real_split(f)
        roles = [set(split.train.groups), set(split.val.groups), set(split.test.groups)]
        assert all(r for r in roles) and len(split.val.groups) and len(split.test) <= 7
        assert roles[0].isdisjoint(roles[1]) and roles[0].isdisjoint(roles[2]) and roles[1].isdisjoint(roles[2])
        tested |= roles[2]
    assert tested == {f"p{i}" for i in range(6)}


def test_evaluate_end_to_end_writes_every_table(tmp_path, sample, make_pairs):
    from labelfactory.cli import main

    synthetic = make_pairs(tmp_path / "synthetic", 12, seed=1)
    k10 = make_pairs(tmp_path / "k10", 8, seed=2)
    k20 = make_pairs(tmp_path / "k20", 8, seed=3)
    out = tmp_path / "eval"
    rc = main(
        [
            "evaluate",
            "--studies",
            str(sample / "datastore"),
            "--synthetic",
            str(synthetic),
            "--annotated",
            f"10={k10}",
            "--annotated",
            f"20={k20}",
            "--out",
            str(out),
            "--folds",
            "2",
            "--size",
            "32",
            "--test-size",
            "5",
            "--sizes",
            "2,6",
            "--k-real",
            "3",
            "--baseline",
            "unet",
            "--steps",
            "2",
            "--val-interval",
            "2",
            "--batch-size",
            "2",
            "--fid-images",
            "0",
        ]
    )
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    rows = {t: [r["row"] for r in rs] for t, rs in results["tables"].items()}
    assert rows["I"] == ["synthetic pairs=2", "synthetic pairs=6"]
    assert rows["II"] == ["annotated images=10", "annotated images=20"]
    assert rows["III-C"] == ["synthetic (6)", "real (all training patients)", "hybrid (6 synthetic + 3 real)"]
    assert rows["III"] == ["deeplabv3", "fcn", "unet", "unetpp"]
    for table in results["tables"].values():
        for r in table:
            for t in ("test_G", "test_R"):
                folds = r[t]["miou_folds"]
                assert len(folds) == 2 and r[t]["miou"] == pytest.approx(np.mean(folds))  # mean and std over folds
                assert r[t]["miou_std"] == pytest.approx(np.std(folds, ddof=1))  # sample SD
    hybrid = results["tables"]["III-C"][2]
    assert hybrid["train_items"] == [9, 9]
    # identical trainings are shared: unet on 6 synthetic pairs serves table I, III-C and III
    assert len(results["runs"]) == 2 * (2 + 2 + 2 + 3)
    for run in results["runs"]:
        assert run["val_items"] == 0  # two patients, two folds: one trains, one tests, none left to validate
    md = (out / "results.md").read_text()
    for table_rows in rows.values():
        for name in table_rows:
            assert name in md
    for t in ("I", "II", "III-C", "III"):
        assert (out / f"table_{t}.png").stat().st_size > 1000


def test_fid_is_skipped_without_weights(tmp_path, monkeypatch, sample, make_pairs):
    import labelfactory.evaluation.fid as fid
    from labelfactory.evaluation.experiments import synthetic_fid
    from labelfactory.segmentation.data import synthetic_pairs

    monkeypatch.setattr(fid, "fid_weights_cache_path", lambda: tmp_path / "absent.pth")
    monkeypatch.delenv("LABELFACTORY_FID_WEIGHTS", raising=False)
    pairs = synthetic_pairs(make_pairs(tmp_path / "s", 2), 32)
    assert synthetic_fid(pairs, pairs, None, 2) is None
