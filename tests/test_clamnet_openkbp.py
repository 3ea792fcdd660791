"""ClamNet's OpenKBP weak task on the bundled patients (sample-data/openkbp): body crop, eta from slice labels, labels
from the datastore's image info, the evaluation's numbers, and the reduced benchmark (one command, JSON + md + PNG)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from monailabel.datastore.local import LocalDatastore
from scipy.ndimage import binary_dilation
from sklearn.metrics import roc_auc_score

from labelfactory.clamnet.body import body_mask
from labelfactory.clamnet.data import WeakSlices
from labelfactory.clamnet.evaluate import best_threshold, map_scores, pixel_auroc
from labelfactory.clamnet.experiment import Budget, run_method
from labelfactory.clamnet.image_labels import ramp_eta, rows_from_info, slice_labels
from labelfactory.clamnet.openkbp import WeakTask, load_case_slices
from labelfactory.clamnet.train import ClamNetConfig
from labelfactory.datasets.openkbp import read_cases
from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image, read_image
from labelfactory.tasks.clamnet import ClamNetInfer, ClamNetTrain

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = (4, 4, 8, 8, 16, 4)


@pytest.fixture
def openkbp(sample):
    return sample / "openkbp" / "cases"


def test_ramp_eta_is_one_inside_and_lower_towards_the_ends():
    abnormal = np.array([0, 1, 1, 1, 1, 1, 1, 0, 1, 0], dtype=bool)
    eta = ramp_eta(abnormal, spacing_mm=2.0, ramp_mm=5.0, floor=0.1)
    # distances to the run's end: 0.5, 1.5, 2.5 slices = 1, 3, 5 mm -> 0.2, 0.6, 1.0
    assert eta[1:7] == pytest.approx([0.2, 0.6, 1.0, 1.0, 0.6, 0.2])
    assert eta[8] == pytest.approx(0.2) and eta[0] == eta[7] == eta[9] == 1.0
    assert ramp_eta(abnormal, 2.0, 100.0, 0.3)[1] == pytest.approx(0.3)  # the floor
    assert np.all(ramp_eta(abnormal, 2.0, 0.0, 0.3) == 1.0)  # no ramp


def test_labels_from_image_info_override_and_are_validated():
    info = {"image_labels": [{"label": "normal"}, {"slice": 2, "label": "abnormal", "eta": 0.4}], "path": "x"}
    rows = rows_from_info("ct", info, "image ct: info")
    listed, abnormal, eta = slice_labels(rows, "ct", 4, default_eta=0.9)
    assert listed.all() and abnormal.tolist() == [False, False, True, False] and eta[2] == pytest.approx(0.4)
    assert rows_from_info("ct", {"path": "x"}, "w") == []
    with pytest.raises(LabelFactoryError, match="image ct: info entry 0"):
        rows_from_info("ct", {"image_labels": [{"label": "sick"}]}, "image ct: info")
    with pytest.raises(LabelFactoryError, match="must be a list"):
        rows_from_info("ct", {"image_labels": "abnormal"}, "image ct: info")


def test_body_mask_keeps_the_body_with_its_airway_and_drops_the_couch():
    arr = np.full((3, 60, 60), -1000, dtype=np.int16)
    yy, xx = np.mgrid[:60, :60]
    body = (yy - 25) ** 2 + (xx - 30) ** 2 < 18**2
    airway = (yy - 25) ** 2 + (xx - 30) ** 2 < 3**2
    arr[:, body] = 40
    arr[:, airway] = -1000
    arr[:, 52:55, 5:55] = 200  # the couch, apart from the body
    arr[2] = -1000  # a slice without body
    m = body_mask(Image(arr, (4.0, 4.0, 2.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))).array
    assert np.array_equal(m[0] > 0, body) and np.array_equal(m[1] > 0, body) and not m[2].any()


def test_openkbp_slices_labelled_by_ptv70_with_eta_from_labels(openkbp):
    case = read_cases(openkbp, "validation")[0]
    s = load_case_slices(case, WeakTask(size=32))
    ptv = read_image(case.ptv).array
    with_ptv70 = set(np.nonzero((ptv == 3).reshape(len(ptv), -1).any(1))[0].tolist())
    assert {int(z) for z in s.file_slice[s.abnormal]} == with_ptv70 & {int(z) for z in s.file_slice}
    has_truth = s.truth.flatten(1).any(1)
    assert not has_truth[~s.abnormal].any() and has_truth[s.abnormal].float().mean() > 0.9
    assert (s.truth * (1 - s.organ)).sum() <= 0.02 * s.truth.sum()  # PTV70 lies in the body crop's organ
    ab = s.eta[s.abnormal]
    assert ab.max() == 1.0 and ab.min() < 0.5 and s.x.shape[1:] == (1, 32, 32)


def test_pixel_auroc_matches_scikit_learn_with_ties():
    g = torch.Generator().manual_seed(0)
    m = (torch.rand(5000, generator=g) * 10).round() / 10
    t = torch.rand(5000, generator=g) < 0.2 + 0.5 * m
    assert pixel_auroc(m, t) == pytest.approx(roc_auc_score(t.numpy(), m.numpy()), abs=1e-9)
    assert pixel_auroc(m, torch.zeros(5000, dtype=torch.bool)) is None


def test_threshold_and_scores_on_a_hand_made_map():
    truth = torch.zeros(4, 1, 8, 8)
    truth[0, 0, 2:4, 2:4] = 1
    truth[1, 0, 5:7, 1:3] = 1
    maps = 0.3 * torch.ones(4, 8, 8) + 0.6 * truth[:, 0]
    maps[2, 0, 0] = 0.5  # one false-positive pixel on a normal slice
    organ = torch.ones(4, 1, 8, 8)
    s = WeakSlices(
        torch.zeros(4, 1, 8, 8),
        organ,
        truth,
        torch.ones(4, dtype=torch.bool),
        torch.tensor([True, True, False, False]),
        torch.ones(4),
        ["p"] * 4,
        torch.arange(4),
    )
    t, dice = best_threshold(maps, truth[:, 0] > 0, organ[:, 0])
    assert t > 0.5 and dice == 1.0  # above the false positive, at or below the truth's 0.9
    r = map_scores(maps, s, 0.45)  # 8 truth pixels + 1 false positive
    assert r["dice"] == pytest.approx(16 / 17) and r["iou"] == pytest.approx(8 / 9)
    assert r["slice_accuracy"] == 0.75 and r["slice_sensitivity"] == 1.0 and r["slice_specificity"] == 0.5
    assert r["auroc"] == pytest.approx(1.0)


def test_trainer_takes_slice_labels_from_the_datastore_info(tmp_path, sample):
    src = sample / "openkbp" / "datastore"
    store = tmp_path / "store"
    store.mkdir()
    ids = ["validation_pt_201", "validation_pt_222"]
    for i in ids:
        shutil.copy(src / f"{i}.nii.gz", store / f"{i}.nii.gz")
    ds = LocalDatastore(str(store), extensions=("*.nii.gz",))
    ptv = read_image(src / "ptv" / f"{ids[0]}.nii.gz").array
    abnormal = np.nonzero((ptv == 3).reshape(len(ptv), -1).any(1))[0]
    rows = [{"label": "normal"}] + [{"slice": int(z), "label": "abnormal"} for z in abnormal]
    ds.update_image_info(ids[0], {"image_labels": rows})  # what PUT /datastore/image/info does
    ds.update_image_info(ids[1], {"image_labels": [{"label": "normal"}]})
    model_dir = tmp_path / "model"
    cfg = ClamNetConfig(size=32, features=TINY, steps=1, batch=2, organ="body")
    stats = ClamNetTrain(model_dir, cfg)({"steps": 1}, ds)  # no CSV anywhere: the info alone
    assert stats["abnormal"] == len(abnormal) and set(stats["studies"]) == set(ids)
    infer = ClamNetInfer(model_dir)
    prob_path, result = infer({"image": str(store / f"{ids[0]}.nii.gz"), "probability": True})  # organ 'body' too
    prob, image = read_image(prob_path).array, read_image(store / f"{ids[0]}.nii.gz")
    near_body = binary_dilation(body_mask(image).array > 0, iterations=6)  # 32^2 crop pixels span ~3 CT pixels
    assert result["organ_crop"] == "organ mask of the study" and prob[~near_body].max() == 0
    ds.update_image_info(ids[1], {"image_labels": [{"label": "maybe"}]})
    with pytest.raises(LabelFactoryError, match="validation_pt_222: info"):
        ClamNetTrain(model_dir, cfg)({"steps": 1}, ds)


def test_a_method_record_is_resumed_not_retrained(tmp_path, openkbp, monkeypatch):
    cases = read_cases(openkbp, "train")[:2]
    task = WeakTask(size=32)
    train = load_case_slices(cases[0], task)
    val = load_case_slices(cases[1], task)
    budget = Budget(steps=2, batch=2, features=TINY, cam_widths=(4, 4, 8, 8), picture_slices=2)
    first = run_method("gradcam", train, train, val, budget, tmp_path)
    monkeypatch.setattr("labelfactory.clamnet.experiment.fit", lambda *a: pytest.fail("retrained"))
    assert run_method("gradcam", train, train, val, budget, tmp_path) == first
    assert set(first["per_patient"]) == {cases[1].name} and first["pooled"]["slices"] == len(val)
    with pytest.raises(ValueError, match="unknown method"):
        run_method("clamnet_nothing", train, train, val, budget, tmp_path)


def test_reduced_openkbp_benchmark_writes_json_markdown_and_picture(tmp_path, openkbp):
    out, png = tmp_path / "r", tmp_path / "r.png"
    cmd = [
        sys.executable,
        "benchmarks/clamnet.py",
        "openkbp",
        "--root",
        str(openkbp),
        "--size",
        "32",
        "--steps",
        "3",
        "--batch",
        "2",
        "--features",
        *map(str, TINY),
        "--cam-widths",
        "4",
        "4",
        "8",
        "8",
        "--train-patients",
        "2",
        "--val-patients",
        "2",
        "--threshold-patients",
        "1",
        "--methods",
        "clamnet",
        "gradcam",
        "supervised",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(out),
        "--png",
        str(png),
    ]
    subprocess.run(
        cmd, check=True, cwd=openkbp.parents[2], capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    result = json.loads(out.with_suffix(".json").read_text())
    methods = result["methods"]
    assert set(methods) == {"clamnet", "gradcam", "supervised"}
    assert result["data"]["evaluation"]["patients"] == 2 and result["data"]["threshold"]["patients"] == 1
    assert all(len(r["per_patient"]) == 2 for r in methods.values())
    c, g = methods["clamnet"]["pooled"], methods["gradcam"]["pooled"]
    assert result["ratios"]["clamnet_over_gradcam_dice"] == pytest.approx(c["dice"] / g["dice"])
    text = out.with_suffix(".md").read_text()
    assert "not a lesion outline" in text and all(f"| {m} |" in text for m in methods)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
