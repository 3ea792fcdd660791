"""`labelfactory train-segmentation` under torchrun: two gloo workers on CPU train one model (DDP), rank 0 writes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labelfactory.checkpoints import load_checkpoint
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_two_workers_train_and_rank0_writes(tmp_path):
    out = tmp_path / "segmentation.pt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "labelfactory.cli",
        "train-segmentation",
        "--studies",
        str(REPO / "sample-data" / "datastore"),
        "--out",
        str(out),
        "--network",
        "unet",
        "--size",
        "32",
        "--steps",
        "4",
        "--val-interval",
        "2",
        "--batch-size",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = load_checkpoint(out, "segmentation")
    assert proc.stdout.count('"best_val_dice"') == 1  # only rank 0 reports
    report, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{") :])
    # the file holds the best validated weights rank 0 reported
    assert payload["metrics"] == {"val_dice": pytest.approx(report["best_val_dice"]), "step": report["best_step"]}
    assert report["best_step"] in (2, 4)
    assert not list(tmp_path.glob(".segmentation.pt.*.tmp"))
