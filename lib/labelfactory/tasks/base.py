"""The two bases every labelfactory adapter stands on, as MONAI Label's BasicTrainTask / BasicInferTask do.

`TrainBase` owns what all our trainers share: the options table (`config()`, fields of the config
dataclass), request overrides parsed from that dataclass, `stats()` and the atomic
`<model_dir>/<name>_train_stats.json`, total time, the models folder's training lock
(`labelfactory.training_lock`) and the device it trains on (`labelfactory.devices`, shown by `info()`).
A trainer declares `name`, `options` and `train()`. `InferBase` owns `is_valid` (models are checked per
request: a missing one answers 409 "train X first"), `get_path`, the temp result file, the latency timing
and the device its model runs on (in `info()`); an infer declares `infer() -> (label Image, result JSON)`,
and, where it needs the datastore, `prepare` (what the request needs from it) and `finish` (what to store
of the result): the app calls both and never names a model.
Not BasicTrainTask / BasicInferTask themselves: those feed whole datastore files through dict
transforms and save bare state dicts, while our models train on 2D slices or latents and publish
versioned checkpoints (labelfactory.checkpoints).
"""

from __future__ import annotations

import os
import tempfile
import time
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from labelfactory.devices import resolve_device
from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image, write_image
from labelfactory.jsonio import read_json, write_json_atomic
from labelfactory.options import config_overrides, options
from labelfactory.training_lock import training_lock

RESULT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")  # an infer's result file: one file, geometry kept


def stats_file(name: str) -> str:
    """The train stats file of model `name` in its model folder."""
    return f"{name}_train_stats.json"


class TrainBase(TrainTask):
    """A trainer: `name` (its model and stats file), `options` (the config fields a request may set), `train()`."""

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]]
    path_options: ClassVar[tuple[str, ...]] = ()  # request options naming a server folder or file (see request_path)

    def __init__(self, description: str, model_dir: str | os.PathLike, defaults: Any, device: str = "auto"):
        super().__init__(description)
        self.model_dir, self.defaults = Path(model_dir), defaults
        self.device = resolve_device(device)  # the app's `--conf device`

    def info(self) -> dict[str, Any]:
        return {**super().info(), "device": str(self.device)}

    def config(self) -> dict[str, Any]:
        """The options table Slicer shows: each option's default (subclasses add their own keys)."""
        return options(self.defaults, self.options)

    def stats(self) -> dict[str, Any]:
        return read_json(self.model_dir / stats_file(self.name), {})

    def write_stats(self, stats: dict[str, Any], started: float) -> dict[str, Any]:
        """Publish `stats` (with name and time since `started`) atomically as the train stats; returns them."""
        stats = {"name": self.name, **stats, "total_time": f"{time.time() - started:.1f}s"}
        write_json_atomic(stats, self.model_dir / stats_file(self.name))
        return stats

    def parse_request(self, request: dict[str, Any], datastore: Datastore | None = None) -> Any:
        """The config `request` asks for (the defaults plus its options, each parsed from its field: 400 naming a bad
        one; paths only inside the studies or models folder). The server calls it before it submits a training, so a
        bad option never reaches the trainer."""
        for field in self.path_options:
            self.request_path(request, field, None, datastore)
        return config_overrides(self.defaults, request, self.options)

    def request_path(self, request: dict[str, Any], field: str, default: Any, datastore: Datastore | None) -> Any:
        """`request[field]`, a server path, resolved; only inside the models folder or the datastore's (400 for any
        other: a request never makes the server read elsewhere); `default` (the app's own setting) when absent."""
        value = request.get(field)
        if value is None or value == "":
            return default
        if not isinstance(value, str) or "\0" in value:
            raise LabelFactoryError(f"{field} must be a path inside the studies or models folder")
        roots = [self.model_dir, getattr(datastore, "_datastore_path", None)]
        path = Path(value).resolve()
        if not any(root and path.is_relative_to(Path(root).resolve()) for root in roots):
            raise LabelFactoryError(
                f"{field} {value!r} is outside this server's studies and models folders: name a path inside them"
            )
        return str(path)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        started = time.time()
        config = self.parse_request(request, datastore)
        with training_lock(self.model_dir, self.name):  # one training per models folder, across server restarts
            return self.write_stats(self.train(request, datastore, config, started), started)

    @abstractmethod
    def train(self, request: dict[str, Any], datastore: Datastore, config: Any, started: float) -> dict[str, Any]:
        """Train with `config` (the defaults plus the request's options); returns the stats to publish."""


class InferBase(InferTask):
    """An infer whose model is checked per request; `infer()` returns (label Image or None, result JSON)."""

    makes_its_image: ClassVar[bool] = False  # True: the request's `image` names what the infer makes, not a file

    def __init__(self, path: str | os.PathLike, *args: Any, device: str = "auto", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.path = Path(path)
        self.device = resolve_device(device)  # where its model loads and runs: the app's `--conf device`

    def info(self) -> dict[str, Any]:
        return {**super().info(), "device": str(self.device)}

    def is_valid(self) -> bool:
        return True  # listed even before training: a request then answers 409 "train X first"

    def get_path(self, validate: bool = True) -> str:
        return str(self.path)

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        started = time.time()
        suffix = request.get("result_extension") or ".nii.gz"
        if suffix not in RESULT_SUFFIXES:  # checked before the infer's work
            raise LabelFactoryError(f"option result_extension={suffix!r}: expected one of {', '.join(RESULT_SUFFIXES)}")
        label, result = self.infer(request)
        out = None if label is None else result_file(label, suffix)
        return out, {**result, "latencies": {"total": round(time.time() - started, 3)}}

    @abstractmethod
    def infer(self, request: dict[str, Any]) -> tuple[Image | None, dict[str, Any]]:
        """The label on the input's grid (written to the result file) and the result JSON."""

    def prepare(self, request: dict[str, Any], datastore: Datastore, image_id: str | None) -> dict[str, Any]:
        """The request with what this infer needs from the datastore, before the server runs it.

        `image_id`: the request's datastore image (checked to exist), None for an upload, a session image or an
        infer that makes its image. Runs in the server's request thread: a LabelFactoryError answers 4xx."""
        return request

    def finish(self, params: dict[str, Any], datastore: Datastore) -> None:
        """Store what the infer made (e.g. a generated image) and drop private keys from `params`, the result JSON."""


def result_file(image: Image, suffix: str = ".nii.gz") -> str:
    """Write `image` to a new temp file (MONAI Label sends it and removes it); returns its path.

    In a folder of its own: MONAI Label's client saves a result as `<its temp dir>/<file name>`, by
    default the system temp dir, so on the server's host a result written there would be the very
    file the server's clean-up removes after sending it."""
    folder = Path(tempfile.gettempdir()) / "labelfactory-results"
    folder.mkdir(exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="result-", suffix=suffix, dir=folder)
    os.close(fd)
    return str(write_image(image, path))
