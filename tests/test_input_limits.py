"""Every input bounded before it costs anything, through a real server (issue 27): hostile images, archive bombs,
deep or non-finite JSON, bad option values and idle connections get a 4xx (or a closed socket) naming what to
fix, and the server keeps answering.

One server for the module (the tests need no isolation from each other: nothing they send is stored), with
small archive limits and a short idle timeout so that the bombs and the waits stay small.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk

from labelfactory.serve import server_command, server_env

REPO = Path(__file__).resolve().parents[1]
IDLE_S = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, temp folder, datastore) of one server on a copy of the sample, with the demo models."""
    root = tmp_path_factory.mktemp("limits")
    datastore, app, models, tmp = root / "datastore", root / "app", root / "models", root / "server-tmp"
    shutil.copytree(REPO / "sample-data" / "datastore", datastore)
    shutil.copytree(REPO / "apps" / "labelfactory", app, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
    shutil.copytree(REPO / "sample-data" / "models", models)
    tmp.mkdir()
    port = _free_port()
    conf = [("models", "all"), ("skip_scoring", "true"), ("model_dir", str(models))]
    env = {
        **server_env(),
        "TMPDIR": str(tmp),
        "MONAI_LABEL_SESSION_PATH": str(root / "sessions"),
        "LABELFACTORY_MAX_ARCHIVE_FILES": "50",
        "LABELFACTORY_MAX_ARCHIVE_MB": "8",
        "LABELFACTORY_IDLE_TIMEOUT_S": str(IDLE_S),
    }
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        server_command(str(datastore), "127.0.0.1", port, conf, app),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {(root / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(url + "/info/", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(1)
        yield url, tmp, datastore
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


def _still_up(url):
    assert requests.get(f"{url}/info/", timeout=30).status_code == 200
    ds = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30)
    assert ds.status_code == 200
    return ds.json()["objects"]


def _detail(r):
    return r.json()["detail"]


# ---- images: checked from their header before a voxel is read ----


def _hostile_images(folder: Path) -> dict[str, tuple[Path, int, str]]:
    """name -> (file, expected status, words the answer must hold)."""
    from tests.test_io import _dicom

    out = {
        "huge_dcm": (_dicom(folder / "huge.dcm", 60000, 60000, b"\0" * 200), 413, "LABELFACTORY_MAX_VOXELS"),
        "short_dcm": (_dicom(folder / "short.dcm", 64, 64, b"\0" * 2000), 400, "truncated DICOM"),
    }
    arr = np.zeros((8, 9, 10), np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(folder / "v.mhd"))
    text = (folder / "v.mhd").read_text().replace("ElementDataFile = v.raw", "ElementDataFile = /dev/zero")
    (folder / "evil.mhd").write_text(text)
    out["evil_mhd"] = (folder / "evil.mhd", 400, "ElementDataFile = /dev/zero")
    (folder / "evil.nhdr").write_text(
        "NRRD0004\ntype: short\ndimension: 3\nsizes: 10 9 8\nencoding: raw\ndata file: /etc/passwd\n"
    )
    out["evil_nhdr"] = (folder / "evil.nhdr", 400, "detached NRRD header")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((400, 1, 1), np.int16)), str(folder / "line.nii.gz"))
    out["line_nii"] = (folder / "line.nii.gz", 400, "a line, not a volume")
    return out


@pytest.mark.slow
def test_hostile_images_are_refused_on_upload_and_infer_and_the_server_stays_up(server, tmp_path):
    url, _, datastore = server
    for image_id, (path, status, words) in _hostile_images(tmp_path).items():
        r = requests.put(
            f"{url}/datastore/image",
            params={"image": image_id},
            files={"file": (path.name, path.read_bytes())},
            timeout=60,
        )
        assert r.status_code == status and words in _detail(r), (image_id, r.status_code, r.text)
        r = requests.post(
            f"{url}/infer/segmentation", files={"file": (path.name, path.read_bytes())}, timeout=120
        )  # the demo segmenter loads, then the upload is read: refused from its header
        assert r.status_code == status and words in _detail(r), (image_id, r.status_code, r.text)
    objects = _still_up(url)
    assert not set(_hostile_images(tmp_path)) & set(objects)
    assert not any(p.name.startswith(("huge", "evil", "line")) for p in datastore.iterdir())


# ---- the session archive: files and unpacked bytes capped ----


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def _tgz(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.slow
def test_archive_bombs_are_refused_before_they_fill_the_disk(server):
    url, tmp, _ = server
    many = {f"series/{i:04d}.dcm": b"x" for i in range(60)}  # the limit here is 50 files
    big = {"series/0000.dcm": bytes(9 << 20)}  # 9 MB of zeros (a few KB packed); the limit here is 8 MB
    for name, data, status, words in (
        ("many.zip", _zip(many), 400, "LABELFACTORY_MAX_ARCHIVE_FILES"),
        ("many.tar.gz", _tgz(many), 400, "LABELFACTORY_MAX_ARCHIVE_FILES"),
        ("big.zip", _zip(big), 413, "LABELFACTORY_MAX_ARCHIVE_MB"),
        ("big.tar.gz", _tgz(big), 413, "LABELFACTORY_MAX_ARCHIVE_MB"),
    ):
        assert len(data) < 200_000
        r = requests.put(f"{url}/session/", params={"uncompress": True}, files=[("files", (name, data))], timeout=60)
        assert r.status_code == status and words in _detail(r), (name, r.status_code, r.text)
    ok = requests.put(
        f"{url}/session/", params={"uncompress": True}, files=[("files", ("ok.zip", _zip({"a/b.dcm": b"x"})))]
    )
    assert ok.status_code == 200, ok.text
    assert not list(tmp.glob("lf-upload-*")), "a refused archive left files behind"
    _still_up(url)


# ---- JSON: depth, size and non-finite numbers ----


@pytest.mark.slow
def test_deep_or_non_finite_json_is_400_and_leaves_the_datastore_answering(server):
    url, _, datastore = server
    label = datastore / "labels" / "final" / "torso_3mm.nii.gz"
    deep_5000 = '{"a":' * 5000 + "1" + "}" * 5000
    deep_400 = '{"a":' * 400 + "1" + "}" * 400

    def save_label(params):
        return requests.put(
            f"{url}/datastore/label",
            params={"image": "torso_3mm", "tag": "final"},
            files={"label": (label.name, label.read_bytes())},
            data={"params": params},
            timeout=60,
        )

    for params, words in ((deep_5000, "nested deeper"), ('{"a": NaN}', "NaN is not a finite number")):
        r = save_label(params)
        assert r.status_code == 400 and words in _detail(r) and "params" in _detail(r), r.text
    r = requests.put(f"{url}/datastore/image/info", params={"image": "torso_3mm"}, data={"info": deep_400}, timeout=60)
    assert r.status_code == 400 and "info is nested deeper" in _detail(r), r.text
    r = requests.put(
        f"{url}/datastore/image/info", params={"image": "torso_3mm"}, data={"info": '{"x": Infinity}'}, timeout=60
    )
    assert r.status_code == 400 and "Infinity" in _detail(r), r.text
    for route in ("/activelearning/random", "/train/segmentation", "/batch/infer/segmentation", "/scoring/x"):
        r = requests.post(f"{url}{route}", data=deep_5000, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400 and "JSON body is nested deeper" in _detail(r), (route, r.text)
        r = requests.post(f"{url}{route}", data='{"seed": NaN}', headers={"content-type": "application/json"})
        assert r.status_code == 400 and "NaN" in _detail(r), (route, r.text)
    assert "torso_3mm" in _still_up(url)


# ---- option values: parsed from their fields, 4xx naming them ----


@pytest.mark.slow
def test_bad_option_values_are_4xx_naming_the_option(server):
    url = server[0]

    def infer(model, image, params):
        return requests.post(
            f"{url}/infer/{model}", params={"image": image}, data={"params": json.dumps(params)}, timeout=120
        )

    def post(route, body):
        return requests.post(f"{url}{route}", json=body, timeout=60)

    cases = [
        ("unknown strategy", post("/activelearning/no_such_strategy", {}), 404, "no strategy 'no_such_strategy'"),
        ("unknown trainer", post("/train/no_such_model", {}), 404, "no trainer 'no_such_model'"),
        ("seed -5", post("/activelearning/generated_uncertain", {"seed": -5}), 400, "option seed=-5"),
        ("seed 'x'", post("/activelearning/generated_uncertain", {"seed": "x"}), 400, "option seed='x'"),
        ("psi 'x'", post("/activelearning/generated_uncertain", {"truncation_psi": "x"}), 400, "truncation_psi"),
        ("train seed", post("/train/segmentation", {"seed": -5}), 400, "option seed=-5"),
        ("train network", post("/train/segmentation", {"network": "resnet"}), 400, "option network='resnet'"),
        ("train lr", post("/train/datasetgan", {"lr": "fast"}), 400, "option lr='fast'"),
        ("server path", post("/train/segmentation", {"synthetic": "/etc"}), 400, "synthetic '/etc' is outside"),
        ("path ..", post("/train/clamnet", {"labels_csv": "../../../etc/passwd"}), 400, "labels_csv"),
        ("synthesis psi", infer("synthesis", "seed000001", {"truncation_psi": "x"}), 400, "truncation_psi='x'"),
        ("crop_box", infer("clamnet", "torso_3mm", {"crop_box": ["a"]}), 400, "option crop_box"),
        ("crop_box str", infer("clamnet", "torso_3mm", {"crop_box": [0, 0, "a", 4]}), 400, "option crop_box='a'"),
        ("threshold", infer("clamnet", "torso_3mm", {"threshold": "high"}), 400, "option threshold='high'"),
        ("extension", infer("segmentation", "torso_3mm", {"result_extension": ".exe"}), 400, "result_extension"),
    ]
    for what, r, status, words in cases:
        assert r.status_code == status and words in _detail(r), (what, r.status_code, r.text)
    running = requests.get(f"{url}/train/", params={"check_if_running": True}, timeout=30)
    assert running.status_code != 200 or not running.json(), "a refused training was started"
    _still_up(url)


# ---- connections: idle ones closed ----


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.slow
def test_idle_and_half_sent_connections_are_closed(server):
    """uvicorn's keep-alive timer starts after a first response: these three were held open for ever."""
    host, port = server[0].removeprefix("http://").split(":")
    silent = socket.create_connection((host, int(port)))
    half = socket.create_connection((host, int(port)))
    half.sendall(b"GET /info/ HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    stalled = socket.create_connection((host, int(port)))  # a body announced, two bytes of it sent
    stalled.sendall(b"POST /activelearning/random HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}")
    t0 = time.time()
    assert _closed_within(silent, 3 * IDLE_S + 5) and _closed_within(half, 3 * IDLE_S + 5)
    assert _closed_within(stalled, 3 * IDLE_S + 5)
    assert time.time() - t0 < 3 * IDLE_S + 5
    for s in (silent, half, stalled):
        s.close()
    slow = socket.create_connection((host, int(port)))  # a body that keeps coming, a byte a second: never cut
    slow.sendall(
        b"POST /activelearning/random HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 10\r\n\r\n"
    )
    for byte in b'{"a":"xx"}':
        time.sleep(IDLE_S / 2)
        slow.sendall(bytes([byte]))
    slow.settimeout(60)
    assert slow.recv(1024).startswith(b"HTTP/1.1 200"), "an upload still under way was cut"
    slow.close()
    _still_up(server[0])


# ---- MONAI Label's own routes: found answering 500 by fuzzing the OpenAPI spec and by hand ----


@pytest.mark.slow
def test_monai_label_routes_that_answered_500_answer_4xx_naming_what_to_fix(server):
    """Each of these was a 500 (a traceback in the log): a batch infer spread over zero GPUs (modulo by zero), a
    session of several files downloaded as one, a whole-slide infer, output=dicom_seg and the DICOMweb proxy on a
    folder datastore, nvidia-smi run where there is none, and 2**80 log lines."""
    url, _, datastore = server
    annotated = datastore / "labels" / "final" / "torso_3mm.nii.gz"
    before = annotated.read_bytes()

    def batch(body):
        return requests.post(f"{url}/batch/infer/segmentation", params={"run_sync": True}, json=body, timeout=300)

    ok = datastore / "torso_3mm.nii.gz"
    series = requests.put(
        f"{url}/session/", files=[("files", ("a.nii.gz", ok.read_bytes())), ("files", ("b.nii.gz", ok.read_bytes()))]
    )
    assert series.status_code == 200, series.text
    session = series.json()["session_id"]
    cases = [
        # the annotator's label: refused by the infer (409), no longer a ZeroDivisionError before it
        ("batch", batch({"images": ["torso_3mm"], "label_tag": "final"}), 409, "was saved by an annotator"),
        ("batch size", batch({"max_batch_size": -1}), 400, "option max_batch_size=-1"),
        ("batch gpus", batch({"gpus": "a,b"}), 400, "option gpus='a,b'"),
        ("batch image", batch({"images": ["../etc"]}), 400, "invalid image id '../etc'"),
        ("batch model", requests.post(f"{url}/batch/infer/nope", json={}, timeout=60), 404, "no model 'nope'"),
        ("series image", requests.get(f"{url}/session/{session}", params={"image": True}), 400, "holds a series"),
        ("wsi", requests.post(f"{url}/infer/wsi_v2/segmentation", params={"image": "torso_3mm"}), 404, "whole-slide"),
        ("dicom_seg", requests.post(f"{url}/infer/segmentation?image=torso_3mm&output=dicom_seg"), 400, "dicom_seg"),
        ("proxy", requests.get(f"{url}/proxy/dicom/studies", timeout=60), 404, "not DICOMweb"),
        ("log lines", requests.get(f"{url}/logs/", params={"lines": 2**80}, timeout=60), 400, "lines=1208925"),
    ]
    if shutil.which("nvidia-smi") is None:
        cases.append(("gpu info", requests.get(f"{url}/logs/gpu", timeout=60), 404, "no nvidia-smi"))
    for what, r, status, words in cases:
        assert r.status_code == status and words in _detail(r), (what, r.status_code, r.text)
    assert annotated.read_bytes() == before and "torso_3mm" in _still_up(url)
