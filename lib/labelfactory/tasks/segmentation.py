"""MONAI Label adapters for the downstream segmenter: trainer `segmentation` and infer `segmentation`.

Model file: <model_dir>/segmentation.pt (atomic checkpoint, best validation Dice so far);
train stats: <model_dir>/segmentation_train_stats.json; TensorBoard: <model_dir>/segmentation_logs.
The trainer is a TrainTask, not a BasicTrainTask: BasicTrainTask feeds whole datastore files
through dict transforms and saves bare state dicts, while this model trains on 2D slices of
volumes plus synthetic pairs and must record its config, data and code version; it calls the same
library function as `labelfactory train-segmentation`. The infer answers 409 "train segmentation
first" while no model file exists, reloads when the file changes, and returns the label on the
input's own grid (2D image or 3D volume, slice by slice).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.train import TrainTask

from labelfactory.interpreter.records import LATENT_KEY
from labelfactory.io import read_image, write_image
from labelfactory.io.dataset import Study
from labelfactory.io.image import suffix_of
from labelfactory.labels import LABEL_NAMES
from labelfactory.segmentation.data import training_sets
from labelfactory.segmentation.infer import load_segmenter, segment_image
from labelfactory.segmentation.networks import NETWORKS
from labelfactory.segmentation.train import TrainConfig, train_segmenter
from labelfactory.tasks.models import ModelCache

MODEL_FILE = "segmentation.pt"
STATS_FILE = "segmentation_train_stats.json"
TRAIN_KEYS = ("network", "size", "steps", "batch_size", "lr", "val_interval", "seed")


class SegmentationTrain(TrainTask):
    """Trains the segmenter on the synthetic data set (if any) plus the datastore's final labels."""

    def __init__(self, model_dir: str | os.PathLike, config: TrainConfig | None = None, synthetic_dir: str | None = None):
        super().__init__("2D segmenter (UNet++ by default) on synthetic pairs plus real labels; validation Dice on held-out real patients")
        self.model_dir = Path(model_dir)
        self.defaults = config or TrainConfig()
        self.synthetic_dir = synthetic_dir

    def config(self) -> dict[str, Any]:
        net = [self.defaults.network] + [n for n in NETWORKS if n != self.defaults.network]
        return {**{k: getattr(self.defaults, k) for k in TRAIN_KEYS}, "network": net,
                "synthetic": self.synthetic_dir or "", "real": "all", "val_patients": 1}

    def stats(self) -> dict[str, Any]:
        p = self.model_dir / STATS_FILE
        return json.loads(p.read_text()) if p.is_file() else {}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        cast = {"network": str, "size": int, "steps": int, "batch_size": int, "lr": float, "val_interval": int, "seed": int}
        overrides = {k: cast[k](request[k][0] if isinstance(request[k], list) else request[k]) for k in TRAIN_KEYS if k in request}
        config = TrainConfig(**{**asdict(self.defaults), **overrides})
        synthetic = request.get("synthetic", self.synthetic_dir) or None
        if synthetic and not Path(synthetic, "images").is_dir():
            synthetic = None  # nothing synthesized yet: real labels only
        real = str(request.get("real", "all"))
        studies = [Study(Path(d["image"]).name[: -len(suffix_of(d["image"]))], Path(d["image"]), Path(d["label"])) for d in datastore.datalist()]
        # real patients only: labelled generated images (DatasetGAN's loop) belong to the interpreter
        studies = [s for s in studies if LATENT_KEY not in (datastore.get_image_info(s.id) or {})]
        t0 = time.time()
        train, val, data = training_sets(studies, synthetic, None if real == "all" else int(real), int(request.get("val_patients", 1)), config.size)
        result = train_segmenter(train, val, config, out=self.model_dir / MODEL_FILE, log_dir=self.model_dir / "segmentation_logs", data=data)
        stats = {"name": "segmentation", "network": config.network, "total_time": f"{time.time() - t0:.1f}s", "steps": result.steps,
                 "best_metric": result.best_val_dice, "best_step": result.best_step, "history": result.history, **data}
        tmp = self.model_dir / (STATS_FILE + ".tmp")
        tmp.write_text(json.dumps(stats, indent=2))
        os.replace(tmp, self.model_dir / STATS_FILE)
        return stats


class SegmentationInfer(InferTask):
    """Organ label map of a real 2D image or 3D volume, on the input's grid."""

    def __init__(self, model_dir: str | os.PathLike, label_names: dict[str, int] = LABEL_NAMES):
        labels = {k: v for k, v in label_names.items() if v}
        super().__init__(InferType.SEGMENTATION, labels, 3, "Organ segmentation by the segmenter trained on synthetic (and real) pairs")
        self.path = Path(model_dir) / MODEL_FILE
        self.model = ModelCache(self.path, load_segmenter, "train segmentation first")

    def is_valid(self) -> bool:
        return True

    def get_path(self, validate: bool = True):
        return str(self.path)

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        t0 = time.time()
        segmenter = self.model.get()
        image = read_image(request["image"])
        label = segment_image(segmenter, image)
        out = tempfile.NamedTemporaryFile(suffix=request.get("result_extension") or ".nii.gz", delete=False).name
        write_image(label.with_array(label.array.astype(np.uint8)), out)
        names = {k: v for k, v in segmenter.label_names.items() if v}
        return out, {"label_names": names, "model": {"network": segmenter.record["config"]["network"], **segmenter.record.get("metrics", {})},
                     "latencies": {"total": round(time.time() - t0, 3)}}
