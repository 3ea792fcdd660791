"""Server-side multi_gpu training (tasks/launch.py): options parsed, torchrun started with gloo ranks on the CPU, the
model published once every rank finished; a failed rank publishes nothing and says which rank failed."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch
from monailabel.datastore.local import LocalDatastore

from labelfactory.checkpoints import load_checkpoint, save_checkpoint
from labelfactory.errors import LabelFactoryError
from labelfactory.segmentation.train import SegmentationConfig
from labelfactory.tasks import launch
from labelfactory.tasks.segmentation import SegmentationInfer, SegmentationTrain
from labelfactory.training_lock import LOCK_FILE

TINY = SegmentationConfig(network="unet", size=32, steps=2, val_interval=1, batch_size=2, augment="none")
CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def test_launch_options_on_a_cpu_server():
    assert launch.parse_launch({}, CPU) is None and launch.parse_launch({"multi_gpu": "false", "gpus": 2}, CPU) is None
    assert launch.parse_launch({"multi_gpu": True, "gpus": "2"}, CPU) == launch.Launch(2, "cpu", "")
    assert launch.parse_launch({"multi_gpu": True, "gpus": "1"}, CPU) is None  # one process: trained in process
    for gpus in ("all", "0,1", "0", "-1", "100000"):
        with pytest.raises(LabelFactoryError, match="number of CPU processes") as e:
            launch.parse_launch({"multi_gpu": True, "gpus": gpus}, CPU)
        assert e.value.status == 400
    with pytest.raises(LabelFactoryError, match="multi_gpu"):
        launch.parse_launch({"multi_gpu": "maybe"}, CPU)


def test_launch_options_on_a_gpu_server(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert launch.parse_launch({"multi_gpu": True}, GPU) == launch.Launch(4, "cuda", None)
    assert launch.parse_launch({"multi_gpu": True, "gpus": "1, 3"}, GPU) == launch.Launch(2, "cuda", "1,3")
    for gpus in ("0,4", "1,1", "two"):
        with pytest.raises(LabelFactoryError, match="gpus"):
            launch.parse_launch({"multi_gpu": True, "gpus": gpus}, GPU)


def test_failure_message_names_the_rank_and_its_error():
    lines = [
        "labelfactory train-segmentation: only 1 training pair(s): a segmenter needs at least 2",
        "[0]:",
        "  time      : 2026-01-01_00:00:00",
        "  rank      : 1 (local_rank: 1)",
        "  exitcode  : 2 (pid: 42)",
    ]
    msg = launch.failure_message("segmentation training", launch.Launch(2, "cpu", ""), 1, lines)
    assert msg.startswith("segmentation training on 2 cpu processes failed, rank 1 exited with code 2: only 1")
    assert msg.endswith("no model was published, the previous one is kept")


@pytest.fixture
def trainer(tmp_path, make_pairs):
    return SegmentationTrain(tmp_path / "model", TINY, str(make_pairs(tmp_path / "synthetic", 4, size=32)))


@pytest.fixture
def datastore(datastore_copy):
    return LocalDatastore(str(datastore_copy), extensions=("*.nii.gz",), auto_reload=False)


@pytest.mark.slow
def test_segmentation_trains_on_two_gloo_ranks_and_publishes_once(trainer, datastore, datastore_copy):
    assert trainer.config()["multi_gpu"] is False and trainer.config()["gpus"] == "all"
    stats = trainer({"multi_gpu": True, "gpus": "2", "real": "2"}, datastore)
    model_dir = trainer.model_dir
    record = load_checkpoint(model_dir / "segmentation.pt", "segmentation")
    assert record["config"] == asdict(TINY)  # the request's config, tuples and all
    assert record["data"]["synthetic_pairs"] == 4 and record["data"]["real_slices"] == 2
    assert stats["steps"] == 2 and stats["best_metric"] == record["metrics"]["val_dice"]
    assert stats["synthetic_pairs"] == 4 and stats["network"] == "unet" and len(stats["history"]) == 2
    assert trainer.stats() == stats  # what /info shows
    assert not list(model_dir.glob(".segmentation-launch-*")) and not (model_dir / LOCK_FILE).exists()
    _, result = SegmentationInfer(model_dir)({"image": str(datastore_copy / "torso_3mm.nii.gz")})
    assert result["model"]["network"] == "unet"


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_training_and_publishes_nothing(trainer, datastore, tmp_path, monkeypatch):
    hook = tmp_path / "hook"
    hook.mkdir()  # every rank imports it at start-up; rank 1 dies there
    (hook / "sitecustomize.py").write_text("import os\nif os.environ.get('RANK') == '1':\n    os._exit(3)\n")
    monkeypatch.setenv("PYTHONPATH", str(hook))
    previous = save_checkpoint({"kind": "segmentation", "config": {}, "data": {"old": 1}}, trainer.model_dir / "x.pt")
    previous = previous.rename(trainer.model_dir / "segmentation.pt").read_bytes()
    with pytest.raises(LabelFactoryError, match="rank 1 exited with code 3") as e:
        trainer({"multi_gpu": True, "gpus": "2"}, datastore)
    assert e.value.status == 500 and "no model was published" in str(e.value)
    assert (trainer.model_dir / "segmentation.pt").read_bytes() == previous
    assert not list(trainer.model_dir.glob(".segmentation-launch-*")) and not (trainer.model_dir / LOCK_FILE).exists()
    assert trainer.stats() == {}


def test_the_launched_command_reads_the_whole_config_and_flags_given_override_it(tmp_path):
    import argparse

    from labelfactory.options import add_arguments, add_config_argument, exposed, from_args

    names = exposed(SegmentationConfig, "cli")
    p = argparse.ArgumentParser()
    add_config_argument(p)
    add_arguments(p, SegmentationConfig(), names)
    (tmp_path / "c.json").write_text(json.dumps({**asdict(TINY), "label_names": {"background": 0, "liver": 1}}))
    got = from_args(SegmentationConfig(), p.parse_args(["--config", str(tmp_path / "c.json"), "--steps", "7"]), names)
    assert got == replace(TINY, steps=7, label_names={"background": 0, "liver": 1}) and got.window == (0.0, 2000.0)
    (tmp_path / "c.json").write_text(json.dumps({"steps": 1, "nonsense": 2}))
    with pytest.raises(LabelFactoryError, match="nonsense are not fields of SegmentationConfig"):
        from_args(SegmentationConfig(), p.parse_args(["--config", str(tmp_path / "c.json")]), names)


@pytest.mark.slow
def test_stylegan2_trains_on_two_gloo_ranks_with_the_in_process_record(tmp_path, datastore_copy):
    from labelfactory.stylegan2.checkpoint import load_generator
    from labelfactory.tasks.stylegan2 import StyleGAN2Train
    from tests.test_gan_task import TINY as TINY_GAN

    store = tmp_path / "store"
    store.mkdir()
    (datastore_copy / "torso_3mm.nii.gz").rename(store / "torso_3mm.nii.gz")
    task = StyleGAN2Train(tmp_path / "model", TINY_GAN)
    stats = task({"multi_gpu": "true", "gpus": 2}, LocalDatastore(str(store), extensions=("*.nii.gz",)))
    G = load_generator(tmp_path / "model" / "stylegan2.pt")
    assert G.checkpoint_info["data"] == {"images": ["torso_3mm"], "slices": 30} and G.checkpoint_info["kimg"] == 0.008
    assert G.checkpoint_info["config"] == TINY_GAN.to_dict()
    assert stats["kimg"] == 0.008 and [h["kimg"] for h in stats["history"]] == [0.004, 0.008]
    assert stats["images"] == ["torso_3mm"] and task.stats() == stats


@pytest.mark.parametrize("family", ["clamnet", "datasetgan"])
def test_trainers_that_train_in_one_process_refuse_multi_gpu(family, tmp_path):
    from labelfactory.tasks.clamnet import ClamNetTrain
    from labelfactory.tasks.datasetgan import DatasetGANTrain

    task = {"clamnet": ClamNetTrain, "datasetgan": DatasetGANTrain}[family](tmp_path)
    assert task.parse_request({"multi_gpu": False, "gpus": "2"}) is not None  # without multi_gpu: as ever
    with pytest.raises(LabelFactoryError, match=f"{family} trains in one process only: .+; drop multi_gpu") as e:
        task.parse_request({"multi_gpu": True, "gpus": "2"})
    assert e.value.status == 400


def test_mean_teacher_refuses_multi_gpu(trainer):
    assert trainer.parse_request({"consistency": 0.5}).consistency == 0.5
    with pytest.raises(LabelFactoryError, match="Mean Teacher .+ one process only") as e:
        trainer.parse_request({"consistency": 0.5, "multi_gpu": True, "gpus": "2"})
    assert e.value.status == 400
