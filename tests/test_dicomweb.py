"""The app on a real Orthanc with DICOMweb: segment the sample DICOM series and save the label back as DICOM-SEG.

Runs Orthanc and the server inside a loopback-only network namespace (`unshare -n`). Skipped,
with the reason printed, only where Orthanc, its DICOMweb plugin or namespaces are unavailable
(`make test` installs Orthanc where it can).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dicomweb_scenario import PLUGIN

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


def _unavailable() -> str | None:
    if not shutil.which("Orthanc"):
        return "Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)"
    if not Path(PLUGIN).exists():
        return f"Orthanc's DICOMweb plugin is missing ({PLUGIN}; Debian: orthanc-dicomweb)"
    if not shutil.which("itkimage2segimage", path=str(Path(sys.executable).parent)):
        return "dcmqi's itkimage2segimage is missing (pip install dcmqi)"
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        return "cannot create a network namespace here (unshare -n needs root or user namespaces)"
    return None


def test_dicomweb_segment_and_save_dicom_seg(sample, app_copy, tmp_path):
    reason = _unavailable()
    if reason:
        print(f"SKIPPED DICOMweb test: {reason}")
        pytest.skip(reason)
    # a small segmentation model, made by the project's own training command
    model = app_copy / "model" / "segmentation.pt"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "labelfactory.cli",
            "train-segmentation",
            "--studies",
            str(sample / "datastore"),
            "--out",
            str(model),
            "--size",
            "64",
            "--steps",
            "4",
            "--val-interval",
            "4",
            "--batch-size",
            "4",
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    r = subprocess.run(
        [
            "unshare",
            "-n",
            sys.executable,
            str(HERE / "dicomweb_scenario.py"),
            "--app",
            str(app_copy),
            "--dicom",
            str(sample / "dicom" / "abdomen"),
            "--work",
            str(tmp_path / "dicomweb"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["next_sample"] == out["series_uid"], "next sample must offer the series held by Orthanc"
    assert out["label_shape"] == out["volume_shape"] == [20, 512, 512]
    assert out["label_spacing"] == out["volume_spacing"]
    assert out["seg_series"] >= 1, "the saved label must reach Orthanc as a DICOM-SEG series"
