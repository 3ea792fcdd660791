"""Bad requests to a real server get a 4xx with a message, leave nothing behind, and the server stays up.

The server runs with its own temp folder (TMPDIR) so that upload leftovers can be counted, and a
1 MB upload limit (LABELFACTORY_MAX_UPLOAD_MB).
"""

from __future__ import annotations

import asyncio
import json
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import SimpleITK as sitk

from labelfactory.errors import LabelFactoryError
from labelfactory.io import image as image_io
from labelfactory.io import read_image, write_image, write_seg_nrrd
from labelfactory.labels import LABEL_NAMES
from tests.conftest import module_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module (every test leaves the datastore as it found it), its temp folder `.tmp`."""
    root = tmp_path_factory.mktemp("bad-requests")
    (root / "server-tmp").mkdir()
    env = {
        "TMPDIR": str(root / "server-tmp"),
        "LABELFACTORY_MAX_UPLOAD_MB": "1",
        "MONAI_LABEL_SESSION_PATH": str(root / "sessions"),
    }
    with module_server(root, {"models": "all", "skip_scoring": "true"}, env) as srv:
        srv.tmp = root / "server-tmp"
        yield srv


def _uploads_left(folder):
    return [p.name for p in folder.rglob("*") if p.is_file() and p.name.endswith((".nii.gz", ".nii", ".nrrd", ".bin"))]


def _put_image(url, route, image_id, path):
    """Upload the image file `path` as `image_id` through `route` (`/datastore/` or `/datastore/image`)."""
    return requests.put(
        f"{url}{route}", params={"image": image_id}, files={"file": (path.name, path.read_bytes())}, timeout=60
    )


def _put_label(url, image_id, path, params=None):
    form = {"params": params if isinstance(params, str) else json.dumps(params or {})}
    with open(path, "rb") as f:
        return requests.put(
            f"{url}/datastore/label",
            params={"image": image_id, "tag": "final"},
            files={"label": (path.name, f)},
            data=form,
            timeout=60,
        )


@pytest.mark.slow
def test_bad_requests_are_4xx_and_the_server_stays_up(server, tmp_path):
    url, datastore_copy, server_tmp = server.url, server.studies, server.tmp
    ok = read_image(datastore_copy / "labels" / "final" / "torso_3mm.nii.gz")

    # an id that tries to leave the datastore
    r = _put_label(url, "../escape", datastore_copy / "labels" / "final" / "torso_3mm.nii.gz")
    assert r.status_code == 400 and "invalid image id" in r.json()["detail"]
    assert not (datastore_copy.parent / "labels").exists()

    # an unknown image id
    r = _put_label(url, "no_such_study", datastore_copy / "labels" / "final" / "torso_3mm.nii.gz")
    assert r.status_code == 404 and "no image 'no_such_study'" in r.json()["detail"]

    # a label with values outside the label map
    bad = ok.array.copy()
    bad[0, 0, 0] = 77
    r = _put_label(url, "torso_3mm", write_image(ok.with_array(bad), tmp_path / "bad.nii.gz"))
    assert r.status_code == 400 and "[77]" in r.json()["detail"]

    # a label of the wrong shape
    short = ok.__class__(ok.array[:5], ok.spacing, ok.origin, ok.direction)
    r = _put_label(url, "torso_3mm", write_image(short, tmp_path / "short.nii.gz"))
    assert r.status_code == 400 and "differs from its image" in r.json()["detail"]

    # a corrupt label upload
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"\x1f\x8b garbage")
    r = _put_label(url, "torso_3mm", junk)
    assert r.status_code == 400 and "not a readable image" in r.json()["detail"]

    # a corrupt and a 4D image upload
    r = _put_image(url, "/datastore/", "new_study", junk)
    assert r.status_code == 400
    import SimpleITK as sitk

    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False), str(tmp_path / "t4.nii.gz")
    )
    r = _put_image(url, "/datastore/", "four_d", tmp_path / "t4.nii.gz")
    assert r.status_code == 400 and "4D" in r.json()["detail"]

    # infer on an id that is a path on the server's disk
    r = requests.post(f"{url}/infer/segmentation", params={"image": "/etc/passwd"}, timeout=60)
    assert r.status_code in (400, 404)

    # NaN voxels in a NIfTI (ITK's reader would turn them into zeros)
    arr = np.zeros((4, 8, 8), np.float32)
    arr[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "nan.nii.gz"))
    r = _put_image(url, "/datastore/image", "nan_study", tmp_path / "nan.nii.gz")
    assert r.status_code == 400 and "NaN" in r.json()["detail"]

    # an infer without an image id, params that are not JSON (or not an object), a label sent to an infer
    r = requests.post(f"{url}/infer/segmentation", params={"image": ""}, timeout=60)
    assert r.status_code == 400 and "image=" in r.json()["detail"]
    r = requests.post(
        f"{url}/infer/segmentation", params={"image": "torso_3mm"}, data={"params": "{not json"}, timeout=60
    )
    assert r.status_code == 400 and "params must be a JSON object" in r.json()["detail"]
    r = requests.post(f"{url}/infer/segmentation", params={"image": "torso_3mm"}, data={"params": "[1, 2]"}, timeout=60)
    assert r.status_code == 400 and "params must be a JSON object" in r.json()["detail"]
    r = requests.post(
        f"{url}/infer/segmentation",
        params={"image": "torso_3mm"},
        files={"label": ("l.nii.gz", junk.read_bytes())},
        timeout=60,
    )
    assert r.status_code == 400
    r = _put_label(url, "torso_3mm", datastore_copy / "labels" / "final" / "torso_3mm.nii.gz", params="nope")
    assert r.status_code == 400 and "params must be a JSON object" in r.json()["detail"]
    r = requests.put(f"{url}/datastore/image/info", params={"image": "torso_3mm"}, data={"info": "{"}, timeout=60)
    assert r.status_code == 400 and "info must be a JSON object" in r.json()["detail"]

    # an upload over the server's limit (1 MB here): refused before it is stored anywhere
    big = np.random.default_rng(0).integers(-1000, 1000, (40, 128, 128)).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(big), str(tmp_path / "big.nii"))
    r = _put_image(url, "/datastore/image", "big_study", tmp_path / "big.nii")
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    # rejected uploads leave no temp file behind
    assert _uploads_left(server_tmp) == []

    # nothing above was stored, and the server still answers
    assert requests.get(f"{url}/info/", timeout=30).status_code == 200
    ds = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()
    assert not {"new_study", "four_d", "nan_study", "big_study"} & set(ds["objects"])
    assert np.array_equal(read_image(datastore_copy / "labels" / "final" / "torso_3mm.nii.gz").array, ok.array)


def test_a_streamed_upload_is_cut_at_the_limit_not_spooled_whole(monkeypatch):
    """No Content-Length (chunked): the app stops reading past the limit (1 MB); it used to read all 200 MB.

    In process, through the server's whole ASGI stack (middleware, route, form parser), counting what it reads."""
    from labelfactory.tasks.server import app

    monkeypatch.setenv("LABELFACTORY_MAX_UPLOAD_MB", "1")
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.nii"\r\n\r\n'
    chunks = [head, *[b"\0" * (1 << 16)] * 3200, b"\r\n--b--\r\n"]
    read, sent = [], []

    async def receive():
        read.append(len(chunks[len(read)]))
        return {"type": "http.request", "body": chunks[len(read) - 1], "more_body": len(read) < len(chunks)}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "PUT",
        "scheme": "http",
        "path": "/datastore/image",
        "raw_path": b"/datastore/image",
        "root_path": "",
        "query_string": b"image=big",
        "headers": [(b"content-type", b"multipart/form-data; boundary=b")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    assert start["status"] == 413 and "upload limit (1 MB" in json.loads(body)["detail"]
    assert sum(read) < 2 << 20, f"the app read {sum(read) >> 20} MB of a body over its 1 MB limit"


def _put_session(url, files, **params):
    return requests.put(f"{url}/session/", params=params, files=[("files", f) for f in files], timeout=60)


@pytest.mark.slow
def test_session_uploads_are_bounded_unpacked_in_place_and_removed(server, tmp_path):
    """Slicer sends a local volume as a session: kept as sent; too big 413; an archive may not write outside."""
    url, image, server_tmp = server.url, server.studies / "torso_3mm.nii.gz", server.tmp
    r = _put_session(url, [(image.name, image.read_bytes())])
    assert r.status_code == 200, r.text
    got = requests.get(f"{url}/session/{r.json()['session_id']}", params={"image": True}, timeout=60)
    assert got.status_code == 200 and got.content == image.read_bytes()

    big = np.random.default_rng(0).integers(-1000, 1000, (40, 128, 128)).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(big), str(tmp_path / "big.nii"))
    halves = [("a.nii", b"x" * 600_000), ("b.nii", b"x" * 600_000)]  # each under the 1 MB limit, together over
    assert _put_session(url, [("big.nii", (tmp_path / "big.nii").read_bytes())]).status_code == 413
    assert _put_session(url, halves).status_code == 413

    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        tar.add(image, arcname="../../escaped.nii.gz")
    r = _put_session(url, [("evil.tar", (tmp_path / "evil.tar").read_bytes())], uncompress=True)
    assert r.status_code == 400 and "unpacks safely" in r.json()["detail"]
    assert not list(tmp_path.rglob("escaped.nii.gz"))
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    r = _put_session(url, [("empty.tar", (tmp_path / "empty.tar").read_bytes())], uncompress=True)
    assert r.status_code == 400 and "holds no files" in r.json()["detail"]
    with zipfile.ZipFile(tmp_path / "series.zip", "w") as z:
        z.write(image, arcname="series/torso.nii.gz")
    r = _put_session(url, [("series.zip", (tmp_path / "series.zip").read_bytes())], uncompress=True)
    assert r.status_code == 200, r.text
    assert (Path(r.json()["session_info"]["image"]) / "series" / "torso.nii.gz").read_bytes() == image.read_bytes()
    assert _uploads_left(server_tmp) == [] and requests.get(f"{url}/info/", timeout=30).status_code == 200


@pytest.mark.slow
def test_slicer_seg_nrrd_and_label_info_are_mapped_by_name(server, tmp_path):
    datastore_copy = server.studies
    ok = read_image(datastore_copy / "labels" / "final" / "torso_3mm.nii.gz")
    # Slicer numbers segments 1..n in its own order: liver=3, aorta=1 here
    arr = np.zeros_like(ok.array)
    arr[ok.array == LABEL_NAMES["liver"]] = 3
    arr[ok.array == LABEL_NAMES["aorta"]] = 1
    p = write_seg_nrrd(ok.with_array(arr), tmp_path / "torso.seg.nrrd", {"aorta": 1, "liver": 3})
    r = _put_label(
        server.url, "torso_3mm", p, {"label_info": [{"name": "aorta", "idx": 1}, {"name": "liver", "idx": 3}]}
    )
    assert r.status_code == 200, r.text
    saved = read_image(datastore_copy / "labels" / "final" / "torso_3mm.nii.gz").array
    assert np.array_equal(saved == LABEL_NAMES["liver"], ok.array == LABEL_NAMES["liver"])
    assert np.array_equal(saved == LABEL_NAMES["aorta"], ok.array == LABEL_NAMES["aorta"])
    assert set(np.unique(saved)) == {0, LABEL_NAMES["liver"], LABEL_NAMES["aorta"]}


def test_nifti_with_nan_or_inf_voxels_is_refused(tmp_path):
    arr = np.zeros((4, 8, 8), np.float32)
    arr[1, 2, 3], arr[2, 0, 0] = np.nan, np.inf
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "itk.nii.gz"))
    nib.save(nib.Nifti1Image(arr.T.astype(np.float64), np.eye(4)), tmp_path / "nib.nii")
    for name in ("itk.nii.gz", "nib.nii"):
        with pytest.raises(LabelFactoryError, match="2 voxels are NaN or infinite"):
            read_image(tmp_path / name)


def test_a_nii_gz_is_decompressed_once(sample, monkeypatch):
    """Its header (the first 540 bytes), then its voxels once, and ITK reads the inflated bytes."""
    inflated, itk_read = [], []
    real_inflate, real_read = image_io.inflate_bounded, image_io.sitk.ReadImage
    monkeypatch.setattr(
        image_io, "inflate_bounded", lambda p, o, limit, *a: inflated.append(limit) or real_inflate(p, o, limit, *a)
    )
    monkeypatch.setattr(image_io.sitk, "ReadImage", lambda path, *a: itk_read.append(str(path)) or real_read(path, *a))
    img = read_image(sample / "datastore" / "torso_3mm.nii.gz")
    assert inflated[0] == image_io.NIFTI_HEADER_BYTES and len(inflated) == 2
    assert inflated[1] == 352 + img.array.size * img.array.dtype.itemsize
    assert len(itk_read) == 1 and not itk_read[0].endswith(".gz"), "ITK must read the inflated bytes"
    assert img.array.shape == sitk.GetArrayFromImage(real_read(str(sample / "datastore" / "torso_3mm.nii.gz"))).shape


@pytest.mark.slow
def test_contoured_organs_outside_the_label_map_are_400_naming_the_valid_ones(server):
    final = server.studies / "labels" / "final" / "torso_3mm.nii.gz"
    before = final.read_bytes()
    r = _put_label(server.url, "torso_3mm", final, {"contoured": ["liver", "brainstem"]})
    assert r.status_code == 400 and "'brainstem'" in r.json()["detail"] and "left kidney" in r.json()["detail"]
    r = requests.put(
        f"{server.url}/datastore/label/info",
        params={"label": "torso_3mm", "tag": "final"},
        data={"info": json.dumps({"contoured": "liver"})},
        timeout=60,
    )
    assert r.status_code == 400 and "list of organ names" in r.json()["detail"]
    assert final.read_bytes() == before
