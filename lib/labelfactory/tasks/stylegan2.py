"""MONAI Label trainer `stylegan2`: StyleGAN2-ADA on the datastore's real CT slices.

Publishes `<model_dir>/stylegan2.pt` (the EMA generator, atomically, at every snapshot), keeps its
resumable state in `<model_dir>/stylegan2-run/` (a killed training continues from the last
snapshot) and writes `<model_dir>/stylegan2_train_stats.json`. Images the app generated itself
(image info holding "labelfactory") are not training data.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from labelfactory.errors import LabelFactoryError
from labelfactory.gan.config import TrainingConfig
from labelfactory.gan.data import load_training_slices
from labelfactory.gan.training import train

MODEL_FILE = "stylegan2.pt"
RUN_DIR = "stylegan2-run"
STATS_FILE = "stylegan2_train_stats.json"
# request keys a user may set per training (Slicer's options table), with their types
REQUEST_KEYS = ("total_kimg", "snapshot_kimg", "fid_kimg", "batch_size", "r1_gamma", "augment", "seed")


def _cast(default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
    return type(default)(value)


class StyleGAN2Train(TrainTask):
    """Trains (or continues) the GAN; request keys override the app's defaults (see REQUEST_KEYS)."""

    def __init__(self, model_dir: str | os.PathLike, defaults: TrainingConfig, fid_weights: str | None = None):
        super().__init__("StyleGAN2-ADA generator on the datastore's real CT slices (the DatasetGAN image source)")
        self.model_dir = Path(model_dir)
        self.defaults, self.fid_weights = defaults, fid_weights

    def config(self) -> dict[str, Any]:
        return {k: getattr(self.defaults, k) for k in REQUEST_KEYS} | {"resolution": self.defaults.resolution}

    def stats(self) -> dict[str, Any]:
        p = self.model_dir / STATS_FILE
        return json.loads(p.read_text()) if p.is_file() else {}

    def _write_stats(self, stats: dict[str, Any]) -> None:
        self.model_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.model_dir / (STATS_FILE + ".tmp")
        tmp.write_text(json.dumps(stats, indent=1))
        os.replace(tmp, self.model_dir / STATS_FILE)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        overrides = {k: _cast(getattr(self.defaults, k), request[k]) for k in REQUEST_KEYS if request.get(k) not in (None, "")}
        cfg = self.defaults.with_overrides(**overrides)
        ids = [i for i in datastore.list_images() if "labelfactory" not in (datastore.get_image_info(i) or {})]
        if not ids:
            raise LabelFactoryError("the datastore holds no real images to train stylegan2 on: add CT volumes first")
        images = load_training_slices([Path(datastore.get_image_uri(i)) for i in ids], cfg.resolution)
        data = {"images": sorted(ids), "slices": len(images)}
        t0 = time.time()
        on_snapshot = lambda s: self._write_stats({"name": "stylegan2", **s, "total_time": f"{time.time() - t0:.1f}s", **data})  # noqa: E731
        final = train(cfg, images, self.model_dir / RUN_DIR, publish_path=self.model_dir / MODEL_FILE, data_info=data,
                      fid_weights=self.fid_weights, progress=False, on_snapshot=on_snapshot)
        if not (self.model_dir / MODEL_FILE).is_file():
            raise LabelFactoryError(f"training ended without a model file; delete {self.model_dir / RUN_DIR} and train again", status=500)
        return self.stats() or {"name": "stylegan2", **final, **data}
