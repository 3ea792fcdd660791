"""MONAI Label adapters for ClamNet: trainer `clamnet` and infer `clamnet` (marker mask + probability map).

Image-level labels: the CSV (`labels_csv`, see `labelfactory.clamnet.image_labels`) and, winning over it,
`image_labels` in the datastore's image info (`PUT /datastore/image/info?image=<id>`, form field `info`)
or in the final label's info (the `params` of `PUT /datastore/label`), so a Slicer user marks slices or studies
normal / abnormal through the API and retrains `clamnet` (see `datastore_image_labels`).

Model file: <model_dir>/clamnet.pt (atomic checkpoint); train stats: <model_dir>/clamnet_train_stats.json.
With `multi_gpu` the trainer runs `labelfactory train-clamnet` under torchrun on the same sources (tasks/launch.py),
each process training on its share of every batch's pairs.
The app's trainer defaults are the recipe that model file records when there is one at start (organ, size, widths,
window, target: the shipped OpenKBP model retrains alike; `recorded_config`), the app's `clamnet_<option>` conf over
it, the request's options over all.
The infer answers 409 "train clamnet first" while no model file exists and reloads when it changes.
Its result file is the marker mask, or with `probability: true` the marker probability map (float,
on the image's grid), named for the model's `marker` (e.g. "parotid"): the infer's own result, which
MONAI Label sends and removes; no server path is ever returned.
Organ mask at inference, in order: request `organ_mask` (a label tag of this datastore image, e.g.
"final" or "organ": the label stored under it, never a path; 400 otherwise), request `crop_box` (file
array indices, starts then ends), `mask_<organ>.nii.gz` under the organ dirs (see
`labelfactory.clamnet.data`), the image's final label, the project's segmentation model
(<model_dir>/segmentation.pt) when one is trained; else whole slices with a warning.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferType

from labelfactory.clamnet.crop import box_mask
from labelfactory.clamnet.data import default_organ_dirs, load_weak_slices, organ_mask, segmented_organ
from labelfactory.clamnet.image_labels import ImageLabel, rows_from_info
from labelfactory.clamnet.infer import predict_image
from labelfactory.clamnet.train import KIND, MODEL_FILE, ClamNetConfig, fit_clamnet, load_clamnet
from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image, read_image, read_label
from labelfactory.io.dataset import study_of
from labelfactory.io.image import suffix_of
from labelfactory.jsonio import write_json_atomic
from labelfactory.options import cast, config_overrides, exposed
from labelfactory.segmentation.train import MODEL_FILE as SEGMENTATION_MODEL_FILE
from labelfactory.tasks.base import InferBase, TrainBase
from labelfactory.tasks.models import ModelCache

MARKER_LABEL = {"marker": 1}  # /info's label before a model names its marker
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def tagged_label(image: Path, tag: Any) -> Path:
    """The label stored under `tag` for the datastore image at `image` (`<studies>/labels/<tag>/<id>.*`).

    `tag` is a label tag, never a path: anything else, or a tag this image has no label under, is 400."""
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise LabelFactoryError(
            'organ_mask takes a label tag of this image (e.g. "final", or the tag you saved the organ under with '
            "PUT /datastore/label?tag=...), not a path or file: letters, digits, '_' and '-' only"
        )
    if image.parent.resolve() == Path(tempfile.gettempdir()).resolve():
        raise LabelFactoryError("organ_mask needs a datastore image (image=<id>), not an uploaded file: give crop_box")
    image_id = image.name[: len(image.name) - len(suffix_of(image))]
    found = sorted((image.parent / "labels" / tag).glob(f"{glob_escape(image_id)}.*"))
    found = [f for f in found if f.is_file() and f.name[: len(f.name) - len(suffix_of(f))] == image_id]
    if not found:
        raise LabelFactoryError(
            f"organ_mask: this image has no label under tag '{tag}': save the organ first "
            f"(PUT /datastore/label?image=<id>&tag={tag}), or give crop_box"
        )
    return found[0]


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def datastore_image_labels(datastore: Datastore) -> list[ImageLabel]:
    """The `image_labels` rows of every image's info, then of its final label's info (later rows win)."""
    rows = []
    for image_id in datastore.list_images():
        rows += rows_from_info(image_id, datastore.get_image_info(image_id), f"image {image_id}: info")
        label_id = datastore.get_labels_by_image_id(image_id).get(DefaultLabelTag.FINAL.value)
        if label_id:
            info = datastore.get_label_info(label_id, DefaultLabelTag.FINAL.value)
            rows += rows_from_info(image_id, info, f"image {image_id}: final label info")
    return rows


class ClamNetTrain(TrainBase):
    """Trains the ClamNet pair on the datastore's images with the image-level labels (CSV and datastore info)."""

    name = KIND
    options = exposed(ClamNetConfig, "request")
    path_options = ("labels_csv",)

    def __init__(
        self,
        model_dir: str | os.PathLike,
        config: ClamNetConfig | None = None,
        labels_csv: str | None = None,
        organ_dirs: list[str] | None = None,
        device: str = "auto",
    ):
        description = "ClamNet: UNet++ pair trained contrastively from image-level labels (normal / abnormal)"
        super().__init__(description, model_dir, config or ClamNetConfig(), device)
        self.labels_csv, self.organ_dirs = labels_csv, organ_dirs

    def parse_request(self, request: dict[str, Any], datastore: Datastore | None = None) -> ClamNetConfig:
        config = super().parse_request(request, datastore)
        if config.head != 4 and not config.deep_supervision:
            raise LabelFactoryError(f"option head={config.head} needs deep_supervision=true (only head 4 without)")
        how = self.parse_launch(request)
        if how is not None and how.processes > config.batch:
            raise LabelFactoryError(
                f"gpus={how.processes} processes for batch={config.batch} pairs: each process trains on a share of "
                "every batch; raise batch or use fewer processes"
            )
        return config

    def config(self) -> dict[str, Any]:
        return super().config() | {"labels_csv": self.labels_csv or ""}

    def sources(self, request: dict[str, Any], datastore: Datastore) -> tuple[Path, list[Path], str | None]:
        """(studies folder, organ mask folders, labels CSV or None) a training on `datastore` reads."""
        images = [Path(datastore.get_image_uri(i)) for i in datastore.list_images()]
        if not images:
            raise LabelFactoryError("the datastore holds no images")
        studies = images[0].parent
        organ_dirs = [Path(d) for d in self.organ_dirs] if self.organ_dirs else default_organ_dirs(studies)
        return studies, organ_dirs, self.request_path(request, "labels_csv", self.labels_csv, datastore)

    def train(
        self, request: dict[str, Any], datastore: Datastore, cfg: ClamNetConfig, started: float
    ) -> dict[str, Any]:
        studies, organ_dirs, labels_csv = self.sources(request, datastore)
        slices = load_weak_slices(
            studies,
            labels_csv,
            cfg.organ,
            organ_dirs,
            None,
            cfg.size,
            cfg.margin_mm,
            cfg.ct_window,
            cfg.eta,
            datastore_image_labels(datastore),
        )
        fit = fit_clamnet(slices, cfg, out=self.model_dir / MODEL_FILE, device=self.device)
        return {"steps": cfg.steps, "loss_first": fit.history[0], "loss_last": fit.history[-1], **fit.data}

    def launch_command(self, request: dict[str, Any], datastore: Datastore, cfg: ClamNetConfig, stage: Path) -> list:
        """`labelfactory train-clamnet` on what `train` reads: the studies, organ folders, CSV and the datastore's
        image-level labels (a JSON list in `stage`), with this config."""
        studies, organ_dirs, labels_csv = self.sources(request, datastore)
        rows = [asdict(r) for r in datastore_image_labels(datastore)]
        argv = [
            "train-clamnet",
            "--studies",
            str(studies),
            "--config",
            str(write_json_atomic(asdict(cfg), stage / "config.json")),
        ]
        argv += ["--image-labels", str(write_json_atomic(rows, stage / "image_labels.json"))]
        argv += [a for d in organ_dirs for a in ("--organ-dir", str(d))]
        argv += ["--labels", labels_csv] if labels_csv else []
        return argv + ["--out", str(stage / MODEL_FILE)]

    def launched_stats(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in summary.items() if k != "model"}


class ClamNetInfer(InferBase):
    """Marker mask, or (`probability: true`) the probability map, as the result file on the image's own grid."""

    def __init__(self, model_dir: str | os.PathLike, organ_dirs: list[str] | None = None, device: str = "auto"):
        description = "ClamNet weak marker segmentation (e.g. false lumen) within the organ crop"
        super().__init__(
            Path(model_dir) / MODEL_FILE,
            InferType.SEGMENTATION,
            MARKER_LABEL,
            3,
            description,
            {"threshold": 0.5, "probability": False},
            device=device,
        )
        self.segmentation_model = Path(model_dir) / SEGMENTATION_MODEL_FILE
        self.organ_dirs = organ_dirs
        self.model = ModelCache(self.path, lambda p: load_clamnet(p, self.device), "train clamnet first")

    def _organ(
        self, request: dict[str, Any], path: Path, image: Image, organ: str, box: tuple[int, ...] | None
    ) -> tuple[Image | None, str]:
        if request.get("organ_mask"):
            return read_label(tagged_label(path, request["organ_mask"]), image), f"organ_mask {request['organ_mask']}"
        if box:
            return box_mask(image, box), "crop_box"
        dirs = [Path(d) for d in self.organ_dirs] if self.organ_dirs else default_organ_dirs(path.parent)
        mask = organ_mask(study_of(path), image, organ, dirs)
        if mask is not None:
            return mask, "organ mask of the study"
        if self.segmentation_model.is_file():
            mask = segmented_organ(self.segmentation_model, image, organ, self.device)
            found = (
                "segmentation model" if mask is not None else "none (segmentation model found no organ; whole slices)"
            )
            return mask, found
        return None, "none (whole slices)"

    def infer(self, request: dict[str, Any]) -> tuple[Image, dict[str, Any]]:
        path = Path(request["image"])
        if request.get("organ_mask"):  # options first, before the model loads: a bad one costs nothing
            tagged_label(path, request["organ_mask"])
        want_probability = request.get("probability", False)
        if not isinstance(want_probability, bool):
            raise LabelFactoryError("probability must be true (the result file is the probability map) or false")
        box = crop_box(request.get("crop_box"))
        config_overrides(ClamNetConfig(), request, ("threshold",))
        pair, cfg = self.model.get()
        cfg = config_overrides(cfg, request, ("threshold",))
        image = read_image(path)
        organ, source = self._organ(request, path, image, cfg.organ, box)
        prob, mask = predict_image(pair, cfg, image, organ)
        return prob if want_probability else mask, {
            "label_names": {cfg.marker: 1},
            "result": "probability" if want_probability else "marker",
            "organ_crop": source,
            "threshold": cfg.threshold,
            "marker_voxels": int(mask.array.sum()),
        }


def crop_box(value: Any) -> tuple[int, ...] | None:
    """The `crop_box` option: 4 (2D) or 6 (3D) whole numbers >= 0, as a JSON list or "a,b,c,d"; None if unset."""
    if value in (None, "", []):
        return None
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or len(items) not in (4, 6):
        raise LabelFactoryError(
            f"option crop_box={value!r}: expected 4 whole numbers (y0, x0, y1, x1) for a 2D image or 6 "
            "(z0, y0, x0, z1, y1, x1) for a volume"
        )
    return tuple(cast(int, "crop_box", v) for v in items)
