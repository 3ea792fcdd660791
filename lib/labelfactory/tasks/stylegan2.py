"""MONAI Label trainer `stylegan2`: StyleGAN2-ADA on the datastore's real CT slices.

Publishes `<model_dir>/stylegan2.pt` (the EMA generator, atomically, at every snapshot), keeps its
resumable state in `<model_dir>/stylegan2-run/` (a killed training continues from the last
snapshot) and writes `<model_dir>/stylegan2_train_stats.json` at every snapshot. Images the app
generated itself (image info holding a latent record) are not training data. With `multi_gpu` the same
training runs as `labelfactory train-stylegan2` under torchrun (tasks/launch.py), publishing when it ends.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore

from labelfactory.errors import LabelFactoryError
from labelfactory.io.dataset import Study, write_datalist
from labelfactory.jsonio import read_json, write_json_atomic
from labelfactory.latent_record import is_generated
from labelfactory.options import exposed
from labelfactory.stylegan2.checkpoint import KIND, MODEL_FILE
from labelfactory.stylegan2.config import StyleGAN2Config
from labelfactory.stylegan2.data import load_training_slices
from labelfactory.stylegan2.training import train
from labelfactory.tasks.base import TrainBase, stats_file

RUN_DIR = f"{KIND}-run"
STATS_FILE = stats_file(KIND)


class StyleGAN2Train(TrainBase):
    """Trains (or continues) the GAN; request options (see `options`) override the app's defaults."""

    name = KIND
    options = exposed(StyleGAN2Config, "request")

    def __init__(
        self,
        model_dir: str | os.PathLike,
        defaults: StyleGAN2Config,
        fid_weights: str | None = None,
        device: str = "auto",
    ):
        description = "StyleGAN2-ADA generator on the datastore's real CT slices (the DatasetGAN image source)"
        super().__init__(description, model_dir, defaults, device)
        self.fid_weights = fid_weights

    def config(self) -> dict[str, Any]:
        return super().config() | {"resolution": self.defaults.resolution}

    def train(
        self, request: dict[str, Any], datastore: Datastore, cfg: StyleGAN2Config, started: float
    ) -> dict[str, Any]:
        ids = real_ids(datastore)
        images = load_training_slices([Path(datastore.get_image_uri(i)) for i in ids], cfg.resolution)
        data = {"images": sorted(ids), "slices": len(images)}
        last: dict[str, Any] = {}

        def on_snapshot(snapshot: dict[str, Any]) -> None:
            last.update(snapshot, **data)
            self.write_stats(last, started)

        run_dir, model = self.model_dir / RUN_DIR, self.model_dir / MODEL_FILE
        final = train(
            cfg,
            images,
            run_dir,
            publish_path=model,
            data_info=data,
            fid_weights=self.fid_weights,
            progress=False,
            device=self.device,
            on_snapshot=on_snapshot,
        )
        if not model.is_file():
            raise LabelFactoryError(
                f"training ended without a model file; delete {run_dir} and train again", status=500
            )
        return last or {**final, **data}

    def launch_command(
        self, request: dict[str, Any], datastore: Datastore, cfg: StyleGAN2Config, stage: Path
    ) -> list[str]:
        """`labelfactory train-stylegan2` on the real images `train` would use, continuing the same run folder;
        its generator is published when the run ends (not at every snapshot, as in process)."""
        studies = [Study(i, Path(datastore.get_image_uri(i)), None) for i in real_ids(datastore)]
        argv = ["train-stylegan2", "--config", str(write_json_atomic(cfg.to_dict(), stage / "config.json"))]
        argv += ["--studies", str(write_datalist(studies, stage / "studies.json"))]
        argv += ["--out", str(self.model_dir / RUN_DIR)]
        argv += ["--model", str(stage / MODEL_FILE), "--no-progress"]
        return argv + (["--fid-weights", str(self.fid_weights)] if self.fid_weights else [])

    def launched_stats(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The last snapshot's stats (history and all, as in process) and the data the run trained on."""
        snapshot = read_json(self.model_dir / RUN_DIR / "train_stats.json", {})
        return {**snapshot, "images": summary["images"], "slices": summary["slices"]}


def real_ids(datastore: Datastore) -> list[str]:
    """The ids of the datastore's real (not generated) images, in its order; a LabelFactoryError when there are none."""
    ids = [i for i in datastore.list_images() if not is_generated(datastore.get_image_info(i))]
    if not ids:
        raise LabelFactoryError("the datastore holds no real images to train stylegan2 on: add CT volumes first")
    return ids
