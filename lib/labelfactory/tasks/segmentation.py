"""MONAI Label adapters for the downstream segmenter: trainer `segmentation` and infer `segmentation`.

Model file: <model_dir>/segmentation.pt (atomic checkpoint, best validation Dice so far);
train stats: <model_dir>/segmentation_train_stats.json; TensorBoard: <model_dir>/segmentation_logs.
The trainer calls the same library function as `labelfactory train-segmentation` (see
tasks/base.py for why not BasicTrainTask); with `multi_gpu` it runs that command under torchrun
on the same studies and config (tasks/launch.py). The infer answers 409 "train segmentation first"
while no model file exists, reloads when the file changes, and returns the label on the input's
own grid (2D image or 3D volume, slice by slice).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferType

from labelfactory.io import Image, Window, read_image
from labelfactory.io.dataset import Study, write_datalist
from labelfactory.jsonio import write_json_atomic
from labelfactory.labels import LABEL_NAMES, foreground, require_same_map
from labelfactory.latent_record import is_generated
from labelfactory.options import cast, exposed
from labelfactory.segmentation.data import training_sets, unlabelled_record, unlabelled_slices
from labelfactory.segmentation.infer import load_segmenter, segment_image
from labelfactory.segmentation.networks import NETWORKS
from labelfactory.segmentation.train import KIND, MODEL_FILE, SegmentationConfig, train_segmenter
from labelfactory.tasks.base import InferBase, TrainBase
from labelfactory.tasks.datastore import final_studies, unlabelled_studies
from labelfactory.tasks.models import ModelCache


class SegmentationTrain(TrainBase):
    """Trains the segmenter on the synthetic data set (if any) plus the datastore's final labels."""

    name = KIND
    options = exposed(SegmentationConfig, "request")
    path_options = ("synthetic",)

    def __init__(
        self,
        model_dir: str | os.PathLike,
        config: SegmentationConfig | None = None,
        synthetic_dir: str | None = None,
        device: str = "auto",
    ):
        description = "2D segmenter (UNet++ by default) on synthetic pairs plus real labels"
        super().__init__(
            f"{description}; validation Dice on held-out real patients",
            model_dir,
            config or SegmentationConfig(),
            device,
        )
        self.synthetic_dir = synthetic_dir

    def parse_request(self, request: dict[str, Any], datastore: Datastore | None = None) -> SegmentationConfig:
        real_options(request)
        return super().parse_request(request, datastore)

    def config(self) -> dict[str, Any]:
        networks = [self.defaults.network] + [n for n in NETWORKS if n != self.defaults.network]  # a combo box
        return super().config() | {
            "network": networks,
            "synthetic": self.synthetic_dir or "",
            "real": "all",
            "val_patients": 1,
        }

    def train(
        self, request: dict[str, Any], datastore: Datastore, config: SegmentationConfig, started: float
    ) -> dict[str, Any]:
        synthetic = self.request_path(request, "synthetic", self.synthetic_dir, datastore) or None
        if synthetic and not Path(synthetic, "images").is_dir():
            synthetic = None  # nothing synthesized yet: real labels only
        studies = final_studies(datastore)  # each with its label's contoured organs (partial labels)
        # real patients only: labelled generated images (DatasetGAN's loop) belong to the interpreter
        studies = [s for s in studies if not is_generated(datastore.get_image_info(s.id))]
        k_real, val_patients = real_options(request)
        train, real, val, data = training_sets(
            studies,
            synthetic,
            k_real,
            val_patients,
            config.size,
            config.label_names,
            Window(*config.window),
            config.slicing,
        )
        unlabelled = None
        if config.consistency > 0:  # Mean Teacher: the datastore's real images nobody labelled yet
            unlabelled = unlabelled_slices(
                real_unlabelled(datastore), config.size, Window(*config.window), config.slicing
            )
            data |= unlabelled_record(unlabelled)
        result = train_segmenter(
            train,
            val,
            config,
            out=self.model_dir / MODEL_FILE,
            log_dir=self.model_dir / f"{KIND}_logs",
            data=data,
            real_set=real,
            device=self.device,
            unlabelled_set=unlabelled,
        )
        return {
            "network": config.network,
            "steps": result.steps,
            "best_metric": result.best_val_dice,
            "best_step": result.best_step,
            "history": result.history,
            **data,
        }

    def launch_command(
        self, request: dict[str, Any], datastore: Datastore, config: SegmentationConfig, stage: Path
    ) -> list[str]:
        """`labelfactory train-segmentation` on the studies `train` would use (a datalist) with this config."""
        synthetic = self.request_path(request, "synthetic", self.synthetic_dir, datastore) or None
        studies = [s for s in final_studies(datastore) if not is_generated(datastore.get_image_info(s.id))]
        k_real, val_patients = real_options(request)
        argv = ["train-segmentation", "--config", str(write_json_atomic(asdict(config), stage / "config.json"))]
        if studies:
            argv += ["--studies", str(write_datalist(studies, stage / "studies.json"))]
        if synthetic and Path(synthetic, "images").is_dir():
            argv += ["--synthetic", synthetic]
        if config.consistency > 0:  # Mean Teacher: the same unlabelled studies as in process
            argv += ["--unlabelled", str(write_datalist(real_unlabelled(datastore), stage / "unlabelled.json"))]
        argv += ["--real", "all" if k_real is None else str(k_real), "--val-patients", str(val_patients)]
        return argv + ["--out", str(stage / MODEL_FILE), "--log-dir", str(self.model_dir / f"{KIND}_logs")]

    def launched_stats(self, summary: dict[str, Any]) -> dict[str, Any]:
        keys = ("network", "steps", "best_step", "history")
        return {"best_metric": summary["best_val_dice"], **{k: summary[k] for k in keys}, **summary["data"]}


def real_unlabelled(datastore: Datastore) -> list[Study]:
    """The datastore's real images nobody labelled yet (a Mean Teacher's unlabelled studies), as Study."""
    return [s for s in unlabelled_studies(datastore) if not is_generated(datastore.get_image_info(s.id))]


def real_options(request: dict[str, Any]) -> tuple[int | None, int]:
    """(`real`: how many real patients train, None for "all"; `val_patients`) of a training request, parsed."""
    real = request.get("real", "all")
    k_real = None if real in ("all", None, "") else cast(int, "real", real, 1)
    return k_real, cast(int, "val_patients", request.get("val_patients", 1))


class SegmentationInfer(InferBase):
    """Organ label map of a real 2D image or 3D volume, on the input's grid."""

    def __init__(self, model_dir: str | os.PathLike, label_names: dict[str, int] = LABEL_NAMES, device: str = "auto"):
        description = "Organ segmentation by the segmenter trained on synthetic (and real) pairs"
        super().__init__(
            Path(model_dir) / MODEL_FILE,
            InferType.SEGMENTATION,
            foreground(label_names),
            3,
            description,
            device=device,
        )
        self.model = ModelCache(self.path, lambda p: load_segmenter(p, self.device), "train segmentation first")
        self.label_names = dict(label_names)  # the served label map: a model trained with another is refused (409)

    def infer(self, request: dict[str, Any]) -> tuple[Image, dict[str, Any]]:
        segmenter = self.model.get()
        require_same_map(segmenter.label_names, self.label_names, MODEL_FILE)
        label = segment_image(segmenter, read_image(request["image"]))
        model = {"network": segmenter.record["config"]["network"], **segmenter.record.get("metrics", {})}
        return label.with_array(label.array.astype(np.uint8)), {
            "label_names": foreground(segmenter.label_names),
            "model": model,
        }
