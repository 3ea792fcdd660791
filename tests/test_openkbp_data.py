"""The bundled OpenKBP sample: its splits, crops that go back where they came from, the converter from its CSVs."""

from __future__ import annotations

import csv
import filecmp

import numpy as np
import pytest
import SimpleITK as sitk

from labelfactory.cli import main
from labelfactory.datasets import openkbp
from labelfactory.datasets.convert_openkbp import PTVS
from tests.conftest import SAMPLE

CASES = SAMPLE / "openkbp" / "cases"
STORE = SAMPLE / "openkbp" / "datastore"


def test_bundled_sample_has_both_splits_and_the_datastore_holds_the_validation_patients():
    train, val = openkbp.read_cases(CASES, "train"), openkbp.read_cases(CASES, "validation")
    assert len(train) == 6 and len(val) == 4
    assert all(c.organs_present == tuple(range(1, 8)) for c in train + val)
    for c in val:  # the same bytes in both layouts, organs and PTVs beside the datastore's CT
        assert filecmp.cmp(c.ct, STORE / f"{c.name}.nii.gz", shallow=False)
        assert filecmp.cmp(c.label, STORE / "organs" / f"{c.name}.nii.gz", shallow=False)
        assert filecmp.cmp(c.ptv, STORE / "ptv" / f"{c.name}.nii.gz", shallow=False)
    with open(STORE / "cases.csv", newline="") as f:
        assert [r["case"] for r in csv.DictReader(f)] == [c.name for c in val]


@pytest.mark.parametrize("case", openkbp.read_cases(CASES), ids=lambda c: c.name)
def test_crops_paste_back_every_organ_voxel_of_the_cropped_slices(case):
    """64 px body crops at native spacing hold every organ voxel of the slices they crop (skipped slices: README)."""
    ct, label = openkbp.read_array(case.ct).astype(np.float32), openkbp.read_array(case.label)
    boxes = openkbp.body_boxes(ct, 64)
    back = openkbp.paste(openkbp.crop(label, boxes, fill=0), boxes, label.shape)
    cropped = np.zeros(label.shape[0], bool)
    cropped[[b.z for b in boxes]] = True
    assert np.array_equal(back[cropped], label[cropped]) and not back[~cropped].any()
    images = openkbp.crop(ct, boxes, fill=-1000.0)
    centre = images[:, 24:40, 24:40]
    assert (centre > openkbp.BODY_HU).mean() > 0.5  # body-centred: the middle of a crop is body


def write_sparse(path, flat: np.ndarray, values: bool) -> None:
    """The OpenKBP CSV format: header ',data', rows 'flat_index,value' (masks: 'flat_index,') for non-zero entries."""
    (index,) = np.nonzero(flat)
    with open(path, "w") as f:
        f.write(",data\n")
        f.writelines(f"{i},{flat[i]:.1f}\n" if values else f"{i},\n" for i in index)


def to_source(volume: np.ndarray) -> np.ndarray:
    """The converter's transform undone: (z, y, x), z superior -> flat C-order (row, column, slice), slice 0 cranial."""
    return np.ascontiguousarray(volume[::-1].transpose(1, 2, 0)).ravel()


def test_converter_turns_a_patients_csv_files_into_the_bundled_volumes(tmp_path):
    case = openkbp.read_cases(CASES, "validation")[0]
    ct, label, ptv = (openkbp.read_array(p) for p in (case.ct, case.label, case.ptv))
    patient = tmp_path / "open-kbp" / "provided-data" / "validation-pats" / case.name.split("_", 1)[1]
    patient.mkdir(parents=True)
    write_sparse(patient / "ct.csv", to_source(ct.astype(np.float32) + 1000), values=True)
    for name, value in openkbp.CSV_ORGANS.items():
        write_sparse(patient / f"{name}.csv", to_source(label == value), values=False)
    for name, value in PTVS.items():
        write_sparse(patient / f"{name}.csv", to_source(ptv == value), values=False)
    sx, sy, sz = case.spacing_mm
    (patient / "voxel_dimensions.csv").write_text(f"{sy:.18e}\n{sx:.18e}\n{sz:.18e}\n")
    (tmp_path / "open-kbp" / "LICENSE").write_text("MIT License\n")

    out = tmp_path / "converted"
    assert main(["openkbp-download", "--from", str(tmp_path / "open-kbp"), "--out", str(out)]) == 0
    [converted] = openkbp.read_cases(out)
    assert converted.name == case.name and converted.split == "validation"
    assert converted.spacing_mm == pytest.approx(case.spacing_mm) and converted.organs_present == case.organs_present
    for mine, theirs in ((converted.ct, case.ct), (converted.label, case.label), (converted.ptv, case.ptv)):
        a, b = sitk.ReadImage(str(mine)), sitk.ReadImage(str(theirs))
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        assert a.GetPixelID() == b.GetPixelID() and a.GetSpacing() == pytest.approx(b.GetSpacing(), abs=1e-6)
        assert a.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    with open(out / "cases.csv", newline="") as f, open(CASES / "cases.csv", newline="") as g:
        row = next(csv.DictReader(f))
        bundled = next(r for r in csv.DictReader(g) if r["case"] == case.name)
    for key in ("slices_with_body", "slices_with_ptv70", "organs_present"):
        assert row[key] == bundled[key]
    assert (out / "LICENSE").read_text() == "MIT License\n"


def test_converter_says_what_it_expected_when_the_folder_is_not_openkbp(tmp_path):
    assert main(["openkbp-download", "--from", str(tmp_path), "--out", str(tmp_path / "out")]) == 2


def test_download_unpacks_only_provided_data_and_the_licence(tmp_path):
    """The download step on a local archive laid out as the repository's (a file:// URL: nothing is fetched here)."""
    import tarfile

    from labelfactory.datasets.convert_openkbp import download

    root = tmp_path / "open-kbp-abc"
    (root / "provided-data" / "train-pats" / "pt_1").mkdir(parents=True)
    (root / "provided-data" / "train-pats" / "pt_1" / "ct.csv").write_text(",data\n0,1000.0\n")
    (root / "LICENSE").write_text("MIT License\n")
    (root / "main.py").write_text("print('not data')\n")
    archive = tmp_path / "archive.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname=root.name)
    got = download(tmp_path / "dl", url=archive.as_uri())
    assert got == tmp_path / "dl" / "provided-data"
    assert (got / "train-pats" / "pt_1" / "ct.csv").read_text() == ",data\n0,1000.0\n"
    assert (tmp_path / "dl" / "LICENSE").is_file() and sorted(p.name for p in (tmp_path / "dl").iterdir()) == [
        "LICENSE",
        "provided-data",
    ]


def test_crops_cover_every_organ_voxel_of_slices_with_little_body():
    """OpenKBP's CT shows only a little body on the brainstem's top slices: those are cropped too (min_body=1), where
    the GAN's threshold (MIN_BODY_PIXELS) leaves them out. Hand count: organ 1 has 4 voxels on the 49-pixel-body slice
    and 4 on a full one; organ 2 lies outside every box."""
    ct = np.full((3, 40, 40), -1000.0, np.float32)
    ct[0, 10:17, 10:17] = 40.0  # 49 pixels of body, centroid (13, 13)
    ct[1, 5:35, 5:35] = 40.0  # 900 pixels
    label = np.zeros(ct.shape, np.uint8)
    label[0, 12:14, 12:14] = 1
    label[1, 20:22, 20:22] = 1
    label[2, 0:3, 0:3] = 2  # slice 2 has no body: no box
    every = openkbp.crop_coverage(label, openkbp.body_boxes(ct, 16), [1, 2])
    assert every == {1: (8, 8), 2: (0, 9)}
    gan = openkbp.crop_coverage(label, openkbp.body_boxes(ct, 16, openkbp.MIN_BODY_PIXELS), [1, 2])
    assert gan == {1: (4, 8), 2: (0, 9)}
    [small, _] = openkbp.body_boxes(ct, 16)
    assert (small.z, small.y0, small.x0) == (0, 13 - 8, 13 - 8)  # centred on the body's centroid
