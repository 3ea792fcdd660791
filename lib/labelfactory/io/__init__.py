"""Images in and out: NIfTI, NRRD, Slicer .seg.nrrd, DICOM series, PNG; CT windowing; volume <-> slices."""

from labelfactory.io.image import Image, read_image, read_label, write_image
from labelfactory.io.segnrrd import read_seg_nrrd, write_seg_nrrd
from labelfactory.io.slices import (
    SliceGeometry,
    label_to_slices,
    probabilities_to_volume,
    slices_to_label,
    volume_to_slices,
)
from labelfactory.io.windowing import Window, to_unit_range

__all__ = [
    "Image",
    "read_image",
    "read_label",
    "write_image",
    "read_seg_nrrd",
    "write_seg_nrrd",
    "SliceGeometry",
    "volume_to_slices",
    "label_to_slices",
    "slices_to_label",
    "probabilities_to_volume",
    "Window",
    "to_unit_range",
]
