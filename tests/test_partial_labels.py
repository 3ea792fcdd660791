"""Partial labels: which organs a label contains travels from OpenKBP's structure files and the datastore's label
info to every training item's `contoured` flags (docs/DESIGN.md "Partial labels")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from labelfactory.cli import main
from labelfactory.datasets import openkbp
from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image, write_image
from labelfactory.io.dataset import find_studies
from labelfactory.labels import CONTOURED_KEY, LABEL_NAMES, OPENKBP, check_contoured, contoured_flags, contoured_names
from labelfactory.segmentation.data import (
    PairConcat,
    PairSubset,
    RealSlices,
    case_slices_set,
    real_slices,
    synthetic_pairs,
)
from labelfactory.tasks.datastore import LabelFactoryDatastore, final_studies

KBP = OPENKBP.values  # background 0, brainstem 1, ..., mandible 7


# ---- names <-> flags ----


def test_contoured_names_become_flags_indexed_by_label_value_and_back():
    flags = contoured_flags(["Mandible", "brainstem"], KBP)
    assert flags.tolist() == [True, True, False, False, False, False, False, True]
    assert contoured_names(flags, KBP) == ["brainstem", "mandible"]  # the map's spelling and order
    assert contoured_flags(None, KBP).all() and len(contoured_flags(None, KBP)) == 8  # no list: every organ
    assert contoured_flags([], KBP).tolist() == [True] + [False] * 7  # background is always known


def test_unknown_organ_names_are_refused_with_the_valid_ones_named():
    with pytest.raises(LabelFactoryError) as e:
        check_contoured(["brainstem", "heart"], KBP)
    assert e.value.status == 400 and "'heart'" in str(e.value) and "spinal cord" in str(e.value)
    with pytest.raises(LabelFactoryError) as e:
        check_contoured("brainstem", KBP)  # a string is not a list of names
    assert e.value.status == 400 and "list of organ names" in str(e.value)
    with pytest.raises(LabelFactoryError):
        check_contoured(["background"], KBP)  # background is not an organ one contours


# ---- OpenKBP: the structure files a patient has ----


def _openkbp_like(root, organs_present: str) -> None:
    """One 3-slice patient: body on every slice, brainstem (1) and mandible (7) drawn, `organs_present` in cases.csv."""
    (root / "volumes").mkdir(parents=True)
    ct = np.full((3, 16, 16), -1000, np.int16)
    ct[:, 4:12, 4:12] = 40
    label = np.zeros(ct.shape, np.uint8)
    label[:, 5:7, 5:7] = 1
    label[1, 9:11, 9:11] = 7
    for name, arr in (("ct", ct), ("label", label), ("ptv", np.zeros_like(label))):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(root / "volumes" / f"train_pt_1_{name}.nii.gz"))
    (root / "cases.csv").write_text(
        "case,split,spacing_x_mm,spacing_y_mm,spacing_z_mm,organs_present\n"
        f"train_pt_1,train,4.0,4.0,2.5,{organs_present}\n"
    )


def test_openkbp_flags_come_from_the_structures_contoured_and_reach_every_slice(tmp_path):
    _openkbp_like(tmp_path, "Brainstem;Mandible")
    [case] = openkbp.read_cases(tmp_path, "train")
    cs = openkbp.load_case(case, size=8)
    assert cs.contoured.tolist() == [True, True, False, False, False, False, False, True]
    data = case_slices_set([cs])
    assert len(data) == 3 and data.groups == ["train_pt_1"] * 3
    item = data[1]
    assert item["label"].dtype == torch.int64 and item["label"].shape == (1, 8, 8)
    assert set(item["label"].unique().tolist()) == {0, 1, 7}
    assert torch.equal(item["contoured"], cs.contoured)


# ---- training items ----


def test_real_slices_default_to_all_contoured_and_subsets_and_mixes_keep_the_flags(tmp_path, make_pairs):
    masks = torch.tensor([[[0, 1], [2, 0]], [[0, 0], [1, 1]]], dtype=torch.uint8)
    images = torch.zeros(2, 1, 2, 2)
    whole = RealSlices(images, masks, ["a", "b"], classes=4)
    assert whole[0]["contoured"].tolist() == [True] * 4 and whole[0]["label"].dtype == torch.int64
    partial = RealSlices(images, masks, ["a", "b"], torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool))
    assert PairSubset(partial, [1])[0]["contoured"].tolist() == [True, True, False, False]
    synthetic = synthetic_pairs(make_pairs(tmp_path / "syn", 2, size=8), size=8)
    assert synthetic[0]["contoured"].tolist() == [True] * (max(LABEL_NAMES.values()) + 1)  # annotator labels all
    mix = PairConcat([PairSubset(partial, [0]), RealSlices(images, masks, ["c", "d"], torch.ones(4, dtype=bool))])
    assert [mix[i]["contoured"].tolist() for i in range(3)] == [[True, True, True, False]] + [[True] * 4] * 2
    with pytest.raises(ValueError, match="beyond the 2 classes"):
        RealSlices(images, masks, ["a", "b"], torch.ones(2, dtype=bool))


# ---- datastore: the label info's `contoured` ----


def _datastore(folder):
    """Two 2-slice 16x16 studies, `a` and `b`, in an empty datastore."""
    folder.mkdir()
    grid = ((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    for sid in ("a", "b"):
        write_image(Image(np.zeros((2, 16, 16), np.int16), *grid), folder / f"{sid}.nii.gz")
    label = np.zeros((2, 16, 16), np.uint8)
    label[:, 2:6, 2:6] = LABEL_NAMES["liver"]
    label[:, 8:12, 8:12] = LABEL_NAMES["aorta"]
    return LabelFactoryDatastore(str(folder), extensions=["*.nii.gz"], auto_reload=False), write_image(
        Image(label, *grid), folder.parent / "label.nii.gz"
    )


def test_datastore_keeps_checked_contoured_names_and_trainers_read_them_as_flags(tmp_path):
    ds, label = _datastore(tmp_path / "store")
    ds.save_label("a", str(label), "final", {CONTOURED_KEY: ["Aorta", "liver"]})
    ds.save_label("b", str(label), "final", {})
    assert ds.get_label_info("a", "final")[CONTOURED_KEY] == ["liver", "aorta"]  # the map's spelling and order
    before = (tmp_path / "store" / "datastore_v2.json").read_bytes()
    with pytest.raises(LabelFactoryError) as e:
        ds.update_label_info("b", "final", {CONTOURED_KEY: ["liver", "heart"]})
    assert e.value.status == 400 and "'heart'" in str(e.value) and "spleen" in str(e.value)
    assert (tmp_path / "store" / "datastore_v2.json").read_bytes() == before
    ds.update_label_info("b", "final", {CONTOURED_KEY: ["spleen"]})

    expected = {"a": ("liver", "aorta"), "b": ("spleen",)}
    assert {s.id: s.contoured for s in final_studies(ds)} == expected  # the app's trainer
    assert {s.id: s.contoured for s in find_studies(tmp_path / "store")} == expected  # the CLI, from the index
    data = real_slices(tmp_path / "store", size=16)
    flags = {g: data.contoured[i].tolist() for i, g in enumerate(data.groups)}
    assert flags["a"] == contoured_flags(["liver", "aorta"], LABEL_NAMES).tolist()
    assert flags["b"] == [True, False, True, False, False, False, False, False, False]


def test_add_label_command_saves_the_contoured_organs_and_refuses_unknown_ones(tmp_path, capsys):
    _, label = _datastore(tmp_path / "store")
    store = ["--studies", str(tmp_path / "store")]
    assert main(["add-label", "a", str(label), "--contoured", "liver, aorta", *store]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])[CONTOURED_KEY] == ["liver", "aorta"]
    assert main(["add-label", "b", str(label), "--contoured", "liver,brainstem", *store]) == 2
    err = capsys.readouterr().err
    assert "'brainstem'" in err and "left kidney" in err
    assert [(s.id, s.contoured) for s in find_studies(tmp_path / "store") if s.label] == [("a", ("liver", "aorta"))]
