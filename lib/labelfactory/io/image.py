"""One image type for every format we read: NIfTI, NRRD (incl. Slicer .seg.nrrd), DICOM series, PNG/JPEG.

Arrays are in numpy (SimpleITK) index order: (D, H, W) for volumes, (H, W) for 2D images.
Geometry is in SimpleITK's (x, y[, z]) order: spacing in mm, origin in mm (LPS), direction as
row-major cosines whose column i is axis i's direction.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from labelfactory.errors import LabelFactoryError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass
class Image:
    """Pixel array plus physical geometry. `array`: (D, H, W) or (H, W); geometry in (x, y[, z])."""

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @property
    def ndim(self) -> int:
        return self.array.ndim

    def to_sitk(self) -> sitk.Image:
        img = sitk.GetImageFromArray(self.array)
        img.SetSpacing([float(s) for s in self.spacing])
        img.SetOrigin([float(o) for o in self.origin])
        img.SetDirection([float(d) for d in self.direction])
        return img

    @classmethod
    def from_sitk(cls, img: sitk.Image) -> "Image":
        return cls(sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(), img.GetDirection())

    def with_array(self, array: np.ndarray) -> "Image":
        """Same geometry, new pixels (shape must match)."""
        if array.shape != self.array.shape:
            raise LabelFactoryError(f"array shape {array.shape} does not match the image's {self.array.shape}")
        return Image(array, self.spacing, self.origin, self.direction)


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
    else:
        if path.stat().st_size == 0:
            raise LabelFactoryError(f"{path.name}: the file is empty")
        _check_complete(path)
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as e:
            raise LabelFactoryError(
                f"{path.name}: not a readable image ({_first_line(e)}); expected NIfTI, NRRD, "
                "PNG/JPEG or a DICOM series folder, complete and uncorrupted"
            ) from None
    return _validated(Image.from_sitk(_to_scalar(img, path.name)), path.name)


def write_image(image: Image, path: str | os.PathLike) -> Path:
    """Write NIfTI/NRRD (geometry kept) or PNG (uint8/uint16 arrays, 2D only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix_of(path) == ".png" and (image.ndim != 2 or image.array.dtype not in (np.uint8, np.uint16)):
        raise LabelFactoryError(f"{path.name}: PNG takes a 2D uint8 or uint16 array, got {image.array.dtype} {image.array.shape}")
    sitk.WriteImage(image.to_sitk(), str(path), useCompression=True)
    return path


def read_label(path: str | os.PathLike, reference: Image | None = None, label_names: dict[str, int] | None = None) -> Image:
    """Read a label map (NIfTI/NRRD, or Slicer .seg.nrrd with segment names mapped through `label_names`).

    With `reference`, the label must have its shape; with `label_names`, every value must be in it.
    """
    from labelfactory.io.segnrrd import read_seg_nrrd
    from labelfactory.labels import check_label_values

    path = Path(path)
    if suffix_of(path) == ".seg.nrrd":
        label = read_seg_nrrd(path, label_names)
    else:
        label = read_image(path)
        if not np.all(np.mod(label.array, 1) == 0):
            raise LabelFactoryError(f"{path.name}: a label map must hold whole numbers, found fractions")
        label = label.with_array(label.array.astype(np.uint8 if label.array.max() < 256 and label.array.min() >= 0 else np.int32))
    if reference is not None and label.array.shape != reference.array.shape:
        # Slicer may save a single 2D slice as a 1-slice volume
        squeezed = label.array.reshape(reference.array.shape) if label.array.size == reference.array.size else None
        if squeezed is None:
            raise LabelFactoryError(
                f"{path.name}: label shape {label.array.shape} differs from its image's {reference.array.shape}; "
                "draw the label on the image it belongs to"
            )
        label = Image(squeezed, reference.spacing, reference.origin, reference.direction)
    if label_names is not None:
        check_label_values(label.array, label_names, what=path.name)
    return label


def _check_complete(path: Path) -> None:
    """Catch truncated files that ITK would silently zero-fill: a cut gzip stream or a short .nii."""
    if path.name.lower().endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
        except (EOFError, OSError, zlib.error) as e:
            raise LabelFactoryError(f"{path.name}: not a readable image: truncated or corrupt compressed data ({e}); copy it again from its source") from None
    elif path.name.lower().endswith(".nii") and path.stat().st_size >= 348:
        hdr = np.fromfile(path, dtype=np.uint8, count=348).tobytes()
        order = "<" if int.from_bytes(hdr[:4], "little") == 348 else ">"
        dims = np.frombuffer(hdr[40:56], dtype=order + "i2")
        bitpix = int(np.frombuffer(hdr[72:74], dtype=order + "i2")[0])
        offset = int(np.frombuffer(hdr[108:112], dtype=order + "f4")[0])
        n = int(np.prod(dims[1 : 1 + max(0, min(int(dims[0]), 7))].astype(np.int64)))
        if path.stat().st_size < offset + n * bitpix // 8:
            raise LabelFactoryError(f"{path.name}: truncated NIfTI ({path.stat().st_size} bytes, header needs {offset + n * bitpix // 8}); copy it again from its source")


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
        raise LabelFactoryError(f"{name}: {n} values per voxel (a 4D or vector image); give a single-channel 2D slice or 3D volume")
    arr = sitk.GetArrayFromImage(img).astype(np.float64)
    rgb = arr[..., :3] if n >= 3 else np.repeat(arr[..., :1], 3, axis=-1)
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    out = sitk.GetImageFromArray(np.round(grey).astype(sitk.GetArrayViewFromImage(img).dtype), isVector=False)
    out.CopyInformation(img)
    return out


def _validated(image: Image, name: str) -> Image:
    a = image.array
    if a.ndim not in (2, 3):
        raise LabelFactoryError(f"{name}: {a.ndim}D images are not supported (shape {a.shape}); give a 2D slice or a 3D volume")
    if a.size == 0:
        raise LabelFactoryError(f"{name}: the image is empty (shape {a.shape})")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise LabelFactoryError(f"{name}: {bad} voxels are NaN or infinite; fix or mask them before use")
    return image


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = next((ln for ln in reversed(lines) if "ERROR" not in ln.upper() or len(lines) == 1), lines[-1] if lines else "")
    return msg[:200]
