"""The organ label map the app exposes, and the mapping from TotalSegmentator's class numbers.

Names follow 3D Slicer's GenericAnatomyColors so Slicer colours segments by name; colours are the
same table's RGB (0-255) so files we write look the same as what Slicer shows.
"""

from __future__ import annotations

import numpy as np

from labelfactory.errors import LabelFactoryError

# value -> (name, RGB colour): the organs the bundled sample data labels
ORGANS: dict[int, tuple[str, tuple[int, int, int]]] = {
    1: ("liver", (221, 130, 101)),
    2: ("spleen", (157, 108, 162)),
    3: ("left kidney", (185, 102, 83)),
    4: ("right kidney", (185, 102, 83)),
    5: ("stomach", (216, 132, 105)),
    6: ("aorta", (224, 97, 76)),
    7: ("left lung", (197, 165, 145)),
    8: ("right lung", (172, 138, 115)),
}
LABEL_NAMES: dict[str, int] = {"background": 0, **{name: v for v, (name, _) in ORGANS.items()}}
LABEL_COLORS: dict[str, tuple[int, int, int]] = {name: rgb for name, rgb in ORGANS.values()}

# TotalSegmentator "total" class number -> our value (everything else becomes background)
TOTALSEG_TO_APP: dict[int, int] = {
    5: 1, 1: 2, 3: 3, 2: 4, 6: 5, 52: 6,
    10: 7, 11: 7,  # left lung lobes
    12: 8, 13: 8, 14: 8,  # right lung lobes
}


def map_totalsegmentator(labels: np.ndarray) -> np.ndarray:
    """Map a TotalSegmentator class-number array (any shape) onto the app's label values (uint8)."""
    lut = np.zeros(max(int(labels.max()), max(TOTALSEG_TO_APP)) + 1, dtype=np.uint8)
    for src, dst in TOTALSEG_TO_APP.items():
        lut[src] = dst
    return lut[labels.astype(np.int64)]


def check_label_values(labels: np.ndarray, label_names: dict[str, int] = LABEL_NAMES, what: str = "label") -> None:
    """Raise LabelFactoryError if `labels` holds a value outside `label_names` (name -> value)."""
    allowed = set(label_names.values())
    found = set(np.unique(labels).tolist())
    unknown = sorted(v for v in found if v not in allowed)
    if unknown:
        known = ", ".join(f"{v}={n}" for n, v in sorted(label_names.items(), key=lambda kv: kv[1]))
        raise LabelFactoryError(
            f"{what} holds values {unknown[:10]} that are not in the label map ({known}); "
            "relabel those voxels or add them to the label map"
        )
