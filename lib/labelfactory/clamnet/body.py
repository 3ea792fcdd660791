"""The patient's body on CT, ClamNet's organ where no organ model fits the abnormality (e.g. head-and-neck targets).

Voxels above `BODY_HU` (air below, fat, soft tissue and bone above), the largest 3D connected
component (drops the couch and stray air-bubble noise), holes filled slice by slice (the airway
and sinuses belong to the body's cross-section). Slices whose body covers less than `min_area_mm2`
are left empty: the top of the skull and the tip of a scan would be blown up by the crop.
SimpleITK for the components, SciPy for the 2D hole filling (sitk's fills 3D holes only).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import binary_fill_holes

from labelfactory.io import Image

BODY = "body"  # the organ name that asks for this mask
BODY_HU = -500.0
MIN_AREA_MM2 = 3000.0  # about 30 cm^2: a neck is ~100 cm^2, the skull's top a few


def body_mask(image: Image, hu: float = BODY_HU, min_area_mm2: float = MIN_AREA_MM2) -> Image:
    """CT (2D or 3D, HU) -> uint8 body mask on its grid (1 = body)."""
    arr = image.array[None] if image.ndim == 2 else image.array
    above = sitk.GetImageFromArray((arr > hu).astype(np.uint8))
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(above), sortByObjectSize=True) == 1
    mask = sitk.GetArrayFromImage(largest).astype(bool)
    pixel_mm2 = float(image.spacing[0]) * float(image.spacing[1])
    for k in range(len(mask)):
        mask[k] = binary_fill_holes(mask[k]) if mask[k].sum() * pixel_mm2 >= min_area_mm2 else False
    out = mask.astype(np.uint8)
    return image.with_array(out[0] if image.ndim == 2 else out)
