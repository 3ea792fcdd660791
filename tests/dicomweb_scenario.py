"""Run inside a fresh network namespace (`unshare -n`): Orthanc + DICOMweb, the labelfactory server on
it, segmentation of the sample DICOM series, and its label saved back to Orthanc as DICOM-SEG.

Orthanc 1.10 cannot bind to loopback only, hence the namespace: nothing in it reaches, or is
reached from, any other network. Prints one JSON line with what happened; exits non-zero on failure.

    unshare -n python tests/dicomweb_scenario.py --app APP_DIR --dicom sample-data/dicom/abdomen --work DIR
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import requests

from labelfactory.io import read_image, write_image
from labelfactory.labels import LABEL_NAMES
from labelfactory.serve import server_command, server_env

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout} s:\n{log.read_text()[-3000:]}")


def uncompressed_copy(src: Path, dst: Path) -> list[Path]:
    """Copy a DICOM series with its pixels decoded (GDCM via SimpleITK) and stored as explicit little endian.

    Debian's Orthanc cannot transcode JPEG 2000 for WADO-RS, and the sample series is JPEG 2000.
    """
    import SimpleITK as sitk
    from pydicom.uid import ExplicitVRLittleEndian

    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        hu = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))[0].astype(np.float64)
        stored = np.rint((hu - float(ds.get("RescaleIntercept", 0))) / float(ds.get("RescaleSlope", 1)))
        ds.PixelData = stored.astype(np.int16 if ds.PixelRepresentation else np.uint16).tobytes()
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(dst / f.name)
        out.append(dst / f.name)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--app", required=True)
    ap.add_argument("--dicom", required=True)
    ap.add_argument("--work", required=True)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    procs = []
    try:
        http, dicom = free_port(), free_port()
        cfg = {
            "Name": "labelfactory-test",
            "StorageDirectory": str(work / "orthanc-db"),
            "IndexDirectory": str(work / "orthanc-db"),
            "HttpPort": http,
            "DicomPort": dicom,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": False,
            "Plugins": [PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        (work / "orthanc.json").write_text(json.dumps(cfg))
        olog = work / "orthanc.log"
        orthanc = subprocess.Popen(
            ["Orthanc", str(work / "orthanc.json")],
            stdout=open(olog, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(orthanc)
        base = f"http://127.0.0.1:{http}"
        wait(base + "/system", 60, orthanc, olog)
        files = uncompressed_copy(Path(a.dicom), work / "upload")
        for f in files:
            r = requests.post(base + "/instances", data=f.read_bytes(), timeout=60)
            r.raise_for_status()
        series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)

        port = free_port()
        slog = work / "server.log"
        cmd = server_command(
            f"{base}/dicom-web", "127.0.0.1", port, [("models", "segmentation"), ("skip_trainers", "true")], a.app
        )
        server = subprocess.Popen(
            cmd,
            stdout=open(slog, "wb"),
            stderr=subprocess.STDOUT,
            env={**server_env(), "HOME": str(work)},
            start_new_session=True,
        )
        procs.append(server)
        url = f"http://127.0.0.1:{port}"
        wait(url + "/info/", 240, server, slog)

        nxt = requests.post(url + "/activelearning/random", json={}, timeout=120).json()  # Slicer's "next sample"
        r = requests.post(
            url + "/infer/segmentation",
            params={"image": series_uid, "output": "image"},
            data={"params": json.dumps({"result_extension": ".nii.gz"})},
            timeout=600,
        )
        if r.status_code != 200:
            raise RuntimeError(f"infer: {r.status_code} {r.text[:500]}\n{slog.read_text()[-3000:]}")
        label_file = work / "label.nii.gz"
        label_file.write_bytes(r.content)
        label = read_image(label_file)
        volume = read_image(Path(a.dicom))
        # make sure the saved label has something in it to encode
        arr = label.array.astype(np.uint8)
        if not arr.any():
            arr[volume.array > 100] = LABEL_NAMES["liver"]
        write_image(label.with_array(arr), label_file)
        present = sorted({int(v) for v in np.unique(arr)} - {0})
        names = {v: n for n, v in LABEL_NAMES.items()}
        info = {"label_info": [{"name": names[v], "idx": v} for v in present]}
        with open(label_file, "rb") as f:
            r = requests.put(
                url + "/datastore/label",
                params={"image": series_uid, "tag": "final"},
                files={"label": ("label.nii.gz", f)},
                data={"params": json.dumps(info)},
                timeout=600,
            )
        if r.status_code != 200:
            raise RuntimeError(f"save label: {r.status_code} {r.text[:500]}\n{slog.read_text()[-3000:]}")
        seg = requests.get(base + "/dicom-web/series", params={"Modality": "SEG"}, timeout=60).json()
        print(
            json.dumps(
                {
                    "series_uid": series_uid,
                    "next_sample": nxt.get("id"),
                    "label_shape": list(label.array.shape),
                    "volume_shape": list(volume.array.shape),
                    "label_spacing": [round(s, 4) for s in label.spacing],
                    "volume_spacing": [round(s, 4) for s in volume.spacing],
                    "labels_present": present,
                    "seg_series": len(seg),
                }
            )
        )
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
