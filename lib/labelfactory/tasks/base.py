"""The two bases every labelfactory adapter stands on, as MONAI Label's BasicTrainTask / BasicInferTask do.

`TrainBase` owns what all our trainers share: the options table (`config()`, fields of the config
dataclass), request overrides parsed from that dataclass, `stats()` and the atomic
`<model_dir>/<name>_train_stats.json`, total time, the models folder's training lock
(`labelfactory.training_lock`) and the device it trains on (`labelfactory.devices`, shown by `info()`).
A trainer declares `name`, `options` and `train()`; with `launch_command()` it also trains under torchrun when a
request asks for `multi_gpu` (tasks/launch.py), else it refuses that with a 400 giving its `single_process` reason.
`InferBase` owns `is_valid` (models are checked per
request: a missing one answers 409 "train X first"), `get_path`, the temp result file, the latency timing
and the device its model runs on (in `info()`); an infer declares `infer() -> (label Image, result JSON)`,
and, where it needs the datastore, `prepare` (what the request needs from it) and `finish` (what to store
of the result): the app calls both and never names a model.
Not BasicTrainTask / BasicInferTask themselves: those feed whole datastore files through dict
transforms and save bare state dicts, while our models train on 2D slices or latents and publish
versioned checkpoints (labelfactory.checkpoints).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from labelfactory.checkpoints import publish_model, verify_hash
from labelfactory.devices import resolve_device
from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image, write_image
from labelfactory.jsonio import read_json, write_json_atomic
from labelfactory.options import config_overrides, options
from labelfactory.tasks import launch
from labelfactory.training_lock import training_lock

logger = logging.getLogger(__name__)

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
        """The options table Slicer shows: each option's default (subclasses add their own keys), multi_gpu, gpus."""
        return options(self.defaults, self.options) | launch.OPTIONS

    def stats(self) -> dict[str, Any]:
        return read_json(self.model_dir / stats_file(self.name), {})

    def write_stats(self, stats: dict[str, Any], started: float) -> dict[str, Any]:
        """Publish `stats` (with name and time since `started`) atomically as the train stats; returns them."""
        stats = {"name": self.name, **stats, "total_time": f"{time.time() - started:.1f}s"}
        write_json_atomic(stats, self.model_dir / stats_file(self.name))
        return stats

    def parse_request(self, request: dict[str, Any], datastore: Datastore | None = None) -> Any:
        """The config `request` asks for (the defaults plus its options, each parsed from its field: 400 naming a bad
        one; paths only inside the studies or models folder; `multi_gpu` / `gpus` checked too). The server calls it
        before it submits a training, so a bad option never reaches the trainer."""
        self.parse_launch(request)
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

    def parse_launch(self, request: dict[str, Any]) -> launch.Launch | None:
        """How `request` asks to train (`multi_gpu`, `gpus`; tasks/launch.py), None: in this process. 400 for bad
        options, and for multi_gpu on a trainer that trains in one process only (`launch_command` not defined)."""
        how = launch.parse_launch(request, self.device)
        if how is not None and type(self).launch_command is TrainBase.launch_command:
            raise LabelFactoryError(f"{self.name} trains in one process only: {self.single_process}; drop multi_gpu")
        return how

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        started = time.time()
        config = self.parse_request(request, datastore)
        how = self.parse_launch(request)
        with training_lock(self.model_dir, self.name):  # one training per models folder, across server restarts
            if how is None:
                return self.write_stats(self.train(request, datastore, config, started), started)
            return self.write_stats(self.train_launched(request, datastore, config, how), started)

    @abstractmethod
    def train(self, request: dict[str, Any], datastore: Datastore, config: Any, started: float) -> dict[str, Any]:
        """Train with `config` (the defaults plus the request's options); returns the stats to publish."""

    single_process: ClassVar[str] = "it has no torchrun command"  # why, for the 400 of a multi_gpu request

    def launch_command(self, request: dict[str, Any], datastore: Datastore, config: Any, stage: Path) -> list[str]:
        """The `labelfactory` command (argv) that trains as `train` would, writing its model to `stage/<name>.pt`;
        the files it reads go in `stage` too. It must take `--summary FILE` (rank 0 writes its JSON summary there)."""
        raise NotImplementedError

    def launched_stats(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The stats to publish from the launched command's summary (default: the summary)."""
        return summary

    def train_launched(self, request: dict[str, Any], datastore: Datastore, config: Any, how: launch.Launch) -> dict:
        """Train under torchrun as `how` says; publish the model only once every rank has finished."""
        model = self.model_dir / f"{self.name}.pt"
        with launch.staging_folder(self.model_dir, self.name) as stage:
            argv = [*self.launch_command(request, datastore, config, stage), "--summary", str(stage / "summary.json")]
            launch.run_torchrun(argv, how, f"{self.name} training")
            staged = stage / model.name
            if not staged.is_file():
                raise LabelFactoryError(f"{self.name} training ended without a model file", status=500)
            verify_hash(staged)
            publish_model(staged, model)
            return self.launched_stats(read_json(stage / "summary.json", {}))


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


def served_recipe(read: Callable[[str], Any], path: str | os.PathLike, fallback: Any) -> Any:
    """`read(path)`: the recipe a served model file records (a trainer's defaults, so Train retrains it as it was
    made), or `fallback` when there is no file or it does not load (logged: a damaged model must not stop the
    server; its infer answers 409)."""
    try:
        return read(str(path)) or fallback
    except LabelFactoryError as e:
        logger.warning(f"{Path(path).name}: the trainer starts from the library's defaults: {e}")
        return fallback
