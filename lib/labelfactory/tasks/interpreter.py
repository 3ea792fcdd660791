"""MONAI Label adapters for the DatasetGAN interpreter: trainer `interpreter` and infer `datasetgan`.

Trainer: every generated image in the datastore (image info holding the "labelfactory" latent
record of the current generator) with a final label -> the pixel-classifier ensemble, features
regenerated from each w -> `<model_dir>/interpreter.pt` (atomic) and
`<model_dir>/interpreter_train_stats.json`. Same library call as `labelfactory train-interpreter`.
Infer: the mask of a generated image, recomputed from the w its info records, with label names.
MONAI Label hands an infer only the image's path, so the app adds the image's latent record to
the request under "labelfactory" (apps/labelfactory/main.py).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.train import TrainTask

from labelfactory.errors import LabelFactoryError
from labelfactory.gan.checkpoint import load_generator
from labelfactory.interpreter.labeller import MODEL_FILE, Interpreter, generator_identity, load_interpreter, save_interpreter
from labelfactory.interpreter.records import latent_from_info, load_records, records_from_datastore
from labelfactory.interpreter.taps import ws_from_w
from labelfactory.interpreter.train import TrainConfig, train_ensemble
from labelfactory.io import read_image, write_image
from labelfactory.labels import LABEL_NAMES
from labelfactory.tasks.models import ModelCache

logger = logging.getLogger(__name__)
GENERATOR_FILE = "stylegan2.pt"
STATS_FILE = "interpreter_train_stats.json"
TRAIN_KEYS = {"members": int, "max_epochs": int, "patience": int, "lr": float, "pixels_per_image": int, "seed": int}


class InterpreterModels:
    """The served generator and the interpreter trained on it; both reload when their files change."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        self.generator = ModelCache(self.model_dir / GENERATOR_FILE, load_generator, "train stylegan2 first")
        self._cache: tuple[Any, ModelCache] | None = None  # (generator, its interpreter cache)
        self._lock = threading.Lock()

    def interpreter(self) -> Interpreter:
        """The interpreter for the served generator; 409 while none is trained for it."""
        G = self.generator.get()
        with self._lock:
            if self._cache is None or self._cache[0] is not G:
                hint = "label a few generated images, then train interpreter first"
                self._cache = (G, ModelCache(self.model_dir / MODEL_FILE, lambda p: load_interpreter(p, G), hint))
            return self._cache[1].get()


class InterpreterTrain(TrainTask):
    """Fits the ensemble on all labelled generated images of the current generator."""

    def __init__(self, model_dir: str | os.PathLike, defaults: TrainConfig = TrainConfig(), label_names: dict[str, int] = LABEL_NAMES):
        super().__init__("DatasetGAN style interpreter: an ensemble of pixel MLPs on the generator's features, from labelled generated images")
        self.model_dir, self.defaults, self.label_names = Path(model_dir), defaults, dict(label_names)

    def config(self) -> dict[str, Any]:
        return {k: getattr(self.defaults, k) for k in TRAIN_KEYS}

    def stats(self) -> dict[str, Any]:
        p = self.model_dir / STATS_FILE
        return json.loads(p.read_text()) if p.is_file() else {}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        overrides = {k: cast(request[k]) for k, cast in TRAIN_KEYS.items() if request.get(k) not in (None, "")}
        cfg = replace(self.defaults, **overrides)
        G = load_generator(self.model_dir / GENERATOR_FILE)
        current = generator_identity(G)
        items = [it for it in records_from_datastore(datastore) if it[1].get("generator") == current]
        if not items:
            raise LabelFactoryError("no labelled generated images of the current generator: get generated images (next sample), label them, then train interpreter", status=409)
        K = max(self.label_names.values()) + 1
        records = load_records(G, items, K, cfg.ignore_index)
        t0 = time.time()
        ens, history = train_ensemble(G, records, K, cfg, progress=False)
        data = {"images": [r.name for r in records], "count": len(records), "history": history}
        save_interpreter(self.model_dir / MODEL_FILE, ens, self.label_names, cfg.to_dict(), data, G)
        stats = {"name": "interpreter", "total_time": f"{time.time() - t0:.1f}s", "images": len(records), "epochs": len(history["epoch_loss"]),
                 "best_loss": history["best_loss"], "epoch_loss": history["epoch_loss"], "generator": current, "config": cfg.to_dict()}
        tmp = self.model_dir / (STATS_FILE + ".tmp")
        tmp.write_text(json.dumps(stats, indent=1))
        os.replace(tmp, self.model_dir / STATS_FILE)
        return stats


def latent_of(image_path: str | os.PathLike, request: dict[str, Any]) -> dict:
    """The image's latent record, which the app puts in the request from the image's datastore info."""
    return latent_from_info(request, Path(image_path).name)


class DatasetGANInfer(InferTask):
    """Mask of a generated image, recomputed from its recorded w by the generator and the interpreter."""

    def __init__(self, models: InterpreterModels, label_names: dict[str, int] = LABEL_NAMES):
        super().__init__(InferType.SEGMENTATION, {k: v for k, v in label_names.items() if v}, 2,
                         "DatasetGAN: the interpreter's mask of a generated image (from the w in its info)")
        self.models = models

    def is_valid(self) -> bool:
        return True

    def get_path(self, validate: bool = True):
        return str(self.models.model_dir / MODEL_FILE)

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        t0 = time.time()
        latent = latent_of(request["image"], request)
        interp = self.models.interpreter()
        G = interp.G
        if latent.get("generator") not in (None, generator_identity(G)):
            raise LabelFactoryError("this image was made by an earlier generator, whose features the interpreter does not know: take a new next sample", status=409)
        w = np.asarray(latent["w"], dtype=np.float32)
        if w.size != G.w_dim:
            raise LabelFactoryError(f"the image's recorded w has {w.size} values, the generator takes {G.w_dim}: take a new next sample", status=409)
        image = read_image(request["image"])
        R = G.img_resolution
        if image.array.reshape(-1).size != R * R:
            raise LabelFactoryError(f"the image is {image.array.shape}, the generator makes {R}x{R} slices: it is not this generator's image")
        lab = interp.label(ws_from_w(G, w))
        mask = lab.mask[0].cpu().numpy().astype(np.uint8).reshape(image.array.shape)
        out = tempfile.NamedTemporaryFile(suffix=request.get("result_extension") or ".nii.gz", delete=False).name
        write_image(image.with_array(mask), out)
        names = {k: v for k, v in interp.label_names.items() if v}
        return out, {"label_names": names, "uncertainty": float(lab.score[0]), "latencies": {"total": round(time.time() - t0, 3)}}
