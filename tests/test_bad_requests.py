"""Bad requests to a real server get a 4xx with a message, and the server stays up."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from labelfactory.io import read_image, write_image, write_seg_nrrd
from labelfactory.labels import LABEL_NAMES

pytestmark = pytest.mark.slow


@pytest.fixture
def server(datastore_copy, app_copy, start_server):
    return start_server(datastore_copy, app_copy, conf={"models": "all"})


def _put_label(url, image_id, path, params=None):
    with open(path, "rb") as f:
        return requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": "final"}, files={"label": (path.name, f)}, data={"params": json.dumps(params or {})}, timeout=60)


def test_bad_requests_are_4xx_and_the_server_stays_up(server, datastore_copy, tmp_path):
    url = server.url
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
    r = requests.put(f"{url}/datastore/", params={"image": "new_study"}, files={"file": ("junk.nii.gz", junk.read_bytes())}, timeout=60)
    assert r.status_code == 400
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False), str(tmp_path / "t4.nii.gz"))
    r = requests.put(f"{url}/datastore/", params={"image": "four_d"}, files={"file": ("t4.nii.gz", (tmp_path / "t4.nii.gz").read_bytes())}, timeout=60)
    assert r.status_code == 400 and "4D" in r.json()["detail"]

    # infer on an id that is a path on the server's disk
    r = requests.post(f"{url}/infer/segmentation", params={"image": "/etc/passwd"}, timeout=60)
    assert r.status_code in (400, 404)

    # nothing above was stored, and the server still answers
    assert requests.get(f"{url}/info/", timeout=30).status_code == 200
    ds = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()
    assert "new_study" not in ds["objects"] and "four_d" not in ds["objects"]
    assert np.array_equal(read_image(datastore_copy / "labels" / "final" / "torso_3mm.nii.gz").array, ok.array)


def test_slicer_seg_nrrd_and_label_info_are_mapped_by_name(server, datastore_copy, tmp_path):
    ok = read_image(datastore_copy / "labels" / "final" / "torso_3mm.nii.gz")
    # Slicer numbers segments 1..n in its own order: liver=3, aorta=1 here
    arr = np.zeros_like(ok.array)
    arr[ok.array == LABEL_NAMES["liver"]] = 3
    arr[ok.array == LABEL_NAMES["aorta"]] = 1
    p = write_seg_nrrd(ok.with_array(arr), tmp_path / "torso.seg.nrrd", {"aorta": 1, "liver": 3})
    r = _put_label(server.url, "torso_3mm", p, {"label_info": [{"name": "aorta", "idx": 1}, {"name": "liver", "idx": 3}]})
    assert r.status_code == 200, r.text
    saved = read_image(datastore_copy / "labels" / "final" / "torso_3mm.nii.gz").array
    assert np.array_equal(saved == LABEL_NAMES["liver"], ok.array == LABEL_NAMES["liver"])
    assert np.array_equal(saved == LABEL_NAMES["aorta"], ok.array == LABEL_NAMES["aorta"])
    assert set(np.unique(saved)) == {0, LABEL_NAMES["liver"], LABEL_NAMES["aorta"]}
