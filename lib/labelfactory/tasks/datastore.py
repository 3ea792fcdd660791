"""A MONAI Label local datastore that refuses what would corrupt it and survives a crash at any write.

Validation: image ids stay inside the datastore (plain names, never paths); uploaded images must
be readable 2D/3D images; submitted labels must match their image's shape and hold only values
of the label map. Slicer's `.seg.nrrd` labels (and NIfTI labels sent with Slicer's `label_info`)
are mapped onto the app's values by segment name and stored as NIfTI, so trainers always read
one format with one set of values. A label's info may say which organs it contains (`contoured`, organ
names of the map; absent: all of them): unknown names are refused (400) and the trainers read it
(`final_studies`).

All or nothing: every change is validated whole (info must be strict JSON: finite numbers, nested at
most MAX_INFO_DEPTH deep), the new index is serialised before any file moves, and the file and the
index are written together: on any failure the replaced file is put back and the index in memory is
rolled back, so one bad request cannot leave later requests failing. A label is written only under the
index lock, after the image is found there (a concurrent delete leaves no label behind); a label
of another grid (shape, spacing, origin, direction) is refused. Re-uploading an image keeps its labels
when the new image is on the same grid with the same provenance; otherwise the upload is refused (409)
unless its params say `{"discard_labels": true}`. Provenance (`LATENT_KEY`) is set only through
`add_image(..., latent=...)`, the server's synthesis path: client info holding it is refused (400), and
a real image uploaded over a generated id drops the old record. A model's label (`save_label(...,
by_model=...)`, the app's infer) never replaces an annotator's: only tag `original` or a tag that
holds no label or another model's label (409 otherwise).

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
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

from labelfactory.errors import LabelFactoryError
from labelfactory.io import read_image, read_label, write_image
from labelfactory.io.dataset import Study
from labelfactory.io.image import geometry_difference, suffix_of
from labelfactory.jsonio import TMP_SUFFIX, temp_beside, write_atomic, write_json_atomic
from labelfactory.labels import CONTOURED_KEY, LABEL_NAMES, check_contoured
from labelfactory.latent_record import LATENT_KEY, PROVENANCE_SUFFIX
from labelfactory.options import cast

logger = logging.getLogger(__name__)

# A plain file stem. It cannot hold a '/', and since it must start with a letter or digit it cannot be '.' or '..'
# either; a '..' inside a name ("a..b") is a harmless file name, so no separate '..' check is needed.
# Matched whole (fullmatch): a '$' would also accept a trailing newline.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
INDEX = "datastore_v2.json"
MAX_INFO_DEPTH = 32  # nesting of image and label info (MONAI Label's clients send 2 or 3 levels)
DISCARD_LABELS = "discard_labels"  # image upload param: replace an image on another grid, dropping its labels
MODEL_KEY = "saved_by_model"  # label info: the model whose infer wrote the label (set by the datastore only)
RESERVED_KEYS = (LATENT_KEY, MODEL_KEY)  # info keys only the server sets


def check_id(image_id: str, what: str = "image id") -> str:
    """An image id (or label tag) is a plain file stem: letters, digits, '.', '_', '-'; never a path."""
    if not isinstance(image_id, str) or not _ID.fullmatch(image_id):
        raise LabelFactoryError(
            f"invalid {what} {image_id!r}: {what}s are plain names (letters, digits, '.', '_', '-'), never paths",
            status=400,
        )
    return image_id


def check_strict_json(value: Any, what: str) -> None:
    """400 unless `value` is strict JSON: string keys, finite numbers, nested at most MAX_INFO_DEPTH deep."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list | tuple):
            if depth > MAX_INFO_DEPTH:
                raise LabelFactoryError(f"{what} is nested deeper than {MAX_INFO_DEPTH} levels")
            if isinstance(v, dict):
                if not all(isinstance(k, str) for k in v):
                    raise LabelFactoryError(f"{what}: every key must be a string")
                v = v.values()
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, float) and not np.isfinite(v):
            raise LabelFactoryError(f"{what} holds {v}: JSON has no NaN or infinity; send a number or null")
        elif not (v is None or isinstance(v, str | bool | int | float)):
            raise LabelFactoryError(f"{what} holds a {type(v).__name__}, which JSON cannot carry")


def client_info(info: Any, what: str) -> dict[str, Any]:
    """A client's image or label info, checked (a JSON object, strict JSON, no key only the server sets)."""
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise LabelFactoryError(f"{what} must be a JSON object, got a {type(info).__name__}")
    reserved = [k for k in RESERVED_KEYS if k in info]
    if reserved:
        raise LabelFactoryError(
            f"{what} may not set {', '.join(reserved)}: the server records provenance and model labels itself"
        )
    check_strict_json(info, what)
    return copy.deepcopy(info)


def final_studies(datastore: Datastore) -> list[Study]:
    """The datastore's images with a final label, as Study, each with the organs its label's info says were
    contoured (None: every organ)."""
    studies = []
    for d in datastore.datalist():
        image = Path(d["image"])
        sid = image.name[: -len(suffix_of(image))]
        names = (datastore.get_label_info(sid, DefaultLabelTag.FINAL.value) or {}).get(CONTOURED_KEY)
        studies.append(Study(sid, image, Path(d["label"]), None if names is None else tuple(names)))
    return studies


def unlabelled_studies(datastore: Datastore) -> list[Study]:
    """The datastore's images without a final label (MONAI Label's unlabelled list), as Study without label."""
    studies = []
    for image_id in datastore.get_unlabeled_images():
        path = Path(datastore.get_image_uri(image_id))
        studies.append(Study(image_id, path, None))
    return studies


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
            self._write_index(self._index_bytes())

    def _index_bytes(self) -> bytes:
        """The index in memory as strict JSON; 400 when it cannot be (the change is then rolled back by `_change`)."""
        try:
            data = self._datastore.model_dump(mode="json", exclude={"base_path"})
            return json.dumps(data, indent=2, allow_nan=False).encode()
        except (ValueError, TypeError, RecursionError) as e:  # pydantic's serialisation errors are ValueErrors
            raise LabelFactoryError(
                f"the change cannot be stored as JSON ({type(e).__name__}: {str(e)[:200]}); nothing was changed"
            ) from None

    def _write_index(self, data: bytes) -> None:
        with self._index_lock():
            write_atomic(self._datastore_config_path, lambda f: f.write(data))
            st = os.stat(self._datastore_config_path)
            self._index_stamp = (st.st_ino, st.st_mtime_ns, st.st_size)

    @contextlib.contextmanager
    def _change(self) -> Iterator[None]:
        """One change of the index, under the lock: all of it or none (on any failure the index in memory is
        rolled back to what it was, and re-read from disk at the next change), so later requests keep working."""
        with self._index_lock():
            if getattr(self._held, "changing", False):  # nested: the outer change rolls back
                yield
                return
            before = self._datastore.model_copy(deep=True)
            self._held.changing = True
            try:
                yield
            except BaseException:
                self._datastore, self._index_stamp = before, None
                raise
            finally:
                self._held.changing = False

    def _reconcile_datastore(self) -> None:
        with self._change():
            super()._reconcile_datastore()

    def _on_moved_event(self, event) -> None:
        if getattr(event, "dest_path", None) == self._datastore_config_path:
            self._init_from_datastore_file()

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        info = client_info(info, f"the info of image {image_id}")
        with self._change():
            super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        info = self._checked_contoured(client_info(info, f"the info of label {label_tag}/{label_id}"))
        with self._change():
            super().update_label_info(label_id, label_tag, info)

    def _checked_contoured(self, info: dict[str, Any]) -> dict[str, Any]:
        """Label info with its `contoured` organ names (if any) checked against the label map (400 naming the
        valid organs) and spelt as the map spells them."""
        if CONTOURED_KEY in info:
            info[CONTOURED_KEY] = check_contoured(info[CONTOURED_KEY], self.label_names)
        return info

    def set_name(self, name: str) -> None:
        check_strict_json(name, "the datastore's name")
        with self._change():
            super().set_name(name)

    def set_description(self, description: str) -> None:
        check_strict_json(description, "the datastore's description")
        with self._change():
            super().set_description(description)

    # ---- provenance of generated images: immutable, beside the image ----

    def provenance_path(self, image_id: str) -> Path:
        return Path(self._datastore.image_path()) / f"{image_id}{PROVENANCE_SUFFIX}"

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        """The image's info; its latent record comes from its sidecar only (never from the index)."""
        info = super().get_image_info(image_id)
        if info:
            info.pop(LATENT_KEY, None)
            record = self._read_provenance(image_id)
            if record is not None:
                info[LATENT_KEY] = copy.deepcopy(record)  # callers may change what they get, never the record
        return info

    def _read_provenance(self, image_id: str) -> dict | None:
        """The sidecar's record, cached while the file is unchanged (another process may replace or remove it)."""
        path = self.provenance_path(image_id)
        try:
            st = path.stat()
        except FileNotFoundError:
            self._provenance.pop(image_id, None)
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._provenance.get(image_id)
        if cached is None or cached[0] != stamp:
            cached = self._provenance[image_id] = (stamp, json.loads(path.read_text())[LATENT_KEY])
        return cached[1]

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

    def _label_files(self, image_id: str) -> list[Path]:
        """Every file in a label tag's folder named for `image_id`, indexed or not (what a crash may have left)."""
        root = Path(self._datastore.label_path(None))
        tags = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
        return [f for t in tags for f in t.iterdir() if f.is_file() and self._to_id(f.name)[0] == image_id]

    def add_image(
        self, image_id: str, image_filename: str, image_info: dict[str, Any], *, latent: dict[str, Any] | None = None
    ) -> str:
        """Validate, then write the image (a generated one's provenance sidecar first) and the index together.

        `latent`: the latent record of an image the server generated (`tasks.synthesis.add_generated_image`
        only; no route passes it). An image replacing one with labels keeps them when it is on the same grid
        with the same provenance; otherwise it is refused (409) unless `image_info` says DISCARD_LABELS.
        """
        new = read_image(image_filename)  # raises a clear error for corrupt, empty, 4D, NaN uploads
        stem, ext = self._to_id(os.path.basename(image_filename))
        image_id = check_id(image_id or stem)
        info = dict(image_info or {})
        discard = cast(bool, DISCARD_LABELS, info.pop(DISCARD_LABELS, False))
        info = client_info(info, f"the info of image {image_id}")
        if latent is not None:
            check_strict_json(latent, f"the latent record of {image_id}")
        name = self._filename(image_id, ext)
        images = Path(self._datastore.image_path())
        with self._change():
            old = self._datastore.objects.get(image_id)
            keep = False
            if old is not None and old.labels:
                why = self._other_image(image_id, old.image.ext, new, latent)
                keep = why is None
                if not keep and not discard:
                    raise LabelFactoryError(
                        f"image {image_id} has labels ({', '.join(sorted(old.labels))}) drawn on another image: "
                        f'{why}. Upload it under a new id, or send params={{"{DISCARD_LABELS}": true}} to '
                        "replace the image and delete its labels",
                        status=409,
                    )
            labels = old.labels if keep else {}
            # every label file not kept goes: one left by a crash or an old server never attaches to this image
            dropped = [
                f
                for f in self._label_files(image_id)
                if not (f.parent.name in labels and f.name == self._filename(image_id, labels[f.parent.name].ext))
            ]
            info.update(ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext), labels=labels)
            index = self._index_bytes()
            with contextlib.ExitStack() as placed:
                # labels that go are moved aside first: after a crash at any later step they are temp files
                # (removed at start), never labels of the new image
                placed.enter_context(_set_aside(dropped))
                if latent is not None:  # before the image: no generated image is ever without its provenance
                    record = json.dumps({"image": name, LATENT_KEY: latent}, indent=1).encode()
                    placed.enter_context(_placed(self.provenance_path(image_id), data=record))
                placed.enter_context(_placed(images / name, src=image_filename))
                self._write_index(index)
            # after the image: a crash in between leaves a real image marked generated (left out of training),
            # never a generated one passing for real
            if latent is None:
                self.provenance_path(image_id).unlink(missing_ok=True)
            if old is not None and old.image.ext != ext:
                (images / self._filename(image_id, old.image.ext)).unlink(missing_ok=True)
        if dropped:
            logger.warning(f"image {image_id}: deleted label files {[str(f) for f in dropped]}")
        logger.info(f"added image {image_id} ({name})")
        return image_id

    def _other_image(self, image_id: str, old_ext: str, new, latent: dict | None) -> str | None:
        """None when the new image replaces the old one's pixels only (same grid, same provenance); else why not."""
        try:
            old = read_image(Path(self._datastore.image_path()) / self._filename(image_id, old_ext))
        except LabelFactoryError as e:
            return f"the image it replaces cannot be read ({e})"
        if latent != self._read_provenance(image_id):
            return "its provenance (generated or real, and which generator, seed and latent) differs"
        return geometry_difference(new, old, "the new image", "replaced image")

    def remove_image(self, image_id: str) -> None:
        """Remove the image from the index first, then its files: a crash in between brings it back whole."""
        check_id(image_id)
        with self._change():
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise ImageNotFoundException(f"Image {image_id} not found")
            del self._datastore.objects[image_id]
            self._update_datastore_file()
            for f in self._label_files(image_id):
                f.unlink(missing_ok=True)
            (Path(self._datastore.image_path()) / self._filename(image_id, obj.image.ext)).unlink(missing_ok=True)
            self.provenance_path(image_id).unlink(missing_ok=True)
        logger.info(f"removed image {image_id} and its labels")

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_id(label_id)
        check_id(label_tag, "label tag")
        with self._change():
            label = self._datastore.label(label_id, label_tag)
            if label is None:
                raise LabelNotFoundException(f"Label: {label_id} Tag: {label_tag} not found")
            del self._datastore.objects[label_id].labels[label_tag]
            self._update_datastore_file()
            (Path(self._datastore.label_path(label_tag)) / self._filename(label_id, label.ext)).unlink(missing_ok=True)

    def save_label(
        self,
        image_id: str,
        label_filename: str,
        label_tag: str,
        label_info: dict[str, Any],
        *,
        by_model: str | None = None,
    ) -> str:
        """Validate and map the label, then write it (NIfTI) and the index together. Returns the label id.

        `by_model`: the model whose infer wrote it (the app's infer with save_label); such a label goes only
        into tag `original` or a tag holding no annotator's label (409 otherwise).
        """
        image_path = self.require_image(image_id)
        label_tag = check_id(label_tag or DefaultLabelTag.FINAL.value, "label tag")
        if by_model is None:
            info = self._checked_contoured(client_info(label_info, f"the info of label {label_tag}/{image_id}"))
        else:  # MONAI Label's infer: {"model": ..., "params": the result JSON}, none of it from a client's info
            info = dict(label_info or {})
            check_strict_json(info, f"the info of model {by_model}'s label")
            info[MODEL_KEY] = by_model
        try:
            checked = os.stat(image_path)  # before reading: a replacement after this is seen at the write
            image = read_image(image_path)
        except (FileNotFoundError, LabelFactoryError):
            if not os.path.exists(image_path):  # deleted since it was looked up (a concurrent delete): a 500 before
                raise ImageNotFoundException(f"Image {image_id} not found") from None
            raise
        names = _names_from_label_info(info, self.label_names)
        label = read_label(
            label_filename,
            reference=image,
            label_names=None if names else self.label_names,
            check_geometry=True,
        )
        if names:  # Slicer sent {name, idx} pairs: map its indices onto our values by name
            label = label.with_array(_remap(label.array, names, self.label_names, os.path.basename(label_filename)))
        name = self._filename(image_id, ".nii.gz")
        dst = Path(self._datastore.label_path(label_tag)) / name
        with tempfile.TemporaryDirectory(prefix="lf-label-") as tmp:
            fixed = write_image(label.with_array(label.array.astype(np.uint8)), Path(tmp) / name)
            with self._change():
                obj = self._datastore.objects.get(image_id)
                if obj is None:  # deleted meanwhile: nothing is written
                    raise ImageNotFoundException(f"Image {image_id} not found")
                if not _same_file(image_path, checked):
                    raise LabelFactoryError(
                        f"image {image_id} was replaced while its label was checked; save the label again", status=409
                    )
                if by_model is not None:
                    self.check_model_may_write(image_id, label_tag, by_model)
                info.update(ts=int(time.time()), name=name)
                obj.labels[label_tag] = DataModel(info=info, ext=".nii.gz")
                index = self._index_bytes()
                with _placed(dst, src=fixed):
                    self._write_index(index)
        logger.info(f"saved label {label_tag}/{name}" + (f" (model {by_model})" if by_model else ""))
        return image_id

    def check_model_may_write(self, image_id: str, label_tag: str, model: str) -> None:
        """409 unless a model's label may go to `label_tag`: tag `original`, or one holding no annotator's label."""
        existing = self._datastore.label(image_id, label_tag)
        if label_tag != DefaultLabelTag.ORIGINAL.value and existing is not None and MODEL_KEY not in existing.info:
            raise LabelFactoryError(
                f"label '{label_tag}' of {image_id} was saved by an annotator; model {model} may not overwrite it. "
                f"Save the model's label as '{DefaultLabelTag.ORIGINAL.value}' (the default) or under a new tag",
                status=409,
            )

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


def _same_file(path: str, before: os.stat_result) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_ino, st.st_mtime_ns, st.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)


@contextlib.contextmanager
def _placed(dst: Path, src: str | os.PathLike | None = None, data: bytes | None = None) -> Iterator[None]:
    """`dst` replaced atomically by `src`'s bytes (or `data`); if the with-block fails, `dst` is put back as it was.

    The old file is kept meanwhile as a hard link beside it (a `.tmp`, removed at server start if a crash
    leaves it)."""
    backup = None
    if dst.exists():
        fd, backup = temp_beside(dst)
        os.close(fd)
        os.unlink(backup)
        try:
            os.link(dst, backup)
        except OSError:  # a file system without hard links
            shutil.copy2(dst, backup)
    try:
        if src is not None:
            copy_atomic(src, dst)
        else:
            write_atomic(dst, lambda f: f.write(data))
        yield
    except BaseException:
        if backup is not None:
            os.replace(backup, dst)
            backup = None
        else:
            dst.unlink(missing_ok=True)
        raise
    finally:
        if backup is not None:
            Path(backup).unlink(missing_ok=True)


@contextlib.contextmanager
def _set_aside(files: list[Path]) -> Iterator[None]:
    """`files` renamed to temp names beside them; deleted if the with-block succeeds, put back if it fails."""
    moved = []
    try:
        for f in files:
            fd, tmp = temp_beside(f)
            os.close(fd)
            os.replace(f, tmp)
            moved.append((f, tmp))
        yield
    except BaseException:
        for f, tmp in reversed(moved):
            os.replace(tmp, f)
        raise
    for _, tmp in moved:
        Path(tmp).unlink(missing_ok=True)


def _names_from_label_info(info: dict[str, Any], label_names: dict[str, int]) -> dict[int, str] | None:
    """Slicer's `label_info` [{name, idx}] -> {idx: name}; None when absent."""
    items = (info or {}).get("label_info")
    if not items:
        return None
    if not isinstance(items, list):
        raise LabelFactoryError(f"label_info must be a list of {{'name': ..., 'idx': <integer>}}, got {items!r:.80}")
    out = {}
    for it in items:
        if not isinstance(it, dict) or "name" not in it or type(it.get("idx")) is not int:
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
