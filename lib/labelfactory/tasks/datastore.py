"""A MONAI Label local datastore that refuses what would corrupt it and survives a crash at any write.

Validation: image ids stay inside the datastore (plain names, never paths); uploaded images must
be readable 2D/3D images; submitted labels must match their image's shape and hold only values
of the label map. Slicer's `.seg.nrrd` labels (and NIfTI labels sent with Slicer's `label_info`)
are mapped onto the app's values by segment name and stored as NIfTI, so trainers always read
one format with one set of values.

Crash safety (MONAI Label's LocalDatastore writes in place and from stale copies):
- The index (`datastore_v2.json`) has one writer at a time across threads and processes (the
  server, its training and scoring subprocesses): every change takes the datastore's file lock,
  re-reads the index from disk, applies itself and writes the index to a temp file renamed into
  place. A process holding an old copy can no longer write it back.
- Images and labels are written to a temp file in their folder, then renamed: a crash leaves the
  old label or the new one, never a half-written file.
- A generated image's provenance (seed, truncation psi, w, generator) is written, once and
  atomically, to `<id>.labelfactory.json` beside the image before the image itself appears, and
  `get_image_info` always answers it from there: a lost or rewritten index entry cannot turn a
  generated image into a real patient.
- A damaged index is set aside (`datastore_v2.json.damaged-<time>`, logged as an error) and rebuilt
  from the files: every image and label is found again, latents come back from their sidecars.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException

from labelfactory.errors import LabelFactoryError
from labelfactory.io import read_image, read_label, write_image
from labelfactory.jsonio import TMP_SUFFIX, write_atomic, write_json_atomic
from labelfactory.labels import LABEL_NAMES
from labelfactory.latent_record import LATENT_KEY, PROVENANCE_SUFFIX

logger = logging.getLogger(__name__)

# A plain file stem. It cannot hold a '/', and since it must start with a letter or digit it cannot be '.' or '..'
# either; a '..' inside a name ("a..b") is a harmless file name, so no separate '..' check is needed.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
INDEX = "datastore_v2.json"


def check_id(image_id: str) -> str:
    """An image id is a plain file stem: letters, digits, '.', '_', '-'; never a path."""
    if not isinstance(image_id, str) or not _ID.match(image_id):
        raise LabelFactoryError(
            f"invalid image id {image_id!r}: ids are plain names (letters, digits, '.', '_', '-'), never paths",
            status=400,
        )
    return image_id


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy `src` to `dst` through a temp file in dst's folder (fsync, rename): dst is the old file or the new one."""
    with open(src, "rb") as f:
        return write_atomic(dst, lambda out: shutil.copyfileobj(f, out, 1 << 20))


def set_aside_if_damaged(index: Path) -> Path | None:
    """Move an index that does not parse out of the way (it is kept for inspection); returns where it went."""
    if not index.exists():
        return None
    try:
        LocalDatastoreModel.model_validate_json(index.read_bytes())
        return None
    except ValueError as e:  # json and pydantic errors are ValueErrors
        kept = index.with_name(f"{index.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(index, kept)
        logger.error(
            f"DATASTORE INDEX DAMAGED: {index} does not parse ({type(e).__name__}: {str(e)[:200]}); kept it as "
            f"{kept.name} and rebuilding the index from the images, labels and latent sidecars on disk"
        )
        return kept


class LabelFactoryDatastore(LocalDatastore):
    """LocalDatastore with validation and crash-safe writes; `label_names` is the app's label map."""

    def __init__(self, datastore_path: str, *args, label_names: dict[str, int] = LABEL_NAMES, **kwargs):
        self._held = threading.local()  # lock depth of this thread (the lock is re-entered by nested writes)
        self._mutex = threading.Lock()
        self._index_stamp: tuple[int, int, int] | None = None
        self._provenance: dict[str, dict] = {}
        self.label_names = label_names
        self.rebuilt_from = set_aside_if_damaged(Path(datastore_path) / kwargs.get("datastore_config", INDEX))
        super().__init__(datastore_path, *args, **kwargs)
        self._keep_provenance_of_indexed_images()
        if getattr(self, "_handler", None) is not None:  # auto reload: our writes rename the index into place
            self._handler.on_moved = self._on_moved_event
        if self.rebuilt_from:
            logger.error(
                f"datastore index rebuilt: {len(self.list_images())} images, {len(self.get_labeled_images())} "
                f"labelled, {sum(LATENT_KEY in self.get_image_info(i) for i in self.list_images())} generated "
                "(latents from their sidecars)"
            )

    # ---- one writer at a time, always on the newest index ----

    @contextlib.contextmanager
    def _index_lock(self) -> Iterator[None]:
        """The datastore's file lock (threads and processes), re-entrant per thread; the index is re-read on entry."""
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        with self._mutex, FileLock(self._lock_file):
            self._held.depth = 1
            try:
                self._read_index()
                yield
            finally:
                self._held.depth = 0

    def _read_index(self) -> None:
        try:
            st = os.stat(self._datastore_config_path)
        except FileNotFoundError:
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._index_stamp:
            return
        try:
            model = LocalDatastoreModel.model_validate_json(Path(self._datastore_config_path).read_bytes())
        except ValueError as e:
            logger.error(
                f"{self._datastore_config_path} does not parse ({type(e).__name__}); keeping the index in memory, "
                "which the next change writes back"
            )
            return
        model.base_path = self._datastore_path
        self._datastore, self._index_stamp = model, stamp

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        with self._index_lock():
            self._read_index()

    def _update_datastore_file(self, lock: bool = True) -> None:
        """Write the index atomically (always under the lock: `lock=False` callers of MONAI Label hold it already)."""
        with self._index_lock():
            write_json_atomic(
                self._datastore.model_dump(mode="json", exclude={"base_path"}), self._datastore_config_path, indent=2
            )
            st = os.stat(self._datastore_config_path)
            self._index_stamp = (st.st_ino, st.st_mtime_ns, st.st_size)

    def _reconcile_datastore(self) -> None:
        with self._index_lock():
            super()._reconcile_datastore()

    def _on_moved_event(self, event) -> None:
        if getattr(event, "dest_path", None) == self._datastore_config_path:
            self._init_from_datastore_file()

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        with self._index_lock():
            super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        with self._index_lock():
            super().update_label_info(label_id, label_tag, info)

    def set_name(self, name: str) -> None:
        with self._index_lock():
            super().set_name(name)

    def set_description(self, description: str) -> None:
        with self._index_lock():
            super().set_description(description)

    # ---- provenance of generated images: immutable, beside the image ----

    def provenance_path(self, image_id: str) -> Path:
        return Path(self._datastore.image_path()) / f"{image_id}{PROVENANCE_SUFFIX}"

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        info = super().get_image_info(image_id)
        if info:
            record = self._read_provenance(image_id)
            if record is not None:
                info[LATENT_KEY] = copy.deepcopy(record)  # callers may change what they get, never the record
        return info

    def _read_provenance(self, image_id: str) -> dict | None:
        if image_id not in self._provenance:
            path = self.provenance_path(image_id)
            if not path.is_file():
                return None
            self._provenance[image_id] = json.loads(path.read_text())[LATENT_KEY]
        return self._provenance[image_id]

    def _keep_provenance_of_indexed_images(self) -> None:
        """Index entries written before sidecars existed: their latent record is copied to a sidecar once."""
        for image_id, obj in list(self._datastore.objects.items()):
            record = obj.image.info.get(LATENT_KEY)
            if isinstance(record, dict) and not self.provenance_path(image_id).exists():
                write_json_atomic(
                    {"image": obj.image.info.get("name"), LATENT_KEY: record}, self.provenance_path(image_id)
                )

    # ---- validated, atomic images and labels ----

    def require_image(self, image_id: str) -> str:
        """The image's path; 404 for an unknown id, 400 for an id that is a path."""
        check_id(image_id)
        uri = self.get_image_uri(image_id)
        if not uri:
            raise LabelFactoryError(
                f"no image '{image_id}' in the datastore; list them with GET /datastore/?output=all", status=404
            )
        return uri

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Validate, write the provenance sidecar (generated images), copy the image atomically, then index it."""
        read_image(image_filename)  # raises a clear error for corrupt, empty, 4D, NaN uploads
        stem, ext = self._to_id(os.path.basename(image_filename))
        image_id = check_id(image_id or stem)
        name = self._filename(image_id, ext)
        info = dict(image_info or {})
        record = info.pop(LATENT_KEY, None)
        if record is not None:  # before the image exists: no generated image is ever without its provenance
            write_json_atomic({"image": name, LATENT_KEY: record}, self.provenance_path(image_id))
            self._provenance[image_id] = record
        copy_atomic(image_filename, Path(self._datastore.image_path()) / name)
        with self._index_lock():
            info.update(ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file()
        logger.info(f"added image {image_id} ({name})")
        return image_id

    def remove_image(self, image_id: str) -> None:
        super().remove_image(image_id)
        self.provenance_path(image_id).unlink(missing_ok=True)
        self._provenance.pop(image_id, None)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Validate and map the label, write it atomically as NIfTI, then index it. Returns the label id."""
        image_path = self.require_image(image_id)
        label_tag = label_tag or DefaultLabelTag.FINAL.value
        if not _ID.match(label_tag):
            raise LabelFactoryError(f"invalid label tag {label_tag!r}", status=400)
        image = read_image(image_path)
        names = _names_from_label_info(label_info, self.label_names)
        label = read_label(label_filename, reference=image, label_names=None if names else self.label_names)
        if names:  # Slicer sent {name, idx} pairs: map its indices onto our values by name
            label = label.with_array(_remap(label.array, names, self.label_names, os.path.basename(label_filename)))
        folder = Path(self._datastore.label_path(label_tag))
        folder.mkdir(parents=True, exist_ok=True)
        name = self._filename(image_id, ".nii.gz")
        with tempfile.TemporaryDirectory(prefix="lf-label-") as tmp:
            fixed = write_image(label.with_array(label.array.astype(np.uint8)), Path(tmp) / name)
            copy_atomic(fixed, folder / name)
        with self._index_lock():
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise ImageNotFoundException(f"Image {image_id} not found")
            info = {**(label_info or {}), "ts": int(time.time()), "name": name}
            obj.labels[label_tag] = DataModel(info=info, ext=".nii.gz")
            self._update_datastore_file()
        logger.info(f"saved label {label_tag}/{name}")
        return image_id

    def remove_leftover_temp_files(self) -> list[str]:
        """Temp files of writes a crash interrupted (images, labels, index); call only where no write can be running."""
        folders = [Path(self._datastore.image_path()), Path(self._datastore_path)]
        labels = Path(self._datastore.label_path(None))
        folders += [p for p in labels.iterdir() if p.is_dir()] if labels.is_dir() else []
        removed = []
        for folder in dict.fromkeys(folders):
            for p in folder.glob(f".*{TMP_SUFFIX}"):
                p.unlink(missing_ok=True)
                removed.append(str(p))
        if removed:
            logger.warning(f"removed {len(removed)} temp files left by interrupted writes: {', '.join(removed[:5])}")
        return removed


def _names_from_label_info(info: dict[str, Any], label_names: dict[str, int]) -> dict[int, str] | None:
    """Slicer's `label_info` [{name, idx}] -> {idx: name}; None when absent."""
    items = (info or {}).get("label_info")
    if not items:
        return None
    out = {}
    for it in items:
        if not isinstance(it, dict) or "name" not in it or not isinstance(it.get("idx"), int):
            raise LabelFactoryError("label_info must be a list of {'name': ..., 'idx': <integer>}", status=400)
        out[it["idx"]] = str(it["name"])
    return out


def _remap(arr: np.ndarray, names: dict[int, str], label_names: dict[str, int], what: str) -> np.ndarray:
    lookup = {n.lower(): v for n, v in label_names.items()}
    lut = {0: 0}
    for idx, name in names.items():
        if name.lower() not in lookup:
            raise LabelFactoryError(
                f"{what}: segment '{name}' is not in the label map ({', '.join(label_names)}); "
                "rename it to one of those"
            )
        lut[idx] = lookup[name.lower()]
    found = set(np.unique(arr).tolist())
    unknown = sorted(found - set(lut))
    if unknown:
        raise LabelFactoryError(f"{what}: values {unknown[:10]} have no entry in label_info; name every segment")
    out = np.zeros(arr.shape, np.uint8)
    for src, dst in lut.items():
        out[arr == src] = dst
    return out
