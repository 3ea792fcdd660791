"""Organ crop (ClamNet section 3.2): each axial slice cut to its organ's square bounding box plus a
margin (square in mm), resized to size x size; and the way back onto the volume's own grid.

Volumes are reoriented to LPS first (as `labelfactory.io.slices` does), so crops are taken on
radiological slices; `paste_back` returns maps on the original image's exact grid. Slices where
the organ is absent are not cropped (`present` False): the marker cannot be there, their maps are 0.
Crop and paste are one perspective warp and its inverse (kornia), so they agree to interpolation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from kornia.geometry.transform import get_perspective_transform, warp_perspective

from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image, Window, to_unit_range
from labelfactory.io.slices import reorient

logger = logging.getLogger(__name__)


@dataclass
class CroppedSlices:
    """x: (K, 1, S, S) image crops in [-1, 1]; organ: (K, 1, S, S) organ mask on the crops;
    slices: (K,) index of each crop in the LPS-oriented volume; transforms: (K, 3, 3) oriented-slice
    pixel (x, y) -> crop pixel; depth, hw: oriented volume shape; orientation: the image's own code."""

    x: torch.Tensor
    organ: torch.Tensor
    slices: torch.Tensor
    transforms: torch.Tensor
    depth: int
    hw: tuple[int, int]
    orientation: str | None


def _oriented_array(image: Image) -> tuple[np.ndarray, tuple[float, float], str | None]:
    oriented, code = reorient(image)
    arr = oriented.array[None] if oriented.ndim == 2 else oriented.array
    return arr, (float(oriented.spacing[0]), float(oriented.spacing[1])), code


def oriented_to_file_slice(image: Image) -> np.ndarray:
    """(D,) file slice index (array axis 0) of each LPS-oriented slice; raises if reorientation moves the slice axis."""
    if image.ndim == 2:
        return np.zeros(1, dtype=np.int64)
    d = image.array.shape[0]
    index = Image(np.arange(d, dtype=np.int32).reshape(d, 1, 1), image.spacing, image.origin, image.direction)
    oriented, _ = reorient(index)
    if oriented.array.shape != (d, 1, 1):
        raise LabelFactoryError("this volume's slices are not axial; reformat it to axial slices for ClamNet")
    return oriented.array[:, 0, 0].astype(np.int64)


def square_boxes(organ: np.ndarray, spacing_xy: tuple[float, float], margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """organ (D, H, W) bool -> boxes (D, 4) as (x0, y0, x1, y1) pixel centres, square in mm, and present (D,)."""
    sx, sy = spacing_xy
    boxes = np.zeros((organ.shape[0], 4), dtype=np.float64)
    present = organ.reshape(organ.shape[0], -1).any(1)
    for k in np.nonzero(present)[0]:
        ys, xs = np.nonzero(organ[k])
        cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
        half_mm = max((ys.max() - ys.min() + 1) * sy, (xs.max() - xs.min() + 1) * sx) / 2 + margin_mm
        boxes[k] = (cx - half_mm / sx, cy - half_mm / sy, cx + half_mm / sx, cy + half_mm / sy)
    return boxes, present


def _box_transforms(boxes: np.ndarray, size: int) -> torch.Tensor:
    x0, y0, x1, y1 = (torch.as_tensor(boxes[:, i], dtype=torch.float32) for i in range(4))
    src = torch.stack(
        [torch.stack([x0, y0], -1), torch.stack([x1, y0], -1), torch.stack([x1, y1], -1), torch.stack([x0, y1], -1)], 1
    )
    s = float(size - 1)
    dst = torch.tensor([[0.0, 0.0], [s, 0.0], [s, s], [0.0, s]]).expand(len(boxes), 4, 2)
    return get_perspective_transform(src, dst)


def box_mask(reference: Image, box: tuple[int, ...]) -> Image:
    """A mask on `reference`'s grid that is 1 inside `box`: (z0, y0, x0, z1, y1, x1) for volumes, (y0, x0, y1, x1)
    for 2D, end exclusive, file array indices."""
    if len(box) != 2 * reference.ndim:
        raise LabelFactoryError(
            f"a crop box for a {reference.ndim}D image takes {2 * reference.ndim} numbers (starts then ends), "
            f"got {len(box)}"
        )
    m = np.zeros(reference.array.shape, dtype=np.uint8)
    n = reference.ndim
    m[tuple(slice(int(box[i]), int(box[i + n])) for i in range(n))] = 1
    if not m.any():
        raise LabelFactoryError(f"crop box {tuple(box)} holds no pixel of the image (shape {reference.array.shape})")
    return reference.with_array(m)


def crop_slices(
    image: Image, organ: Image | None, size: int = 256, margin_mm: float = 10.0, window: Window = Window()
) -> CroppedSlices:
    """Image (2D or 3D) and its organ mask (same grid, nonzero = organ) -> organ crops of every slice holding the organ.

    organ None: no crop (whole slice, squared), logged as a warning; the whole slice counts as organ.
    """
    arr, spacing, code = _oriented_array(image)
    if organ is None:
        logger.warning("no organ mask: ClamNet runs on whole slices, not organ crops; results suffer")
        organ_arr = np.ones(arr.shape, dtype=bool)
    else:
        if organ.array.shape != image.array.shape:
            raise LabelFactoryError(
                f"organ mask shape {organ.array.shape} differs from the image's {image.array.shape}"
            )
        organ_arr = _oriented_array(organ)[0] > 0
    boxes, present = square_boxes(organ_arr, spacing, margin_mm)
    keep = np.nonzero(present)[0]
    d, hw = arr.shape[0], arr.shape[1:]
    if len(keep) == 0:
        empty = torch.zeros(0, 1, size, size)
        return CroppedSlices(empty, empty.clone(), torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, 3), d, hw, code)
    m = _box_transforms(boxes[keep], size)
    img = torch.from_numpy(np.ascontiguousarray(to_unit_range(arr[keep], window)))[:, None]
    org = torch.from_numpy(organ_arr[keep].astype(np.float32))[:, None]
    x = warp_perspective(img + 1.0, m, (size, size), align_corners=True) - 1.0
    o = (warp_perspective(org, m, (size, size), mode="nearest", align_corners=True) > 0.5).float()
    return CroppedSlices(x, o, torch.from_numpy(keep), m, d, hw, code)


def paste_back(values: torch.Tensor, crops: CroppedSlices, reference: Image) -> Image:
    """(K, S, S) maps on the crops -> float32 Image on `reference`'s grid; 0 outside the crops and on slices without
    organ."""
    out = torch.zeros((crops.depth, 1, *crops.hw))
    if len(values):
        back = warp_perspective(
            values[:, None].float(), torch.linalg.inv(crops.transforms), crops.hw, align_corners=True
        )
        out[crops.slices] = back
    arr = out[:, 0].numpy()
    if crops.orientation is None:
        return reference.with_array(arr.reshape(reference.array.shape).astype(np.float32))
    oriented_ref, _ = reorient(reference)
    img = oriented_ref.with_array(arr.astype(np.float32)).to_sitk()
    return reference.with_array(sitk.GetArrayFromImage(sitk.DICOMOrient(img, crops.orientation)))


def crop_mask(mask: Image, crops: CroppedSlices) -> torch.Tensor:
    """Another mask on the same grid (e.g. a pixel truth) cut exactly like `crops`: (K, 1, S, S) in {0, 1}."""
    arr = torch.from_numpy((_oriented_array(mask)[0] > 0).astype(np.float32))[crops.slices][:, None]
    size = crops.x.shape[-1]
    if len(arr) == 0:
        return torch.zeros(0, 1, size, size)
    return (warp_perspective(arr, crops.transforms, (size, size), mode="nearest", align_corners=True) > 0.5).float()
