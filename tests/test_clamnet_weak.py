"""The weak tasks of OpenKBP (`clamnet.openkbp`: parotid, ptv70) on the bundled sample cases, and
benchmarks/clamnet_weak.py end to end in its reduced mode."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from labelfactory.clamnet.openkbp import WeakTask, has_target, load_case_slices, load_weak_task
from labelfactory.datasets.openkbp import read_cases
from tests.conftest import REPO, SAMPLE

pytestmark = pytest.mark.usefixtures("one_thread")
CASES = SAMPLE / "openkbp" / "cases"


@pytest.mark.parametrize("target", ["parotid", "ptv70"])
def test_a_slice_is_abnormal_exactly_when_its_crop_holds_the_target(target):
    case = read_cases(CASES, "validation")[0]
    s = load_case_slices(case, WeakTask(target=target, size=32))
    holds = s.truth.flatten(1).any(1)
    assert s.abnormal.any() and (~s.abnormal).any()
    assert not holds[~s.abnormal].any()  # no truth on a normal slice
    assert holds[s.abnormal].float().mean() > 0.9  # a thin target may vanish from a 32^2 crop on a few slices


def test_patients_without_parotid_contours_are_left_out():
    cases = read_cases(CASES, "train")
    uncontoured = replace(cases[0], name="no_parotids", organs_present=(1, 2))
    assert not has_target(uncontoured, "parotid") and has_target(uncontoured, "ptv70")
    s = load_weak_task([uncontoured, cases[1]], WeakTask(target="parotid", size=32))
    assert set(s.study) == {cases[1].name}


def test_the_benchmark_runs_reduced_and_writes_its_figures(tmp_path):
    out, png = tmp_path / "weak.json", tmp_path / "weak.png"
    cmd = [sys.executable, str(REPO / "benchmarks" / "clamnet_weak.py"), "--reduced", "--tasks", "parotid"]
    cmd += ["--methods", "clamnet-cam", "grad-cam", "floor", "--work", str(tmp_path), "--out", str(out)]
    subprocess.run([*cmd, "--png", str(png)], check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    rec = result["tasks"]["parotid"]
    assert result["code"] and rec["data"]["validation"]["patients"] == 4
    floor = rec["methods"]["floor"]
    assert floor["auroc"]["mean"] == pytest.approx(0.5)  # a constant map ranks nothing
    for row in rec["methods"].values():
        lo, hi = row["dice"]["ci95"]
        assert lo <= row["dice"]["mean"] <= hi and len(row["dice"]["per_patient"]) == 4
    assert set(rec["paired"]) == {f"clamnet-cam vs {o} {m}" for o in ("grad-cam", "floor") for m in ("dice", "auroc")}
    assert "clamnet-cam vs grad-cam dice" in out.with_suffix(".md").read_text()
    assert {"slice_accuracy", "cam", "grad-cam", "difference", "difference-level", "intensity"} <= set(rec["evidence"])
    assert rec["presence_by_level"]["rows"]
    assert png.stat().st_size > 10_000 and torch.load(tmp_path / "parotid" / "slices.pt", weights_only=True)["key"]
