"""No request corrupts the datastore: writes are all or nothing, labels fit their image, provenance and expert
labels cannot be forged or overwritten, and infers read only ids, the server's own uploads and sessions.

Unit tests drive `LabelFactoryDatastore` directly (fast); the server tests share one real server
(module-scoped, demo models installed) and speak to it as Slicer and MONAI Label's client do.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel.interfaces.exception import ImageNotFoundException

from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image, read_image, write_image
from labelfactory.labels import LABEL_NAMES
from labelfactory.latent_record import LATENT_KEY
from labelfactory.tasks import datastore as ds_module
from labelfactory.tasks.datastore import MODEL_KEY, LabelFactoryDatastore, check_id
from tests.conftest import module_server

RECORD = {"seed": 4, "truncation_psi": 0.7, "w": [0.5] * 8, "generator": "g1"}
GRID_2D = ((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))


def _open(folder) -> LabelFactoryDatastore:
    return LabelFactoryDatastore(str(folder), extensions=["*.nii.gz"], auto_reload=False)


def _write(tmp_path, name, array, geometry=GRID_2D) -> Path:
    return write_image(Image(array, *geometry), tmp_path / name)


def _label_of(folder, image_id, tag="final") -> Path:
    return folder / "labels" / tag / f"{image_id}.nii.gz"


@pytest.fixture
def ds(datastore_copy) -> LabelFactoryDatastore:
    return _open(datastore_copy)


# ---- all or nothing ----


@pytest.mark.parametrize("bad", [{"a": math.nan}, {"a": math.inf}, {"deep": json.loads("[" * 400 + "]" * 400)}])
def test_info_that_is_not_strict_json_is_refused_and_changes_nothing(ds, datastore_copy, bad):
    before = (datastore_copy / "datastore_v2.json").read_bytes()
    with pytest.raises(LabelFactoryError) as e:
        ds.update_image_info("torso_3mm", bad)
    assert e.value.status == 400
    assert (datastore_copy / "datastore_v2.json").read_bytes() == before
    ds.update_image_info("torso_3mm", {"note": "ok"})  # later writes and listings work
    assert json.dumps(ds.json(), allow_nan=False) and ds.get_image_info("torso_3mm")["note"] == "ok"
    assert set(bad) & set(ds.get_image_info("torso_3mm")) == set()


def _index_writes_fail(monkeypatch):
    """Every rename onto the index fails (a full disk at the last step); other files are written as usual."""
    replace = os.replace

    def failing(src, dst, *args, **kwargs):
        if os.fspath(dst).endswith(ds_module.INDEX):
            raise OSError(28, "No space left on device")
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)


def test_a_failed_index_write_is_rolled_back_in_memory(ds, datastore_copy, monkeypatch):
    _index_writes_fail(monkeypatch)
    with pytest.raises(OSError):
        ds.update_image_info("torso_3mm", {"note": "lost"})
    monkeypatch.undo()
    assert "note" not in ds.get_image_info("torso_3mm"), "the index in memory kept a change the disk never got"
    ds.update_image_info("abdomen", {"note": "kept"})
    assert "note" not in _open(datastore_copy).get_image_info("torso_3mm")
    assert _open(datastore_copy).get_image_info("abdomen")["note"] == "kept"


def test_a_label_whose_index_write_fails_leaves_the_old_label(ds, datastore_copy, tmp_path, monkeypatch):
    label = _label_of(datastore_copy, "torso_3mm")
    old = label.read_bytes()
    new = read_image(label)
    new = _write(tmp_path, "new.nii.gz", np.zeros_like(new.array), (new.spacing, new.origin, new.direction))
    _index_writes_fail(monkeypatch)
    with pytest.raises(OSError):
        ds.save_label("torso_3mm", str(new), "final", {})
    monkeypatch.undo()
    assert label.read_bytes() == old and not list(label.parent.glob(".*.tmp"))
    on_disk = _open(datastore_copy).get_label_info("torso_3mm", "final")
    assert ds.get_label_info("torso_3mm", "final") == on_disk


# ---- labels checked against their image ----


@pytest.fixture
def flat(ds, tmp_path) -> str:
    """A 2D image (8 x 12) in the datastore."""
    return ds.add_image("flat", str(_write(tmp_path, "flat.nii.gz", np.zeros((8, 12), np.int16))), {})


def test_a_label_of_another_shape_is_refused_never_reshaped(ds, flat, tmp_path):
    p = _write(tmp_path, "l.nii.gz", np.zeros((12, 8), np.uint8))  # the same 96 voxels
    with pytest.raises(LabelFactoryError, match="shape"):
        ds.save_label(flat, str(p), "final", {})
    assert not ds.get_labels_by_image_id(flat)


def test_a_one_slice_volume_is_the_label_of_a_2d_image_and_gets_its_geometry(ds, flat, tmp_path, datastore_copy):
    arr = np.zeros((1, 8, 12), np.uint8)
    arr[0, 2, 3] = LABEL_NAMES["liver"]
    p = _write(tmp_path, "slicer.nii.gz", arr, ((1.0, 1.0, 3.0), (0.0, 0.0, -40.0), tuple(np.eye(3).ravel())))
    ds.save_label(flat, str(p), "final", {})
    saved = read_image(_label_of(datastore_copy, flat))
    assert saved.array.shape == (8, 12) and saved.array[2, 3] == LABEL_NAMES["liver"]
    assert saved.spacing == (1.0, 1.0) and saved.origin == (0.0, 0.0)


def test_label_values_are_checked_before_any_cast(ds, flat, tmp_path):
    arr = np.zeros((8, 12), np.int64)
    arr[0, 0] = 2**32 + LABEL_NAMES["spleen"]  # an int32 cast would make it spleen
    with pytest.raises(LabelFactoryError, match=str(2**32 + LABEL_NAMES["spleen"])):
        ds.save_label(flat, str(_write(tmp_path, "big.nii.gz", arr)), "final", {})
    assert not ds.get_labels_by_image_id(flat)


@pytest.mark.parametrize(
    "geometry, what",
    [
        (((1.0, 1.0), (5.0, 0.0), (1.0, 0.0, 0.0, 1.0)), "origin"),
        (((2.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0)), "spacing"),
        (((1.0, 1.0), (0.0, 0.0), (0.0, 1.0, 1.0, 0.0)), "direction"),
    ],
)
def test_a_label_on_another_grid_is_refused_naming_both(ds, flat, tmp_path, geometry, what):
    p = _write(tmp_path, "moved.nii.gz", np.zeros((8, 12), np.uint8), geometry)
    with pytest.raises(LabelFactoryError) as e:
        ds.save_label(flat, str(p), "final", {})
    assert e.value.status == 400 and f"label {what}" in str(e.value) and "image's" in str(e.value)


def test_ids_and_tags_ending_in_a_newline_are_refused(ds, flat, tmp_path):
    for bad in ("torso_3mm\n", "a\nb"):
        with pytest.raises(LabelFactoryError):
            check_id(bad)
    p = _write(tmp_path, "l.nii.gz", np.zeros((8, 12), np.uint8))
    with pytest.raises(LabelFactoryError, match="label tag"):
        ds.save_label(flat, str(p), "final\n", {})


def _seg_nrrd(tmp_path, arr, fields: dict[str, str]) -> Path:
    """A .seg.nrrd of `arr` on GRID_2D's plane (one slice), with Slicer's segment header fields as given."""
    import nrrd

    path = tmp_path / "s.seg.nrrd"
    header = {"space": "left-posterior-superior", "space directions": np.eye(3), "space origin": np.zeros(3)}
    nrrd.write(str(path), arr[None], {**header, **fields}, index_order="C")
    return path


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"Segment0_Name": "liver", "Segment0_LabelValue": "x"}, "Segment0_LabelValue='x'"),
        ({"Segment0_Name": "liver", "Segment0_LabelValue": "1.5"}, "Segment0_LabelValue='1.5'"),
        ({"Segment0_Name": "liver", "Segment0_LabelValue": "1", "Segment0_Layer": "5"}, "layer 5"),
    ],
)
def test_a_seg_nrrd_with_odd_segment_fields_is_refused_naming_the_field(ds, flat, tmp_path, fields, words):
    """A LabelValue that is no whole number, or a Layer the file lacks, was a ValueError / IndexError: a 500."""
    p = _seg_nrrd(tmp_path, np.ones((8, 12), np.uint8), fields)
    with pytest.raises(LabelFactoryError) as e:
        ds.save_label(flat, str(p), "final", {})
    assert e.value.status == 400 and words in str(e.value), str(e.value)
    assert not ds.get_labels_by_image_id(flat)


@pytest.mark.parametrize("label_info", [5, True, [{"name": "liver", "idx": True}]])
def test_label_info_that_is_not_a_list_of_segments_is_refused(ds, flat, tmp_path, label_info):
    """label_info 5 or true was iterated (a TypeError: a 500); idx true passed for segment 1."""
    p = _write(tmp_path, "l.nii.gz", np.ones((8, 12), np.uint8))
    with pytest.raises(LabelFactoryError, match="label_info must be a list"):
        ds.save_label(flat, str(p), "final", {"label_info": label_info})
    assert not ds.get_labels_by_image_id(flat)


def test_complex_voxels_are_refused_as_image_and_label(ds, flat, tmp_path):
    """A complex NIfTI was stored as an image (a model could not read it) and as a label was a TypeError: a 500."""
    import nibabel

    for name, shape in (("c_image.nii.gz", (12, 8)), ("c_label.nii.gz", (12, 8))):
        nibabel.save(nibabel.Nifti1Image(np.zeros(shape, np.complex64), np.eye(4)), str(tmp_path / name))
    with pytest.raises(LabelFactoryError, match="complex64 voxels are not intensities"):
        ds.add_image("complex", str(tmp_path / "c_image.nii.gz"), {})
    with pytest.raises(LabelFactoryError, match="complex64 voxels are not intensities"):
        ds.save_label(flat, str(tmp_path / "c_label.nii.gz"), "final", {})
    assert "complex" not in ds.list_images() and not ds.get_labels_by_image_id(flat)


# ---- a label never outlives or changes image ----


def test_a_label_for_an_image_deleted_meanwhile_is_never_written(ds, flat, tmp_path, datastore_copy, monkeypatch):
    read_label = ds_module.read_label

    def deleted_while_checking(*args, **kwargs):
        label = read_label(*args, **kwargs)
        _open(datastore_copy).remove_image(flat)  # another request deletes the image meanwhile
        return label

    monkeypatch.setattr(ds_module, "read_label", deleted_while_checking)
    with pytest.raises(ImageNotFoundException):
        ds.save_label(flat, str(_write(tmp_path, "l.nii.gz", np.zeros((8, 12), np.uint8))), "final", {})
    assert not _label_of(datastore_copy, flat).exists()
    # a label file left behind (by an older server) never attaches to the next image under that id
    monkeypatch.undo()
    _label_of(datastore_copy, flat).write_bytes(_label_of(datastore_copy, "torso_3mm").read_bytes())
    ds.add_image(flat, str(_write(tmp_path, "flat.nii.gz", np.ones((8, 12), np.int16))), {})
    assert ds.get_labels_by_image_id(flat) == {} and not _label_of(datastore_copy, flat).exists()
    assert _open(datastore_copy).get_labels_by_image_id(flat) == {}


def test_a_label_for_an_image_deleted_right_after_its_lookup_is_404(ds, flat, tmp_path, datastore_copy, monkeypatch):
    """Found by 108 concurrent saves and deletes: the image's file gone between the lookup and the read was a
    FileNotFoundError (a 500)."""
    require_image = ds.require_image

    def deleted_after_lookup(image_id):
        path = require_image(image_id)
        _open(datastore_copy).remove_image(image_id)  # another request deletes the image meanwhile
        return path

    monkeypatch.setattr(ds, "require_image", deleted_after_lookup)
    with pytest.raises(ImageNotFoundException):
        ds.save_label(flat, str(_write(tmp_path, "l.nii.gz", np.zeros((8, 12), np.uint8))), "final", {})
    assert not _label_of(datastore_copy, flat).exists()


def test_reuploading_an_image_keeps_its_labels_on_the_same_grid_else_needs_discard(ds, datastore_copy, tmp_path):
    image = read_image(datastore_copy / "torso_3mm.nii.gz")
    label = _label_of(datastore_copy, "torso_3mm")
    before = label.read_bytes()
    brighter = write_image(image.with_array(image.array + 1), tmp_path / "torso_3mm.nii.gz")
    ds.add_image("torso_3mm", str(brighter), {})
    assert ds.get_labels_by_image_id("torso_3mm") and label.read_bytes() == before
    cropped = write_image(Image(image.array[:10], image.spacing, image.origin, image.direction), tmp_path / "c.nii.gz")
    with pytest.raises(LabelFactoryError, match="discard_labels") as e:
        ds.add_image("torso_3mm", str(cropped), {})
    assert e.value.status == 409 and read_image(datastore_copy / "torso_3mm.nii.gz").array.shape == image.array.shape
    ds.add_image("torso_3mm", str(cropped), {"discard_labels": True})
    assert ds.get_labels_by_image_id("torso_3mm") == {} and not label.exists()
    assert "discard_labels" not in ds.get_image_info("torso_3mm")


# ---- provenance only from the server's own synthesis ----


def test_provenance_is_never_taken_from_a_client(ds, datastore_copy, tmp_path):
    p = _write(tmp_path, "real.nii.gz", np.zeros((8, 8), np.int16))
    for call in (
        lambda: ds.add_image("real", str(p), {LATENT_KEY: RECORD}),
        lambda: ds.update_image_info("torso_3mm", {LATENT_KEY: RECORD}),
        lambda: ds.update_label_info("torso_3mm", "final", {LATENT_KEY: RECORD}),
        lambda: ds.save_label("torso_3mm", str(_label_of(datastore_copy, "torso_3mm")), "final", {MODEL_KEY: "x"}),
    ):
        with pytest.raises(LabelFactoryError, match="may not set"):
            call()
    assert LATENT_KEY not in ds.get_image_info("torso_3mm") and "real" not in ds.list_images()


def test_a_real_image_over_a_generated_id_drops_its_provenance(ds, datastore_copy, tmp_path):
    p = _write(tmp_path, "g.nii.gz", np.zeros((8, 8), np.int16))
    ds.add_image("gen_seed000004", str(p), {"uncertainty": 0.5}, latent=RECORD)
    assert ds.get_image_info("gen_seed000004")[LATENT_KEY] == RECORD
    ds.add_image("gen_seed000004", str(p), {})
    assert LATENT_KEY not in ds.get_image_info("gen_seed000004")
    assert LATENT_KEY not in _open(datastore_copy).get_image_info("gen_seed000004")


# ---- expert labels never overwritten by a model ----


def test_a_model_label_goes_only_where_no_annotator_label_is(ds, datastore_copy, tmp_path):
    label = _label_of(datastore_copy, "torso_3mm")
    before = label.read_bytes()
    with pytest.raises(LabelFactoryError, match="annotator") as e:
        ds.save_label("torso_3mm", str(label), "final", {"model": "segmentation"}, by_model="segmentation")
    assert e.value.status == 409 and label.read_bytes() == before
    for tag in ("original", "draft", "draft"):  # the model's own tag; a free tag, then its own label there again
        ds.save_label("torso_3mm", str(label), tag, {"model": "segmentation"}, by_model="segmentation")
        assert ds.get_label_info("torso_3mm", tag)[MODEL_KEY] == "segmentation"
    ds.save_label("torso_3mm", str(label), "draft", {})  # an annotator's label now holds it
    with pytest.raises(LabelFactoryError, match="annotator"):
        ds.save_label("torso_3mm", str(label), "draft", {}, by_model="segmentation")


# ---- through a real server ----


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    (root / "server-tmp").mkdir()
    env = {"TMPDIR": str(root / "server-tmp"), "MONAI_LABEL_SESSION_PATH": str(root / "sessions")}
    with module_server(root, {"models": "all", "skip_scoring": "true", "skip_strategies": "true"}, env) as srv:
        srv.tmp = root / "server-tmp"
        yield srv


def _put_label(url, image_id, path, params=None, tag="final"):
    return requests.put(
        f"{url}/datastore/label",
        params={"image": image_id, "tag": tag},
        files={"label": (Path(path).name, Path(path).read_bytes())},
        data={"params": json.dumps(params or {})},
        timeout=120,
    )


def _put_image(url, image_id, path, params=None):
    return requests.put(
        f"{url}/datastore/image",
        params={"image": image_id},
        files={"file": (Path(path).name, Path(path).read_bytes())},
        data={"params": json.dumps(params or {})},
        timeout=120,
    )


def _infer(url, image="", params=None, **query):
    return requests.post(
        f"{url}/infer/segmentation",
        params={"image": image, "output": "json", **query},
        data={"params": json.dumps(params or {})},
        timeout=600,
    )


def _listing_works(url):
    r = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
def test_server_refuses_writes_that_would_poison_the_datastore(server, tmp_path):
    url = server.url
    label = server.studies / "labels" / "final" / "abdomen.nii.gz"
    r = _put_label(url, "abdomen", label, {"a": math.nan})  # a NaN in params: the form's JSON allows it
    assert r.status_code == 400, r.text
    r = requests.put(
        f"{url}/datastore/image/info", params={"image": "abdomen"}, data={"info": "[" * 400 + "]" * 400}, timeout=60
    )
    assert r.status_code == 400
    r = requests.put(
        f"{url}/datastore/image/info",
        params={"image": "abdomen"},
        data={"info": json.dumps({"deep": json.loads("[" * 400 + "]" * 400)})},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert "deep" not in _listing_works(url)["objects"]["abdomen"]["image"]["info"]
    assert _put_label(url, "abdomen", label).status_code == 200
    assert MONAILabelClient(url).datastore()["objects"]["abdomen"]["labels"]["final"]


@pytest.mark.slow
def test_server_keeps_labels_with_their_image(server, tmp_path):
    url = server.url
    flat = _write(tmp_path, "flat.nii.gz", np.zeros((8, 12), np.int16))
    label = _write(tmp_path, "l.nii.gz", np.zeros((8, 12), np.uint8))
    assert _put_image(url, "flat2d", flat).status_code == 200
    assert requests.delete(f"{url}/datastore/", params={"id": "flat2d"}, timeout=60).status_code == 200
    r = _put_label(url, "flat2d", label)
    assert r.status_code == 404 and not _label_of(server.studies, "flat2d").exists()
    assert _put_image(url, "flat2d", flat).status_code == 200
    assert not _listing_works(url)["objects"]["flat2d"]["labels"], "a label never attaches to a later image"

    assert _put_label(url, "flat2d", label).status_code == 200
    assert _put_image(url, "flat2d", _write(tmp_path, "b.nii.gz", np.ones((8, 12), np.int16))).status_code == 200
    assert _listing_works(url)["objects"]["flat2d"]["labels"]["final"], "same grid: the labels stay"
    other = _write(tmp_path, "o.nii.gz", np.ones((12, 8), np.int16))
    r = _put_image(url, "flat2d", other)
    assert r.status_code == 409 and "discard_labels" in r.json()["detail"]
    assert _put_image(url, "flat2d", other, {"discard_labels": True}).status_code == 200
    assert not _listing_works(url)["objects"]["flat2d"]["labels"]

    for bad, what in (
        (np.zeros((8, 12), np.uint8), "shape"),  # 96 voxels, like the image's 12 x 8
        (np.full((12, 8), 2**32 + 3, np.int64), str(2**32 + 3)),
    ):
        r = _put_label(url, "flat2d", _write(tmp_path, "bad.nii.gz", bad))
        assert r.status_code == 400 and what in r.json()["detail"], r.text
    moved = _write(tmp_path, "m.nii.gz", np.zeros((12, 8), np.uint8), ((1.0, 1.0), (0.0, 7.5), (1, 0, 0, 1)))
    r = _put_label(url, "flat2d", moved)
    assert r.status_code == 400 and "origin (0, 7.5)" in r.json()["detail"] and "(0, 0)" in r.json()["detail"]
    r = _put_label(url, "flat2d\n", _write(tmp_path, "ok.nii.gz", np.zeros((12, 8), np.uint8)))
    assert r.status_code == 400
    assert not _listing_works(url)["objects"]["flat2d"]["labels"]


@pytest.mark.slow
def test_server_takes_provenance_from_no_client(server, tmp_path):
    url = server.url
    real = _write(tmp_path, "real.nii.gz", np.zeros((8, 8), np.int16))
    r = _put_image(url, "patient7", real, {LATENT_KEY: RECORD})
    assert r.status_code == 400 and LATENT_KEY in r.json()["detail"]
    r = requests.put(
        f"{url}/datastore/image/info",
        params={"image": "torso_3mm"},
        data={"info": json.dumps({LATENT_KEY: RECORD})},
        timeout=60,
    )
    assert r.status_code == 400
    assert _infer(url, "torso_3mm", {LATENT_KEY: RECORD}).status_code == 400
    info = requests.get(f"{url}/datastore/image/info", params={"image": "torso_3mm"}, timeout=60).json()
    assert LATENT_KEY not in info and "patient7" not in _listing_works(url)["objects"]


@pytest.mark.slow
def test_server_infers_only_on_ids_uploads_and_sessions(server, tmp_path):
    url = server.url
    stray = Path(tempfile.mkdtemp(dir=server.tmp)) / "stray.nii.gz"
    shutil.copy(server.studies / "torso_3mm.nii.gz", stray)
    planted = server.tmp / "lf-upload-planted.nii.gz"  # the upload prefix, but no upload of this server
    shutil.copy(server.studies / "torso_3mm.nii.gz", planted)
    for image, params in ((str(stray), {}), (str(planted), {}), ("torso_3mm", {"image": str(stray)})):
        r = _infer(url, image, params)
        assert r.status_code == 400, (image, params, r.text)
    image = server.studies / "torso_3mm.nii.gz"
    session = requests.put(f"{url}/session/", files=[("files", (image.name, image.read_bytes()))], timeout=60)
    assert session.status_code == 200, session.text
    r = _infer(url, session_id=session.json()["session_id"])
    assert r.status_code == 200, r.text
    assert _infer(url, session_id="no-such-session").status_code == 404


@pytest.mark.slow
def test_server_infer_never_overwrites_an_expert_label(server):
    url, label = server.url, _label_of(server.studies, "torso_3mm")
    before = label.read_bytes()
    r = _infer(url, "torso_3mm", {"save_label": True, "label_tag": "final"})
    assert r.status_code == 409 and "annotator" in r.json()["detail"], r.text
    assert label.read_bytes() == before
    r = _infer(url, "torso_3mm", {"save_label": True})  # the model's own tag, MONAI Label's default
    assert r.status_code == 200, r.text
    info = requests.get(f"{url}/datastore/label/info", params={"label": "torso_3mm", "tag": "original"}, timeout=60)
    assert info.status_code == 200 and info.json()[MODEL_KEY] == "segmentation"
    assert label.read_bytes() == before


@pytest.mark.slow
def test_a_server_killed_while_replacing_an_image_never_attaches_its_old_labels(
    datastore_copy, app_copy, start_server, tmp_path
):
    """Killed at the index write of a re-upload that discards labels: the new image is stored, the old labels are
    gone (moved aside first), and none of them attaches to the new image after the restart."""
    from tests.test_crash_safety import _killer_env, _wait_dead

    image = read_image(datastore_copy / "torso_3mm.nii.gz")
    cropped = write_image(Image(image.array[:10], image.spacing, image.origin, image.direction), tmp_path / "c.nii.gz")
    env, flag = _killer_env(tmp_path, datastore_copy, "*datastore_v2.json*")
    conf = {"models": "all", "skip_scoring": "true"}
    srv = start_server(datastore_copy, app_copy, conf=conf, env=env)
    flag.touch()
    with pytest.raises(requests.ConnectionError):
        _put_image(srv.url, "torso_3mm", cropped, {"discard_labels": True})
    _wait_dead(srv)
    srv = start_server(datastore_copy, app_copy, conf=conf)
    stored = read_image(datastore_copy / "torso_3mm.nii.gz").array.shape
    labels = _listing_works(srv.url)["objects"]["torso_3mm"]["labels"]
    assert stored == (10, *image.array.shape[1:]) and labels == {}, (stored, labels)
    assert not _label_of(datastore_copy, "torso_3mm").exists()
    assert _listing_works(srv.url)["objects"]["abdomen"]["labels"]["final"], "other images keep theirs"


@pytest.mark.slow
def test_server_dataset_download_leaves_no_archive_behind(server):
    """GET /datastore/dataset left a copy of every labelled image in the temp folder, each time: a disk filler."""
    import zipfile
    from io import BytesIO

    before = set(server.tmp.iterdir())
    for _ in range(2):
        r = requests.get(f"{server.url}/datastore/dataset", timeout=120)
        assert r.status_code == 200, r.text
        with zipfile.ZipFile(BytesIO(r.content)) as z:
            assert "image/torso_3mm.nii.gz" in z.namelist() and "metadata.json" in z.namelist()
    left = [p.name for p in set(server.tmp.iterdir()) - before if p.is_file()]
    assert not left, f"archives left in the server's temp folder: {left}"
