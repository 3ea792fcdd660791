"""MONAI Label adapters for the DatasetGAN interpreter: trainer `datasetgan` and infer `datasetgan`.

Trainer: every generated image in the datastore (image info holding a latent record of the
current generator, `labelfactory.latent_record`) with a final label -> the pixel-classifier
ensemble, features regenerated from each w -> `<model_dir>/datasetgan.pt` (atomic) and
`<model_dir>/datasetgan_train_stats.json`. Same library call as `labelfactory train-datasetgan`
(`fit_interpreter`), on the app's device; with `multi_gpu` that command runs under torchrun (tasks/launch.py), its
processes splitting the ensemble's members.
Infer: the mask of a generated image, recomputed from the w its latent record holds (`prepare`
adds the record from the datastore; the app calls it).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferType

from labelfactory.datasetgan.labeller import KIND, MODEL_FILE, Interpreter, load_interpreter, model_file
from labelfactory.datasetgan.records import load_records, records_from_datastore
from labelfactory.datasetgan.taps import ws_from_w
from labelfactory.datasetgan.train import DatasetGANConfig, fit_interpreter, fit_summary, member_share
from labelfactory.devices import resolve_device
from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image, read_image
from labelfactory.jsonio import write_json_atomic
from labelfactory.labels import LABEL_NAMES, foreground, require_same_map
from labelfactory.latent_record import LATENT_KEY, latent_from_info
from labelfactory.options import exposed
from labelfactory.stylegan2.checkpoint import MODEL_FILE as GENERATOR_FILE
from labelfactory.stylegan2.checkpoint import load_generator
from labelfactory.stylegan2.identity import generator_identity
from labelfactory.tasks.base import InferBase, TrainBase
from labelfactory.tasks.models import ModelCache


class DatasetGANModels:
    """The served generator and the interpreter trained on it, both on `device`; both reload when their files
    change."""

    def __init__(self, model_dir: str | os.PathLike, label_names: dict[str, int] | None = None, device: str = "auto"):
        self.model_dir = Path(model_dir)
        self.label_names = label_names  # the served label map: an interpreter trained with another is refused (409)
        self.device = resolve_device(device)
        self.generator = ModelCache(
            self.model_dir / GENERATOR_FILE, lambda p: load_generator(p, self.device), "train stylegan2 first"
        )
        self._cache: tuple[Any, Path, ModelCache] | None = None  # (generator, model file, its interpreter cache)
        self._lock = threading.Lock()

    def interpreter(self) -> Interpreter:
        """The interpreter for the served generator; ModelMissing (409) while none is trained for it."""
        G = self.generator.get()
        path = model_file(self.model_dir)
        with self._lock:
            if self._cache is None or self._cache[0] is not G or self._cache[1] != path:
                hint = "label a few generated images, then train datasetgan first"
                self._cache = (G, path, ModelCache(path, lambda p: load_interpreter(p, G), hint))
            interp = self._cache[2].get()
        if self.label_names is not None:
            require_same_map(interp.label_names, self.label_names, path.name)
        return interp


class DatasetGANTrain(TrainBase):
    """Fits the ensemble on all labelled generated images of the current generator."""

    name = KIND
    options = exposed(DatasetGANConfig, "request")

    def __init__(
        self,
        model_dir: str | os.PathLike,
        defaults: DatasetGANConfig | None = None,
        label_names: dict[str, int] = LABEL_NAMES,
        deprecated_as: str | None = None,
        device: str = "auto",
    ):
        description = "DatasetGAN style interpreter: an ensemble of pixel MLPs on the generator's features"
        if deprecated_as:  # an old name that still trains the same model (Slicer's saved settings keep working)
            description = f"'{deprecated_as}' is deprecated, use '{KIND}' (the same trainer): {description}"
        super().__init__(
            f"{description}, from labelled generated images", model_dir, defaults or DatasetGANConfig(), device
        )
        self.label_names = dict(label_names)

    def parse_request(self, request: dict[str, Any], datastore: Datastore | None = None) -> DatasetGANConfig:
        cfg = super().parse_request(request, datastore)
        how = self.parse_launch(request)
        if how is not None:
            member_share(cfg.members, 0, how.processes)  # 400 before any work: every process needs a member
        return cfg

    def train(
        self, request: dict[str, Any], datastore: Datastore, cfg: DatasetGANConfig, started: float
    ) -> dict[str, Any]:
        G = load_generator(self.model_dir / GENERATOR_FILE, self.device)
        K = max(self.label_names.values()) + 1
        records = load_records(G, self.items(datastore, G), K, cfg.ignore_index)
        return fit_summary(fit_interpreter(G, records, self.label_names, cfg, self.model_dir / MODEL_FILE), G, cfg)

    def items(self, datastore: Datastore, G) -> list[tuple[str, dict, str]]:
        """(image id, latent record, label file) of every labelled generated image of generator G; 409 for none."""
        current = generator_identity(G)
        items = [it for it in records_from_datastore(datastore) if it[1].get("generator") == current]
        if not items:
            msg = (
                "no labelled generated images of the current generator: get generated images (next sample), label them"
            )
            raise LabelFactoryError(f"{msg}, then train datasetgan", status=409)
        return items

    def launch_command(
        self, request: dict[str, Any], datastore: Datastore, cfg: DatasetGANConfig, stage: Path
    ) -> list[str]:
        """`labelfactory train-datasetgan` on the images `train` would use (a JSON list in `stage`), this config and
        label map; its ranks split the members."""
        generator = self.model_dir / GENERATOR_FILE
        items = self.items(datastore, load_generator(generator, "cpu"))
        argv = ["train-datasetgan", "--generator", str(generator)]
        argv += ["--items", str(write_json_atomic(items, stage / "items.json"))]
        argv += ["--config", str(write_json_atomic(cfg.to_dict(), stage / "config.json"))]
        argv += ["--label-map", str(write_json_atomic(self.label_names, stage / "label_names.json"))]
        return argv + ["--out", str(stage / MODEL_FILE), "--no-progress"]

    def launched_stats(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in summary.items() if k != "model"}


class DatasetGANInfer(InferBase):
    """Mask of a generated image, recomputed from its recorded w by the generator and the interpreter."""

    def __init__(self, models: DatasetGANModels, label_names: dict[str, int] = LABEL_NAMES):
        description = "DatasetGAN: the interpreter's mask of a generated image (from the w in its info)"
        super().__init__(
            models.model_dir / MODEL_FILE,
            InferType.SEGMENTATION,
            foreground(label_names),
            2,
            description,
            device=str(models.device),
        )
        self.models = models

    def prepare(self, request: dict[str, Any], datastore: Datastore, image_id: str | None) -> dict[str, Any]:
        """A generated image's latent record (seed, psi, w) travels with the request (the task sees only a path)."""
        record = (datastore.get_image_info(image_id) or {}).get(LATENT_KEY) if image_id else None
        return {**request, LATENT_KEY: record} if record else request

    def infer(self, request: dict[str, Any]) -> tuple[Image, dict[str, Any]]:
        latent = latent_from_info(request, Path(request["image"]).name)
        interp = self.models.interpreter()
        G = interp.G
        if latent.get("generator") not in (None, generator_identity(G)):
            msg = "this image was made by an earlier generator, whose features the interpreter does not know"
            raise LabelFactoryError(f"{msg}: take a new next sample", status=409)
        w = np.asarray(latent["w"], dtype=np.float32)
        if w.size != G.w_dim:
            msg = f"the image's recorded w has {w.size} values, the generator takes {G.w_dim}"
            raise LabelFactoryError(f"{msg}: take a new next sample", status=409)
        image = read_image(request["image"])
        R = G.img_resolution
        if image.array.reshape(-1).size != R * R:
            msg = f"the image is {image.array.shape}, the generator makes {R}x{R} slices"
            raise LabelFactoryError(f"{msg}: it is not this generator's image")
        lab = interp.label(ws_from_w(G, w))
        mask = lab.mask[0].cpu().numpy().astype(np.uint8).reshape(image.array.shape)
        return image.with_array(mask), {
            "label_names": foreground(interp.label_names),
            "uncertainty": float(lab.score[0]),
        }
