"""3D volume <-> stacks of square axial slices, with the exact way back.

Volumes are first reoriented to LPS, so every slice is shown in the radiological convention
(row 0 anterior, column 0 the patient's right). In-plane pixels are resampled to a square
size x size grid with the physical aspect kept (the longer side fills the grid, the shorter is
padded symmetrically). `SliceGeometry` records how, so masks go back onto the original grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from labelfactory.errors import LabelFactoryError
from labelfactory.io.image import Image
from labelfactory.io.windowing import Window, to_unit_range

CANONICAL = "LPS"


@dataclass(frozen=True)
class SliceGeometry:
    """How a (D, H, W) volume (after reorientation) maps onto (D, size, size) slices.

    `hw`: in-plane shape after reorientation; `scaled_hw`: its shape on the square grid;
    `offset`: (top, left) padding in pixels; `orientation`: the volume's own orientation code
    (e.g. 'RAS'), or None for 2D images, which are never reoriented.
    """

    size: int
    hw: tuple[int, int]
    scaled_hw: tuple[int, int]
    offset: tuple[int, int]
    orientation: str | None


def plan_geometry(
    shape_hw: tuple[int, int], spacing_xy: tuple[float, float], size: int, orientation: str | None
) -> SliceGeometry:
    """Scale so the longer physical side spans `size` pixels; centre the shorter one."""
    h, w = shape_hw
    ey, ex = h * spacing_xy[1], w * spacing_xy[0]
    scale = size / max(ex, ey)
    sh, sw = max(1, min(size, round(ey * scale))), max(1, min(size, round(ex * scale)))
    return SliceGeometry(size, (h, w), (sh, sw), ((size - sh) // 2, (size - sw) // 2), orientation)


def reorient(image: Image) -> tuple[Image, str | None]:
    """Volume -> LPS-oriented copy and its original orientation code; 2D images pass unchanged."""
    if image.ndim == 2:
        return image, None
    img = image.to_sitk()
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())
    return Image.from_sitk(sitk.DICOMOrient(img, CANONICAL)), code


def volume_to_slices(image: Image, size: int = 256, window: Window = Window()) -> tuple[torch.Tensor, SliceGeometry]:
    """Image (2D or 3D) -> float32 slices (D, 1, size, size) in [-1, 1] and the geometry to go back.

    Background outside the field of view is -1 (air after windowing).
    """
    oriented, code = reorient(image)
    arr = oriented.array[None] if oriented.ndim == 2 else oriented.array
    geom = plan_geometry(arr.shape[1:], oriented.spacing[:2], size, code)
    x = torch.from_numpy(np.ascontiguousarray(to_unit_range(arr, window)))[:, None]
    return _to_grid(x, geom, mode="bilinear", fill=-1.0), geom


def label_to_slices(label: Image, geom: SliceGeometry) -> torch.Tensor:
    """Label map on the volume's grid -> (D, size, size) int64 slices on the square grid."""
    oriented, _ = reorient(label)
    arr = oriented.array[None] if oriented.ndim == 2 else oriented.array
    if tuple(arr.shape[1:]) != geom.hw:
        raise LabelFactoryError(f"label in-plane shape {tuple(arr.shape[1:])} differs from its image's {geom.hw}")
    x = torch.from_numpy(np.ascontiguousarray(arr.astype(np.float32)))[:, None]
    return _to_grid(x, geom, mode="nearest-exact", fill=0.0)[:, 0].round().long()


def slices_to_label(masks: torch.Tensor | np.ndarray, geom: SliceGeometry, reference: Image) -> Image:
    """(D, size, size) integer masks -> a label Image on `reference`'s exact grid (uint8)."""
    m = torch.as_tensor(np.asarray(masks)).float()
    if m.ndim != 3 or m.shape[1:] != (geom.size, geom.size):
        raise LabelFactoryError(f"expected masks of shape (D, {geom.size}, {geom.size}), got {tuple(m.shape)}")
    top, left = geom.offset
    sh, sw = geom.scaled_hw
    crop = m[:, None, top : top + sh, left : left + sw]
    back = F.interpolate(crop, size=geom.hw, mode="nearest-exact")[:, 0].round().numpy().astype(np.uint8)
    return _restore(back, geom, reference)


def probabilities_to_volume(prob: torch.Tensor | np.ndarray, geom: SliceGeometry, reference: Image) -> Image:
    """(D, size, size) float maps (e.g. probabilities) -> float32 Image on `reference`'s grid (bilinear)."""
    p = torch.as_tensor(np.asarray(prob)).float()
    top, left = geom.offset
    sh, sw = geom.scaled_hw
    crop = p[:, None, top : top + sh, left : left + sw]
    back = F.interpolate(crop, size=geom.hw, mode="bilinear", align_corners=False)
    return _restore(back[:, 0].numpy().astype(np.float32), geom, reference)


def _to_grid(x: torch.Tensor, geom: SliceGeometry, mode: str, fill: float) -> torch.Tensor:
    """(D, 1, H, W) -> (D, 1, size, size): resize to `scaled_hw`, pad with `fill`."""
    kw = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
    y = F.interpolate(x, size=geom.scaled_hw, mode=mode, **kw)
    out = torch.full((x.shape[0], 1, geom.size, geom.size), fill, dtype=x.dtype)
    top, left = geom.offset
    out[:, :, top : top + geom.scaled_hw[0], left : left + geom.scaled_hw[1]] = y
    return out


def _restore(arr: np.ndarray, geom: SliceGeometry, reference: Image) -> Image:
    """LPS-ordered (D, H, W) array -> Image with `reference`'s orientation and exact geometry."""
    if geom.orientation is None:
        return reference.with_array(arr.reshape(reference.array.shape))
    oriented_ref, _ = reorient(reference)
    img = oriented_ref.with_array(arr).to_sitk()
    back = sitk.DICOMOrient(img, geom.orientation)
    out = Image.from_sitk(back)
    if out.array.shape != reference.array.shape:
        raise LabelFactoryError(f"internal: restored shape {out.array.shape} != reference {reference.array.shape}")
    return reference.with_array(out.array)
