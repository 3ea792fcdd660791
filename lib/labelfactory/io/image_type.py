"""The one image type every reader and writer of `labelfactory.io` returns and takes.

Arrays are in numpy (SimpleITK) index order: (D, H, W) for volumes, (H, W) for 2D images.
Geometry is in SimpleITK's (x, y[, z]) order: spacing in mm, origin in mm (LPS), direction as
row-major cosines whose column i is axis i's direction. Kept apart from the readers so that
`io.image` and `io.segnrrd` both build on it without importing each other in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from labelfactory.errors import LabelFactoryError


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
    def from_sitk(cls, img: sitk.Image) -> Image:
        return cls(sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(), img.GetDirection())

    def with_array(self, array: np.ndarray) -> Image:
        """Same geometry, new pixels (shape must match)."""
        if array.shape != self.array.shape:
            raise LabelFactoryError(f"array shape {array.shape} does not match the image's {self.array.shape}")
        return Image(array, self.spacing, self.origin, self.direction)
