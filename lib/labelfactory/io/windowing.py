"""CT intensity windowing: Hounsfield units <-> the [-1, 1] range the networks see."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    """A CT display window in HU. Default [-1000, 1000]: air to dense bone, lungs and soft tissue both kept."""

    level: float = 0.0
    width: float = 2000.0

    @property
    def low(self) -> float:
        return self.level - self.width / 2

    @property
    def high(self) -> float:
        return self.level + self.width / 2

    def to_unit(self, hu: np.ndarray) -> np.ndarray:
        """HU (any shape) -> float32 in [-1, 1], clipped at the window's edges."""
        x = (np.asarray(hu, dtype=np.float32) - self.low) / (self.high - self.low)
        return np.clip(x, 0.0, 1.0) * 2.0 - 1.0

    def to_hu(self, unit: np.ndarray) -> np.ndarray:
        """[-1, 1] (any shape) -> HU, float32; the inverse of `to_unit` inside the window."""
        u = np.clip(np.asarray(unit, dtype=np.float32), -1.0, 1.0)
        return (u + 1.0) / 2.0 * (self.high - self.low) + self.low


def to_unit_range(array: np.ndarray, window: Window = Window()) -> np.ndarray:
    """Intensities -> [-1, 1]: 8/16-bit pictures by their full range, everything else as CT in HU."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 127.5 - 1.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 32767.5 - 1.0
    return window.to_unit(array)
