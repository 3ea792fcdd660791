"""What every adapter stands on: options from config dataclasses, the two task bases, atomic JSON, checkout defaults."""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from monailabel.client.client import MONAILabelUtils

from labelfactory import checkout
from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image, read_image
from labelfactory.jsonio import read_json, write_json_atomic
from labelfactory.options import SEED_RANGE, add_arguments, config_overrides, exposed, field_type, from_args, option
from labelfactory.tasks.base import InferBase, TrainBase, result_file


@dataclass(frozen=True)
class Knobs:
    steps: int = 10
    lr: float = 1e-3
    augment: bool = True
    network: str = "unet"
    ema: float | None = None
    widths: tuple[int, ...] = (1, 2)


def test_overrides_take_each_fields_type_from_the_dataclass():
    got = config_overrides(
        Knobs(),
        {"steps": "7", "lr": 1, "augment": "off", "network": ["unetpp", "unet"], "ema": "0.5"},
        ("steps", "lr", "augment", "network", "ema"),
    )
    assert got == Knobs(steps=7, lr=1.0, augment=False, network="unetpp", ema=0.5)
    assert type(got.lr) is float and type(got.steps) is int
    assert config_overrides(Knobs(), {"steps": "", "lr": None, "other": 3}, ("steps", "lr")) == Knobs()
    assert config_overrides(Knobs(), {"x_steps": "3", "steps": "4"}, ("steps",), prefix="x_").steps == 3


def test_bad_option_values_are_400s_and_unsupported_fields_are_refused():
    with pytest.raises(LabelFactoryError, match="steps='many': expected int") as e:
        config_overrides(Knobs(), {"steps": "many"}, ("steps",))
    assert e.value.status == 400
    with pytest.raises(LabelFactoryError, match="augment"):
        config_overrides(Knobs(), {"augment": "maybe"}, ("augment",))
    with pytest.raises(TypeError, match="widths"):
        field_type(Knobs, "widths")


@dataclass(frozen=True)
class Ranged:
    seed: int = option(0, "seed", high=SEED_RANGE[1])
    psi: float = option(0.7, "truncation", low=0.1, high=1.0)
    lr: float = 1e-3  # undeclared: finite and >= 0
    network: str = option("unet", "network", choices=("unet", "fcn"))


@pytest.mark.parametrize(
    "values,words",
    [
        ({"seed": -5}, "option seed=-5: expected int (a whole number) in 0..4294967295"),
        ({"seed": 2**32}, "option seed=4294967296"),
        ({"seed": "x"}, "option seed='x': expected int"),
        ({"seed": 1.5}, "option seed=1.5: expected int"),
        ({"seed": True}, "option seed=True: expected int"),
        ({"psi": "x"}, "option psi='x': expected float"),
        ({"psi": 1.5}, "option psi=1.5: expected float (a finite number) in 0.1..1.0"),
        ({"lr": "nan"}, "option lr='nan'"),
        ({"lr": "inf"}, "option lr='inf'"),
        ({"lr": -1}, "option lr=-1: expected float (a finite number) >= 0"),
        ({"network": "resnet"}, "option network='resnet': expected one of unet, fcn"),
        ({"network": {"a": 1}}, "option network={'a': 1}: expected str"),
    ],
)
def test_option_values_are_refused_outside_their_fields_type_and_range(values, words):
    with pytest.raises(LabelFactoryError, match=re.escape(words)) as e:
        config_overrides(Ranged(), values, ("seed", "psi", "lr", "network"))
    assert e.value.status == 400
    assert config_overrides(Ranged(), {"seed": "7", "psi": 1, "network": "fcn"}, ("seed", "psi", "network")) == Ranged(
        seed=7, psi=1.0, network="fcn"
    )


def test_cli_flags_carry_the_dataclass_defaults_and_come_back():
    p = argparse.ArgumentParser()
    add_arguments(p, Knobs(), ("steps", "lr", "augment"), deprecated={"steps": "--iterations"})
    assert from_args(Knobs(), p.parse_args([]), ("steps", "lr", "augment")) == Knobs()
    args = p.parse_args(["--iterations", "3", "--lr", "0.1", "--no-augment"])
    assert from_args(Knobs(), args, ("steps", "lr", "augment")) == Knobs(steps=3, lr=0.1, augment=False)
    assert from_args(Knobs(), p.parse_args(["--steps", "4"]), ("steps",)).steps == 4
    assert "--iterations: the old name, deprecated" in p.format_help()


@dataclass(frozen=True)
class Declared:
    steps: int = option(10, "training steps", low=1)
    size: int = option(64, "image side", where=("conf", "cli"))
    head: str = option("a", "which head", choices=("a", "b"), where=("request",))
    hidden: int = 3  # not an option


def test_options_are_declared_once_on_the_field():
    """Slicer's table, the app's --conf and the CLI's flags all come from the field's declaration, help included."""
    assert exposed(Declared, "request") == ("steps", "head")
    assert exposed(Declared, "conf") == ("steps", "size", "head")
    assert exposed(Declared, "cli") == ("steps", "size")
    p = argparse.ArgumentParser()
    add_arguments(p, Declared(), exposed(Declared, "cli"))
    text = " ".join(p.format_help().split())
    assert "--steps STEPS training steps (default: 10)" in text and "--size SIZE image side (default: 64)" in text
    with pytest.raises(LabelFactoryError, match="steps=0: expected int"):
        config_overrides(Declared(), {"steps": 0}, exposed(Declared, "request"))
    with pytest.raises(ValueError, match="where must name"):
        option(1, "x", where=("slicer",))


@pytest.mark.parametrize(
    "task,config",
    [
        ("labelfactory.tasks.stylegan2:StyleGAN2Train", "labelfactory.stylegan2.config:StyleGAN2Config"),
        ("labelfactory.tasks.datasetgan:DatasetGANTrain", "labelfactory.datasetgan.train:DatasetGANConfig"),
        ("labelfactory.tasks.segmentation:SegmentationTrain", "labelfactory.segmentation.train:SegmentationConfig"),
        ("labelfactory.tasks.clamnet:ClamNetTrain", "labelfactory.clamnet.train:ClamNetConfig"),
    ],
)
def test_every_trainer_option_has_one_name_in_slicer_and_on_the_cli(task, config):
    import importlib

    def load(ref):
        module, name = ref.split(":")
        return getattr(importlib.import_module(module), name)

    task, config = load(task), load(config)
    assert task.options == exposed(config, "request") and task.options
    assert set(task.options) <= set(exposed(config, "cli")), "a Slicer option the command does not take"


def test_unset_flags_keep_whatever_defaults_they_are_applied_to():
    """`unset`: defaults chosen at run time (a preset) stay unless a flag sets the field."""
    p = argparse.ArgumentParser()
    add_arguments(p, Knobs(), ("steps", "augment"), unset="the preset's")
    preset = Knobs(steps=99, augment=False)
    assert from_args(preset, p.parse_args([]), ("steps", "augment")) == preset
    assert from_args(preset, p.parse_args(["--steps", "4", "--augment"]), ("steps", "augment")) == Knobs(steps=4)
    assert "(default: the preset's)" in p.format_help()


class Trainer(TrainBase):
    name = "toy"
    options = ("steps", "lr")

    def train(self, request, datastore, config, started):
        return {"steps": config.steps, "seen": datastore}


def test_train_base_parses_the_request_and_publishes_its_stats(tmp_path):
    task = Trainer("a toy", tmp_path / "model", Knobs())
    assert task.config() == {"steps": 10, "lr": 1e-3, "multi_gpu": False, "gpus": "all"} and task.stats() == {}
    with pytest.raises(LabelFactoryError, match="toy trains in one process only: it has no torchrun command") as e:
        task.parse_request({"multi_gpu": True, "gpus": "2"})  # refused before any training, not run in one process
    assert e.value.status == 400
    stats = task({"steps": "4", "network": "ignored"}, "store")
    assert (
        stats["name"] == "toy"
        and stats["steps"] == 4
        and stats["seen"] == "store"
        and stats["total_time"].endswith("s")
    )
    assert task.stats() == stats == json.loads((tmp_path / "model" / "toy_train_stats.json").read_text())
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["toy_train_stats.json"]  # no temp file left


class Infer(InferBase):
    def infer(self, request):
        image = Image(np.ones((4, 5), np.uint8), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
        return (None if request.get("none") else image), {"answer": 42}


def test_infer_base_writes_the_result_file_and_times_the_call(tmp_path):
    task = Infer(tmp_path / "m.pt", "segmentation", {"x": 1}, 2, "a toy")
    assert task.is_valid() and task.get_path() == str(tmp_path / "m.pt")
    out, result = task({"result_extension": ".nrrd"})
    assert out.endswith(".nrrd") and read_image(out).array.shape == (4, 5)
    assert result["answer"] == 42 and result["latencies"]["total"] >= 0
    Path(out).unlink()
    assert task({"none": True})[0] is None


def test_a_client_on_the_servers_host_keeps_its_result_after_the_server_cleans_up(tmp_path):
    """MONAI Label's client saves a result as <system temp dir>/<file name>; the server then removes its own file."""
    server_file = result_file(Image(np.zeros((4, 5), np.uint8), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0)))
    body = Path(server_file).read_bytes()
    client_file = MONAILabelUtils.save_result({os.path.basename(server_file): body}, tempfile.gettempdir())
    os.remove(server_file)  # the server's background clean-up after sending
    try:
        assert Path(client_file).read_bytes() == body
    finally:
        Path(client_file).unlink()


def test_json_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "a" / "stats.json"
    write_json_atomic({"v": 1}, path)
    with pytest.raises(TypeError):
        write_json_atomic({"v": object()}, path)  # fails while encoding: the old file stays
    assert read_json(path) == {"v": 1} and [p.name for p in path.parent.iterdir()] == ["stats.json"]
    assert read_json(tmp_path / "absent.json", {}) == {}


def test_atomic_files_get_the_mode_open_gives_not_a_private_one(tmp_path):
    """Models and labels are read by other accounts: a file written atomically has the mode a plain open() gives."""
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    from labelfactory.checkpoints import hash_path, save_checkpoint

    model = save_checkpoint({"kind": "k", "config": {}, "data": {}}, tmp_path / "m.pt")
    for written in (write_json_atomic({"v": 1}, tmp_path / "atomic.json"), model, hash_path(model)):
        assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode), written.name


def test_checkout_defaults_resolve_in_a_checkout_and_fail_clearly_elsewhere(tmp_path, monkeypatch):
    assert checkout.checkout_default(checkout.SAMPLE_STUDIES, "--studies").is_dir()
    monkeypatch.setattr(checkout, "_ROOT", tmp_path)  # as from a wheel in site-packages
    with pytest.raises(LabelFactoryError, match="--studies has a default only in a source checkout"):
        checkout.checkout_default(checkout.SAMPLE_STUDIES, "--studies")


def test_a_damaged_served_model_leaves_its_trainer_on_the_library_defaults(tmp_path):
    """The app's configs read a trainer's defaults from the served model; a file that does not load must not stop
    the server (it did: a corrupt segmentation.pt made the app fail at start)."""
    from labelfactory.clamnet.train import ClamNetConfig
    from labelfactory.clamnet.train import recorded_config as clamnet_recipe
    from labelfactory.segmentation.train import recorded_config as segmentation_recipe
    from labelfactory.tasks.base import served_recipe

    damaged = tmp_path / "model.pt"
    damaged.write_bytes(b"not a checkpoint")
    assert served_recipe(segmentation_recipe, damaged, None) is None
    assert served_recipe(clamnet_recipe, damaged, ClamNetConfig()) == ClamNetConfig()
    assert served_recipe(segmentation_recipe, tmp_path / "absent.pt", "fallback") == "fallback"
    shipped = Path(__file__).resolve().parents[1] / "sample-data" / "openkbp" / "models" / "segmentation.pt"
    assert served_recipe(segmentation_recipe, shipped, None).slicing == "body-crop"
