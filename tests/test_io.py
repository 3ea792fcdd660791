"""Image I/O on the real sample CT: formats, round trips, orientation, and bad input."""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from labelfactory.errors import LabelFactoryError
from labelfactory.io import (
    Image,
    Window,
    label_to_slices,
    read_image,
    read_label,
    read_seg_nrrd,
    slices_to_label,
    volume_to_slices,
    write_image,
    write_seg_nrrd,
)
from labelfactory.labels import LABEL_COLORS, LABEL_NAMES

LUNGS = (LABEL_NAMES["left lung"], LABEL_NAMES["right lung"])


def _study(sample, name):
    image = read_image(sample / "datastore" / f"{name}.nii.gz")
    label = read_label(sample / "datastore" / "labels" / "final" / f"{name}.nii.gz", image, LABEL_NAMES)
    return image, label


def test_nifti_round_trip_keeps_pixels_and_geometry(sample, tmp_path):
    image, _ = _study(sample, "torso_3mm")
    out = read_image(write_image(image, tmp_path / "t.nii.gz"))
    assert np.array_equal(out.array, image.array)
    assert np.allclose(out.spacing, image.spacing) and np.allclose(out.origin, image.origin)
    assert np.allclose(out.direction, image.direction)


def test_nrrd_round_trip(sample, tmp_path):
    image, _ = _study(sample, "torso_3mm")
    out = read_image(write_image(image, tmp_path / "t.nrrd"))
    assert np.array_equal(out.array, image.array) and np.allclose(out.direction, image.direction)


def test_seg_nrrd_is_read_back_by_pynrrd_simpleitk_and_us(sample, tmp_path):
    _, label = _study(sample, "torso_3mm")
    path = write_seg_nrrd(label, tmp_path / "t.seg.nrrd", LABEL_NAMES, LABEL_COLORS)
    data, header = nrrd.read(str(path), index_order="C")
    assert np.array_equal(data, label.array)
    names = {header[f"Segment{i}_Name"]: int(header[f"Segment{i}_LabelValue"]) for i in range(len(LABEL_NAMES) - 1)}
    assert names == {n: v for n, v in LABEL_NAMES.items() if v}
    r, g, b = (float(c) for c in header["Segment0_Color"].split())
    assert np.allclose([r, g, b], np.array(LABEL_COLORS["liver"]) / 255, atol=1e-5)
    via_sitk = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(via_sitk), label.array)
    assert np.allclose(via_sitk.GetSpacing(), label.spacing) and np.allclose(via_sitk.GetOrigin(), label.origin)
    assert np.allclose(via_sitk.GetDirection(), label.direction)
    ours = read_seg_nrrd(path, LABEL_NAMES)
    assert np.array_equal(ours.array, label.array)


def test_seg_nrrd_maps_segments_by_name_not_value(sample, tmp_path):
    _, label = _study(sample, "torso_3mm")
    # a Slicer file whose values differ from ours: liver stored as 1 -> 7, spleen 2 -> 1
    swapped = {"liver": 7, "spleen": 1}
    arr = np.zeros_like(label.array)
    arr[label.array == LABEL_NAMES["liver"]] = 7
    arr[label.array == LABEL_NAMES["spleen"]] = 1
    path = write_seg_nrrd(label.with_array(arr), tmp_path / "s.seg.nrrd", swapped)
    back = read_seg_nrrd(path, LABEL_NAMES)
    assert np.array_equal(back.array == LABEL_NAMES["liver"], label.array == LABEL_NAMES["liver"])
    assert np.array_equal(back.array == LABEL_NAMES["spleen"], label.array == LABEL_NAMES["spleen"])
    with pytest.raises(LabelFactoryError, match="not in the label map"):
        read_seg_nrrd(write_seg_nrrd(label, tmp_path / "u.seg.nrrd", {"tumour": 1}), LABEL_NAMES)


def test_dicom_series_matches_its_nifti_conversion(sample):
    dicom = read_image(sample / "dicom" / "abdomen")
    nifti = read_image(sample / "datastore" / "abdomen.nii.gz")
    assert dicom.array.shape == (20, 512, 512)
    assert np.array_equal(np.clip(dicom.array, -1024, 3071), nifti.array)
    assert np.allclose(dicom.spacing, nifti.spacing, atol=1e-4) and np.allclose(dicom.origin, nifti.origin, atol=1e-3)


@pytest.mark.parametrize("dtype,top", [(np.uint8, 255), (np.uint16, 65535)])
def test_png_8_and_16_bit(tmp_path, dtype, top):
    arr = (np.linspace(0, top, 32 * 48).reshape(32, 48)).astype(dtype)
    path = write_image(Image(arr, (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0)), tmp_path / "p.png")
    img = read_image(path)
    assert img.array.dtype == dtype and np.array_equal(img.array, arr)
    x, geom = volume_to_slices(img, size=64)
    assert x.shape == (1, 1, 64, 64) and float(x.max()) == pytest.approx(1.0) and float(x.min()) == pytest.approx(-1.0)


def test_rgb_png_becomes_grey(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 200
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "c.png"))
    img = read_image(tmp_path / "c.png")
    assert img.array.shape == (8, 8) and int(img.array[0, 0]) == round(200 * 0.587)


@pytest.mark.parametrize("name", ["torso_3mm", "abdomen"])
def test_each_organ_mask_lies_on_its_organ_after_read_slice_round_trip_and_write(sample, tmp_path, name):
    image, label = _study(sample, name)
    slices, geom = volume_to_slices(image, size=256)
    masks = label_to_slices(label, geom)
    # on the square slices: lungs dark, liver soft tissue, liver on the image's left (patient's right)
    lung = torch_mask(masks, LUNGS)
    if lung.any():
        assert float(slices[:, 0][lung].mean()) < Window().to_unit(np.array(-500.0))
    liver = masks == LABEL_NAMES["liver"]
    assert -0.1 < float(slices[:, 0][liver].mean()) < 0.15  # 0..150 HU in the default window
    cols = liver.nonzero()[:, 2].float().mean()
    assert cols < 128, "liver must be on the image's left (patient's right) in radiological view"
    spleen = masks == LABEL_NAMES["spleen"]
    assert spleen.nonzero()[:, 2].float().mean() > 128
    # back onto the volume's grid, written, read again: still on the organs
    back = slices_to_label(masks, geom, label)
    written = read_label(write_image(back, tmp_path / "lab.nii.gz"), image, LABEL_NAMES)
    if geom.scaled_hw[0] >= geom.hw[0]:  # upsampled in-plane: nearest round trip is exact
        assert np.array_equal(written.array, label.array)
    else:
        assert (written.array == label.array).mean() > 0.99
    hu = image.array
    assert hu[written.array == LABEL_NAMES["liver"]].mean() == pytest.approx(
        hu[label.array == LABEL_NAMES["liver"]].mean(), abs=10
    )
    assert 0 < hu[written.array == LABEL_NAMES["liver"]].mean() < 150
    if np.isin(written.array, LUNGS).any():
        assert hu[np.isin(written.array, LUNGS)].mean() < -500


def torch_mask(masks, values):
    m = masks == values[0]
    for v in values[1:]:
        m |= masks == v
    return m


def test_reoriented_volume_comes_back_in_its_own_geometry(sample, tmp_path):
    image, label = _study(sample, "torso_3mm")
    # flip the stored orientation: same anatomy, other index order (RAS-like vs LPS-like)
    flipped = sitk.Flip(label.to_sitk(), [True, False, True])
    flipped_label = Image.from_sitk(flipped)
    flipped_image = Image.from_sitk(sitk.Flip(image.to_sitk(), [True, False, True]))
    x, geom = volume_to_slices(flipped_image, 256)
    x0, geom0 = volume_to_slices(image, 256)
    assert np.allclose(x.numpy(), x0.numpy()), "slices must not depend on how the volume is stored"
    back = slices_to_label(label_to_slices(flipped_label, geom), geom, flipped_label)
    assert np.array_equal(back.array, flipped_label.array)


# ---- bad input: one exception type, a message a person can act on ----


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.nii.gz"
    p.write_text("this is not an image")
    with pytest.raises(LabelFactoryError, match="not a readable image"):
        read_image(p)


def test_truncated_nifti(sample, tmp_path):
    data = (sample / "datastore" / "torso_3mm.nii.gz").read_bytes()
    p = tmp_path / "cut.nii.gz"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(LabelFactoryError, match="cut.nii.gz"):
        read_image(p)


def test_empty_file_and_missing_file(tmp_path):
    (tmp_path / "e.nii.gz").write_bytes(b"")
    with pytest.raises(LabelFactoryError, match="empty"):
        read_image(tmp_path / "e.nii.gz")
    with pytest.raises(LabelFactoryError, match="no such file"):
        read_image(tmp_path / "missing.nii.gz")


def test_4d_volume(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False)
    sitk.WriteImage(img, str(tmp_path / "t4.nii.gz"))
    with pytest.raises(LabelFactoryError, match="4D"):
        read_image(tmp_path / "t4.nii.gz")


def test_nans(tmp_path):
    arr = np.zeros((4, 8, 8), np.float32)
    arr[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "n.nrrd"))  # ITK's NIfTI IO drops NaNs itself
    with pytest.raises(LabelFactoryError, match="NaN"):
        read_image(tmp_path / "n.nrrd")


def test_vector_volume(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 2), np.float32), isVector=True), str(tmp_path / "v.nrrd"))
    with pytest.raises(LabelFactoryError, match="2 values per voxel"):
        read_image(tmp_path / "v.nrrd")


def test_label_with_values_outside_the_map(sample, tmp_path):
    image, label = _study(sample, "torso_3mm")
    bad = label.array.copy()
    bad[0, 0, 0] = 42
    p = write_image(label.with_array(bad), tmp_path / "bad.nii.gz")
    with pytest.raises(LabelFactoryError, match=r"\[42\].*not in the label map"):
        read_label(p, image, LABEL_NAMES)


def test_label_of_the_wrong_shape(sample, tmp_path):
    image, label = _study(sample, "torso_3mm")
    p = write_image(
        label.with_array(label.array).__class__(label.array[:10], label.spacing, label.origin, label.direction),
        tmp_path / "short.nii.gz",
    )
    with pytest.raises(LabelFactoryError, match="differs from its image"):
        read_label(p, image, LABEL_NAMES)


def test_dicom_folder_with_two_series(sample, tmp_path):
    folder = tmp_path / "two"
    shutil.copytree(sample / "dicom" / "abdomen", folder)
    for f in sorted(folder.iterdir())[:5]:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = str(ds.SeriesInstanceUID) + ".2"
        ds.save_as(f)
    with pytest.raises(LabelFactoryError, match="2 DICOM series"):
        read_image(folder)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(LabelFactoryError, match="no DICOM series"):
        read_image(tmp_path)


def test_window_is_applied_to_slices(sample):
    image, _ = _study(sample, "torso_3mm")
    narrow, _ = volume_to_slices(image, 64, Window(level=40, width=400))
    wide, _ = volume_to_slices(image, 64, Window(level=0, width=2000))
    assert not np.allclose(narrow.numpy(), wide.numpy())
    assert float((narrow == -1).float().mean()) > float(
        (wide == -1).float().mean()
    )  # more voxels below a narrow window's floor


def test_find_studies_takes_dicom_folders_and_skips_other_folders(sample, tmp_path):
    from labelfactory.io.dataset import find_studies

    shutil.copytree(sample / "dicom" / "abdomen", tmp_path / "abdomen_series")
    shutil.copytree(sample / "datastore" / "reference", tmp_path / "reference")
    shutil.copy(sample / "datastore" / "torso_3mm.nii.gz", tmp_path / "torso.nii.gz")
    found = {s.id: s for s in find_studies(tmp_path)}
    assert set(found) == {"abdomen_series", "torso"}
    assert read_image(found["abdomen_series"].image).array.shape == (20, 512, 512)


# ---- headers checked before a voxel is read (io.headers): declared size, detached data, limits ----


def _dicom(path, rows, cols, pixel_bytes):
    """A one-file CT DICOM (explicit VR little endian, 16 bits) declaring rows x cols, holding `pixel_bytes`."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", generate_uid(), generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = pixel_bytes
    ds.save_as(str(path), write_like_original=False)
    return path


def test_a_dicom_declaring_more_pixels_than_it_holds_is_refused_from_its_header(tmp_path):
    """The issue's 652-byte DICOM claiming 60000 x 60000: refused on its header (ITK allocated 7 GB for it)."""
    huge = _dicom(tmp_path / "huge.dcm", 60000, 60000, b"\0" * 200)
    assert huge.stat().st_size < 1000
    with pytest.raises(LabelFactoryError, match="LABELFACTORY_MAX_VOXELS") as e:
        read_image(huge)
    assert e.value.status == 413 and "60000 x 60000" in str(e.value)


def test_a_dicom_holding_fewer_pixels_than_it_declares_is_refused_not_zero_filled(tmp_path):
    short = _dicom(tmp_path / "short.dcm", 64, 64, b"\0" * 2000)  # 64 x 64 x 16 bits needs 8192 bytes
    with pytest.raises(LabelFactoryError, match=r"truncated DICOM: 2000 bytes of pixel data.*\(8192 bytes\)"):
        read_image(short)
    ok = _dicom(tmp_path / "ok.dcm", 64, 64, np.arange(64 * 64, dtype="<i2").tobytes())
    assert np.array_equal(read_image(ok).array.reshape(64, 64), np.arange(64 * 64).reshape(64, 64))


def _volume(tmp_path, name, **kw):
    arr = np.arange(8 * 9 * 10, dtype=np.int16).reshape(8, 9, 10)
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path), **kw)
    return arr, path


@pytest.mark.parametrize("target", ["/etc/shadow", "/dev/zero", "other.raw"])
def test_metaimage_and_nrrd_with_their_data_in_another_file_are_refused(tmp_path, target):
    arr, mhd = _volume(tmp_path, "v.mhd")
    text = mhd.read_text().replace("ElementDataFile = v.raw", f"ElementDataFile = {target}")
    (tmp_path / "evil.mhd").write_text(text)
    with pytest.raises(LabelFactoryError, match="another file"):
        read_image(tmp_path / "evil.mhd")
    _, nhdr = _volume(tmp_path, "v.nhdr")
    (tmp_path / "evil.nhdr").write_text(nhdr.read_text().replace("data file: v.raw", f"data file: {target}"))
    with pytest.raises(LabelFactoryError, match="detached NRRD header"):
        read_image(tmp_path / "evil.nhdr")
    seg = tmp_path / "evil.seg.nrrd"  # read by pynrrd, which would follow it too
    seg.write_text(f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 10 9 8\nencoding: raw\ndata file: {target}\n")
    with pytest.raises(LabelFactoryError, match="detached NRRD header"):
        read_label(seg)


@pytest.mark.parametrize("name,compress", [("v.mha", False), ("v.mha", True), ("v.nrrd", False), ("v.nrrd", True)])
def test_a_metaimage_or_nrrd_shorter_than_its_header_declares_is_refused(tmp_path, name, compress):
    arr, path = _volume(tmp_path, name, useCompression=compress)
    assert np.array_equal(read_image(path).array, arr)  # whole: read as written
    data = path.read_bytes()
    cut = tmp_path / f"cut{path.suffix}"
    cut.write_bytes(data[: len(data) - (40 if compress else 200)])
    with pytest.raises(LabelFactoryError, match="truncated image: .* its header declares 1440"):  # 8 x 9 x 10 x 2
        read_image(cut)


def test_a_line_of_voxels_is_refused_and_the_limits_name_their_settings(tmp_path, monkeypatch):
    """1 x 1 x 400 (78 bytes of NIfTI) cost 400 slices of work; limits are checked on the header."""
    line = tmp_path / "line.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((400, 1, 1), np.int16)), str(line))
    with pytest.raises(LabelFactoryError, match="a line, not a volume"):
        read_image(line)
    monkeypatch.setenv("LABELFACTORY_MAX_VOXELS", "500")
    _, mha = _volume(tmp_path, "v.mha")  # 720 voxels
    for path in (mha, line.with_name("ok.nii.gz")):
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 9, 10), np.int16)), str(line.with_name("ok.nii.gz")))
        with pytest.raises(LabelFactoryError, match=r"720 voxels, over the server's limit \(500 voxels, LABELFACTORY"):
            read_image(path)
    monkeypatch.setenv("LABELFACTORY_MAX_VOXELS", "")
    monkeypatch.setenv("LABELFACTORY_MAX_SLICES", "9")
    with pytest.raises(LabelFactoryError, match="LABELFACTORY_MAX_SLICES"):
        read_image(mha)


def test_the_default_limits_take_a_512_x_512_x_2000_ct():
    from labelfactory.io.headers import check_shape

    check_shape((2000, 512, 512), "ct")  # no error
    with pytest.raises(LabelFactoryError, match="LABELFACTORY_MAX_VOXELS"):
        check_shape((4000, 512, 512), "ct")


def test_a_nifti_bomb_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    """A .nii.gz declaring 2048^3 voxels (a few KB compressed) is refused on its header; a short one is inflated
    only up to the size its header declares."""
    from labelfactory.io import image as image_io

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2048, 2048, 2048))
    hdr.set_data_dtype(np.int16)
    hdr.set_data_offset(352)
    bomb = tmp_path / "bomb.nii.gz"
    bomb.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\0" * (8 << 20)))
    inflated = []
    real = image_io.inflate_bounded
    monkeypatch.setattr(
        image_io, "inflate_bounded", lambda p, o, limit, *a: inflated.append(limit) or real(p, o, limit, *a)
    )
    with pytest.raises(LabelFactoryError, match="LABELFACTORY_MAX_VOXELS"):
        read_image(bomb)
    assert inflated == [image_io.NIFTI_HEADER_BYTES]
    hdr.set_data_shape((16, 16, 16))  # 8 KB of voxels declared, 8 MB of zeros after them: never inflated
    padded = tmp_path / "padded.nii.gz"
    padded.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\0" * (8 << 20)))
    assert read_image(padded).array.shape == (16, 16, 16)
    assert inflated[-1] == 352 + 16**3 * 2


def test_a_dicom_series_over_the_limits_is_refused_from_its_headers(sample, monkeypatch):
    monkeypatch.setenv("LABELFACTORY_MAX_VOXELS", str(512 * 512 * 19))
    with pytest.raises(LabelFactoryError, match=r"20 x 512 x 512 = 5242880 voxels.*LABELFACTORY_MAX_VOXELS"):
        read_image(sample / "dicom" / "abdomen")
