"""Reading and writing images of every format we take: NIfTI, NRRD (incl. Slicer .seg.nrrd), DICOM series, PNG/JPEG.

Every reader returns `Image` (labelfactory.io.image_type: numpy-order array plus SimpleITK geometry)
and validates what it read: 2D or 3D, not empty, complete, finite. Before a voxel is read, every file's header
is checked (`io.headers`: its size within `labelfactory.limits`, its data in the file itself and all present).
NIfTI goes through nibabel's header first (ITK's NIfTI reader silently turns NaN and Inf voxels into 0 and
zero-fills a short file); a .nii.gz is inflated once, never past the size its header declares, then ITK reads
the plain bytes for the geometry.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError

from labelfactory.errors import LabelFactoryError
from labelfactory.io.headers import check_dicom_series, check_file, check_nrrd, check_shape, inflate_bounded
from labelfactory.io.image_type import Image
from labelfactory.io.segnrrd import read_seg_nrrd
from labelfactory.labels import check_label_values

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def suffix_of(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    for s in (".seg.nrrd",) + VOLUME_SUFFIXES + PICTURE_SUFFIXES:
        if name.endswith(s):
            return s
    return Path(path).suffix.lower()


def read_image(path: str | os.PathLike, series_uid: str | None = None) -> Image:
    """Read a NIfTI/NRRD/PNG/JPEG file or a DICOM series folder; validate it (2D or 3D, finite, not empty)."""
    path = Path(path)
    if not path.exists():
        raise LabelFactoryError(f"{path}: no such file or folder")
    if path.is_dir():
        img = _read_dicom_series(path, series_uid)
    elif path.stat().st_size == 0:
        raise LabelFactoryError(f"{path.name}: the file is empty")
    elif suffix_of(path) in NIFTI_SUFFIXES:
        img = _read_nifti(path)
    else:
        check_file(path, path.name)
        img = _sitk_read(path, path.name)
    return _validated(Image.from_sitk(_to_scalar(img, path.name)), path.name)


def write_image(image: Image, path: str | os.PathLike) -> Path:
    """Write NIfTI/NRRD (geometry kept) or PNG (uint8/uint16 arrays, 2D only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix_of(path) == ".png" and (image.ndim != 2 or image.array.dtype not in (np.uint8, np.uint16)):
        raise LabelFactoryError(
            f"{path.name}: PNG takes a 2D uint8 or uint16 array, got {image.array.dtype} {image.array.shape}"
        )
    sitk.WriteImage(image.to_sitk(), str(path), useCompression=True)
    return path


def read_label(
    path: str | os.PathLike,
    reference: Image | None = None,
    label_names: dict[str, int] | None = None,
    check_geometry: bool = False,
) -> Image:
    """Read a label map (NIfTI/NRRD, or Slicer .seg.nrrd with segment names mapped through `label_names`).

    With `reference`, the label must have its shape (a 1-slice volume for a 2D image, or the other way
    round, is squeezed: Slicer saves a 2D slice so; any other shape is refused, never reshaped) and
    gets its geometry; with `check_geometry`, spacing, origin and direction must also match it
    (`geometry_difference`). With `label_names`, every value must be in it, checked on the values as
    stored (before any cast: int64 2**32 + 3 is refused, not read as 3).
    """
    path = Path(path)
    if suffix_of(path) == ".seg.nrrd":
        check_nrrd(path, path.name)  # pynrrd would follow a detached `data file` too
        label = read_seg_nrrd(path, label_names)
    else:
        label = read_image(path)
        if not np.all(np.mod(label.array, 1) == 0):
            raise LabelFactoryError(f"{path.name}: a label map must hold whole numbers, found fractions")
    if label_names is not None:
        check_label_values(label.array, label_names, what=path.name)
    label = label.with_array(_as_int_labels(label.array, path.name))
    if reference is not None:
        label = fit_label_to_image(label, reference, path.name, check_geometry)
    return label


def _as_int_labels(arr: np.ndarray, name: str) -> np.ndarray:
    """Whole-number label values as the smallest of uint8 / int32 / int64 that holds them all; 400 beyond int64."""
    lo, hi = (arr.min(), arr.max()) if arr.size else (0, 0)
    for dtype in (np.uint8, np.int32, np.int64):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return arr if arr.dtype == dtype else arr.astype(dtype)
    raise LabelFactoryError(f"{name}: label values {lo}..{hi} are beyond any label map")


# Tolerances of "the same grid": 0.01 % of the spacing, 1 % of a voxel for the origin, 1e-4 for the direction
# cosines (over 512 voxels under 0.06 voxel of drift); what Slicer's float32 NIfTI headers round off stays inside.
SPACING_RTOL, ORIGIN_VOXELS, DIRECTION_ATOL = 1e-4, 0.01, 1e-4


def _kept_axes(shape: tuple[int, ...], squeeze: bool) -> list[int]:
    """SimpleITK axes (x, y[, z]) of a numpy-order shape, without its singleton axes when `squeeze`."""
    return [i for i in range(len(shape)) if not squeeze or shape[len(shape) - 1 - i] != 1]


def geometry_difference(a: Image, b: Image, what_a: str = "label", what_b: str = "image") -> str | None:
    """None when `a` lies on `b`'s grid (same shape after dropping singleton axes, same spacing, origin and
    direction within the tolerances above); else what differs, naming both values."""
    squeeze = a.array.shape != b.array.shape
    ka, kb = _kept_axes(a.array.shape, squeeze), _kept_axes(b.array.shape, squeeze)
    if [a.array.shape[a.ndim - 1 - i] for i in ka] != [b.array.shape[b.ndim - 1 - i] for i in kb]:
        return f"{what_a} shape {a.array.shape} differs from its {what_b}'s {b.array.shape}"
    p = min(a.ndim, b.ndim)  # physical coordinates both have (a 2D image's plane is its x, y)
    sa, sb = np.asarray(a.spacing, float)[ka], np.asarray(b.spacing, float)[kb]
    oa, ob = np.asarray(a.origin, float)[:p], np.asarray(b.origin, float)[:p]
    da = np.asarray(a.direction, float).reshape(a.ndim, a.ndim)[:p][:, ka]
    db = np.asarray(b.direction, float).reshape(b.ndim, b.ndim)[:p][:, kb]
    if not np.allclose(sa, sb, rtol=SPACING_RTOL, atol=1e-9):
        return f"{what_a} spacing {_fmt(sa)} mm differs from its {what_b}'s {_fmt(sb)} mm"
    if np.abs(oa - ob).max(initial=0.0) > ORIGIN_VOXELS * float(sb.min(initial=1.0)):
        return f"{what_a} origin {_fmt(oa)} mm differs from its {what_b}'s {_fmt(ob)} mm"
    if np.abs(da - db).max(initial=0.0) > DIRECTION_ATOL:
        return f"{what_a} direction {_fmt(da)} differs from its {what_b}'s {_fmt(db)}"
    return None


def _fmt(values) -> str:
    return "(" + ", ".join(f"{x:.6g}" for x in np.ravel(values)) + ")"


def fit_label_to_image(label: Image, reference: Image, name: str, check_geometry: bool = False) -> Image:
    """`label` on `reference`'s grid: its array (squeezed or given the image's singleton axes) with the image's
    geometry. A shape that differs otherwise is refused (never reshaped), and so, with `check_geometry`, is
    another spacing, origin or direction."""
    squeezed = tuple(n for n in label.array.shape if n != 1) == tuple(n for n in reference.array.shape if n != 1)
    if label.array.shape != reference.array.shape and not squeezed:
        raise LabelFactoryError(
            f"{name}: label shape {label.array.shape} differs from its image's {reference.array.shape}; "
            "draw the label on the image it belongs to"
        )
    if check_geometry:
        why = geometry_difference(label, reference)
        if why:
            raise LabelFactoryError(f"{name}: {why}; draw the label on the image it belongs to (or resample it)")
    return Image(label.array.reshape(reference.array.shape), reference.spacing, reference.origin, reference.direction)


def _sitk_read(path: Path, name: str) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise LabelFactoryError(
            f"{name}: not a readable image ({_first_line(e)}); expected NIfTI, NRRD, "
            "PNG/JPEG or a DICOM series folder, complete and uncorrupted"
        ) from None


def _read_nifti(path: Path) -> sitk.Image:
    """A .nii / .nii.gz: its header checked, its bytes inflated once up to the size the header declares, complete
    and finite (checked on the bytes), then read by ITK."""
    gz = path.name.lower().endswith(".gz")
    head = _nifti_bytes(path, gz, NIFTI_HEADER_BYTES)
    hdr, dtype, shape, offset = _nifti_header(head, path.name)
    check_shape(shape, path.name)
    if offset > MAX_NIFTI_OFFSET:
        raise LabelFactoryError(
            f"{path.name}: its header puts the voxels at byte {offset} (over {MAX_NIFTI_OFFSET} bytes of "
            "extensions); save the image again without them"
        )
    raw = _nifti_bytes(path, gz, offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    _check_nifti_voxels(raw, hdr, dtype, shape, offset, path.name)
    if not gz:
        return _sitk_read(path, path.name)
    with tempfile.TemporaryDirectory(prefix="lf-nii-") as tmp:
        plain = Path(tmp) / "image.nii"
        plain.write_bytes(raw)
        del raw
        return _sitk_read(plain, path.name)


NIFTI_HEADER_BYTES = 540  # NIfTI-2's header (NIfTI-1's is 348)
MAX_NIFTI_OFFSET = 64 << 20  # header extensions beyond this are not an image's


def _nifti_bytes(path: Path, gz: bool, limit: int) -> bytes:
    """The first `limit` bytes of the NIfTI (inflated if `gz`; never more made)."""
    if not gz:
        with open(path, "rb") as f:
            return f.read(limit)
    out = bytearray()
    inflate_bounded(path, 0, limit, path.name, out.extend)
    return bytes(out)


def _nifti_header(raw: bytes, name: str):
    """(header, dtype, shape, voxel offset) from the first bytes of a NIfTI-1 or -2 file."""
    header_class = nib.Nifti2Header if raw[:4] in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c") else nib.Nifti1Header
    try:
        hdr = header_class.from_fileobj(io.BytesIO(raw[: header_class.template_dtype.itemsize]))
        # a single-file NIfTI's voxels start after its header whatever vox_offset says (as ITK's niftilib reads it)
        offset = max(int(hdr.get_data_offset()), header_class.template_dtype.itemsize + 4)
        return hdr, hdr.get_data_dtype(), hdr.get_data_shape(), offset
    except (HeaderDataError, WrapStructError, ValueError, OverflowError) as e:
        raise LabelFactoryError(
            f"{name}: not a readable image (NIfTI header: {e}); expected a complete, uncorrupted NIfTI"
        ) from None


def _check_nifti_voxels(raw: bytes, hdr, dtype: np.dtype, shape: tuple[int, ...], offset: int, name: str) -> None:
    """Catch what ITK would hide: a short voxel block (zero-filled) and NaN / Inf voxels (read as 0)."""
    n = int(np.prod(shape, dtype=np.int64))
    needed = offset + n * dtype.itemsize
    if len(raw) < needed:
        raise LabelFactoryError(
            f"{name}: truncated NIfTI ({len(raw)} bytes of voxels and header, the header needs {needed}); "
            "copy it again from its source"
        )
    if dtype.kind in "fc":
        voxels = np.frombuffer(raw, dtype=dtype, count=n, offset=offset)
        bad = int(n - np.count_nonzero(np.isfinite(voxels)))
        if bad:
            raise LabelFactoryError(f"{name}: {bad} voxels are NaN or infinite; fix or mask them before use")
    if not all(v is None or np.isfinite(v) for v in hdr.get_slope_inter()):
        raise LabelFactoryError(
            f"{name}: its intensity scaling (scl_slope / scl_inter) is NaN or infinite; fix the header"
        )


def _read_dicom_series(folder: Path, series_uid: str | None) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    uids = reader.GetGDCMSeriesIDs(str(folder)) or ()
    if not uids:
        raise LabelFactoryError(f"{folder.name}: no DICOM series in this folder")
    if series_uid is None and len(uids) > 1:
        raise LabelFactoryError(
            f"{folder.name}: holds {len(uids)} DICOM series ({', '.join(uids)}); "
            "pass the series UID to read, or put each series in a folder of its own"
        )
    uid = series_uid or uids[0]
    if uid not in uids:
        raise LabelFactoryError(f"{folder.name}: no DICOM series {uid}; found {', '.join(uids)}")
    files = reader.GetGDCMSeriesFileNames(str(folder), uid)
    check_dicom_series(files, folder.name)
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise LabelFactoryError(f"{folder.name}: DICOM series {uid} cannot be read ({_first_line(e)})") from None


def _to_scalar(img: sitk.Image, name: str) -> sitk.Image:
    """RGB(A) pictures become one grey channel (ITU-R 601 luma); scalar images pass through."""
    n = img.GetNumberOfComponentsPerPixel()
    if n == 1:
        return img
    if n not in (3, 4) or img.GetDimension() != 2:
        raise LabelFactoryError(
            f"{name}: {n} values per voxel (a 4D or vector image); give a single-channel 2D slice or 3D volume"
        )
    arr = sitk.GetArrayFromImage(img).astype(np.float64)
    rgb = arr[..., :3] if n >= 3 else np.repeat(arr[..., :1], 3, axis=-1)
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    out = sitk.GetImageFromArray(np.round(grey).astype(sitk.GetArrayViewFromImage(img).dtype), isVector=False)
    out.CopyInformation(img)
    return out


def _validated(image: Image, name: str) -> Image:
    a = image.array
    if a.ndim not in (2, 3):
        raise LabelFactoryError(
            f"{name}: {a.ndim}D images are not supported (shape {a.shape}); give a 2D slice or a 3D volume"
        )
    if a.size == 0:
        raise LabelFactoryError(f"{name}: the image is empty (shape {a.shape})")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating) or a.dtype == np.bool_):
        raise LabelFactoryError(f"{name}: {a.dtype} voxels are not intensities; give integer or real (float) voxels")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise LabelFactoryError(f"{name}: {bad} voxels are NaN or infinite; fix or mask them before use")
    return image


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = next(
        (ln for ln in reversed(lines) if "ERROR" not in ln.upper() or len(lines) == 1), lines[-1] if lines else ""
    )
    return msg[:200]
