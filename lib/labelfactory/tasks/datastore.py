"""A MONAI Label local datastore that refuses what would corrupt it.

Image ids must stay inside the datastore (no path separators, no '..'); uploaded images must be
readable 2D/3D images; submitted labels must match their image's shape and hold only values of
the label map. Slicer's `.seg.nrrd` labels (and NIfTI labels sent with Slicer's `label_info`)
are mapped onto the app's values by segment name and stored as NIfTI, so trainers always read
one format with one set of values.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any

import numpy as np
from monailabel.datastore.local import LocalDatastore

from labelfactory.errors import LabelFactoryError
from labelfactory.io import read_image, read_label, write_image
from labelfactory.labels import LABEL_NAMES

logger = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_id(image_id: str) -> str:
    """An image id is a plain file stem: letters, digits, '.', '_', '-'; never a path."""
    if not isinstance(image_id, str) or not _ID.match(image_id) or ".." in image_id:
        raise LabelFactoryError(f"invalid image id {image_id!r}: ids are plain names (letters, digits, '.', '_', '-'), never paths", status=400)
    return image_id


class LabelFactoryDatastore(LocalDatastore):
    """LocalDatastore with id, image and label validation; `label_names` is the app's label map."""

    def __init__(self, *args, label_names: dict[str, int] = LABEL_NAMES, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_names = label_names

    def require_image(self, image_id: str) -> str:
        """The image's path; 404 for an unknown id, 400 for an id that is a path."""
        check_id(image_id)
        uri = self.get_image_uri(image_id)
        if not uri:
            raise LabelFactoryError(f"no image '{image_id}' in the datastore; list them with GET /datastore/?output=all", status=404)
        return uri

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        if image_id:
            check_id(image_id)
        read_image(image_filename)  # raises a clear error for corrupt, empty, 4D, NaN uploads
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        image_path = self.require_image(image_id)
        if label_tag and not _ID.match(label_tag):
            raise LabelFactoryError(f"invalid label tag {label_tag!r}", status=400)
        image = read_image(image_path)
        names = _names_from_label_info(label_info, self.label_names)
        label = read_label(label_filename, reference=image, label_names=None if names else self.label_names)
        if names:  # Slicer sent {name, idx} pairs: map its indices onto our values by name
            label = label.with_array(_remap(label.array, names, self.label_names, os.path.basename(label_filename)))
        with tempfile.TemporaryDirectory() as tmp:
            fixed = write_image(label.with_array(label.array.astype(np.uint8)), os.path.join(tmp, image_id + ".nii.gz"))
            return super().save_label(image_id, str(fixed), label_tag, label_info)


def _names_from_label_info(info: dict[str, Any], label_names: dict[str, int]) -> dict[int, str] | None:
    """Slicer's `label_info` [{name, idx}] -> {idx: name}; None when absent."""
    items = (info or {}).get("label_info")
    if not items:
        return None
    out = {}
    for it in items:
        if not isinstance(it, dict) or "name" not in it or "idx" not in it:
            raise LabelFactoryError("label_info must be a list of {'name': ..., 'idx': ...}", status=400)
        out[int(it["idx"])] = str(it["name"])
    return out


def _remap(arr: np.ndarray, names: dict[int, str], label_names: dict[str, int], what: str) -> np.ndarray:
    lookup = {n.lower(): v for n, v in label_names.items()}
    lut = {0: 0}
    for idx, name in names.items():
        if name.lower() not in lookup:
            raise LabelFactoryError(f"{what}: segment '{name}' is not in the label map ({', '.join(label_names)}); rename it to one of those")
        lut[idx] = lookup[name.lower()]
    found = set(np.unique(arr).tolist())
    unknown = sorted(found - set(lut))
    if unknown:
        raise LabelFactoryError(f"{what}: values {unknown[:10]} have no entry in label_info; name every segment")
    out = np.zeros(arr.shape, np.uint8)
    for src, dst in lut.items():
        out[arr == src] = dst
    return out
