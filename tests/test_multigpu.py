"""Server-side multi_gpu training (tasks/launch.py): options parsed, torchrun started with gloo ranks on the CPU, the
model published once every rank finished; a failed rank publishes nothing and says which rank failed."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch
from monailabel.datastore.local import LocalDatastore

from labelfactory.checkpoints import load_checkpoint, save_checkpoint
from labelfactory.datasetgan.ensemble import member_states
from labelfactory.datasetgan.train import DatasetGANConfig
from labelfactory.errors import LabelFactoryError
from labelfactory.segmentation.train import SegmentationConfig
from labelfactory.tasks import launch
from labelfactory.tasks.segmentation import SegmentationInfer, SegmentationTrain
from labelfactory.training_lock import LOCK_FILE
from tests.test_interpreter_tasks import setup as setup

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


@pytest.fixture
def dying_rank(tmp_path, monkeypatch):
    """Every rank imports this hook at start-up; rank 1 dies there with exit code 3."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import os\nif os.environ.get('RANK') == '1':\n    os._exit(3)\n")
    monkeypatch.setenv("PYTHONPATH", str(hook))


def clamnet_trainer(model_dir, datastore_copy):
    from labelfactory.tasks.clamnet import ClamNetTrain
    from tests.test_clamnet_task import TINY as TINY_CLAMNET

    return ClamNetTrain(model_dir, TINY_CLAMNET, organ_dirs=[str(datastore_copy / "reference")])


@pytest.mark.slow
def test_clamnet_trains_on_two_gloo_ranks_and_publishes_once(tmp_path, datastore, datastore_copy):
    from labelfactory.clamnet.train import load_clamnet
    from labelfactory.tasks.clamnet import ClamNetInfer

    task = clamnet_trainer(tmp_path / "model", datastore_copy)
    stats = task({"multi_gpu": True, "gpus": "2", "steps": 3}, datastore)
    record = load_checkpoint(tmp_path / "model" / "clamnet.pt", "clamnet")
    assert record["config"]["steps"] == 3 and len(record["history"]) == 3 and record["data"]["abnormal"] > 0
    assert stats["steps"] == 3 and stats["loss_last"] == record["history"][-1] and task.stats() == stats
    assert set(stats) == {"name", "steps", "loss_first", "loss_last", "studies", "slices", "abnormal", "total_time"}
    load_clamnet(tmp_path / "model" / "clamnet.pt")
    _, result = ClamNetInfer(tmp_path / "model")({"image": str(datastore_copy / "thorax_aorta.nii.gz")})
    assert result["result"] == "marker" and result["organ_crop"] == "organ mask of the study"
    assert not list((tmp_path / "model").glob(".clamnet-launch-*"))


def test_clamnet_refuses_more_processes_than_pairs_per_batch(tmp_path, datastore_copy):
    task = clamnet_trainer(tmp_path, datastore_copy)
    with pytest.raises(LabelFactoryError, match="gpus=2 processes for batch=1 pairs") as e:
        task.parse_request({"multi_gpu": True, "gpus": "2", "batch": 1})
    assert e.value.status == 400


@pytest.fixture
def generated(setup):
    """(models folder with a tiny generator, a datastore of 3 labelled generated images, the generator)."""
    from tests.test_interpreter_tasks import add_generated

    model_dir, ds, G, tmp_path = setup
    for seed in range(3):
        add_generated(ds, G, seed, tmp_path)
    return model_dir, ds, G


@pytest.mark.slow
def test_datasetgan_on_two_gloo_ranks_equals_one_process_member_by_member(generated, tmp_path):
    from labelfactory.datasetgan import load_interpreter
    from labelfactory.tasks.datasetgan import DatasetGANInfer, DatasetGANModels, DatasetGANTrain
    from tests.test_interpreter_tasks import latent

    model_dir, ds, G = generated
    cfg = DatasetGANConfig(members=3, hidden=(8, 8), max_epochs=3, pixels_per_image=64, class_weights=(1.0, 2.0))
    task = DatasetGANTrain(model_dir, cfg, {"background": 0, "liver": 1})
    stats = task({"multi_gpu": True, "gpus": "2"}, ds)
    two = load_interpreter(model_dir / "datasetgan.pt", G)
    one_dir = tmp_path / "one"
    one_dir.mkdir()
    (one_dir / "stylegan2.pt").symlink_to(model_dir / "stylegan2.pt")
    one_stats = DatasetGANTrain(one_dir, cfg, {"background": 0, "liver": 1})({}, ds)
    one = load_interpreter(one_dir / "datasetgan.pt", G)
    assert two.ensemble.config == one.ensemble.config and two.ensemble.config.members == 3
    members = zip(member_states(two.ensemble, range(3)), member_states(one.ensemble, range(3)), strict=True)
    for m, (a, b) in enumerate(members):
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), f"member {m}: {k}"
    assert stats["epoch_loss"] == pytest.approx(one_stats["epoch_loss"], rel=1e-6)
    assert stats["images"] == 3 and stats["config"] == cfg.to_dict() and task.stats() == stats
    image_id = ds.list_images()[0]
    _, result = DatasetGANInfer(DatasetGANModels(model_dir))(
        {"image": ds.get_image_uri(image_id), **latent(ds, image_id)}
    )
    assert set(result["label_names"]) == {"liver"}


def test_datasetgan_refuses_more_processes_than_members(tmp_path):
    from labelfactory.tasks.datasetgan import DatasetGANTrain

    task = DatasetGANTrain(tmp_path, DatasetGANConfig(members=2))
    assert task.parse_request({"multi_gpu": True, "gpus": "2"}).members == 2
    with pytest.raises(LabelFactoryError, match="2 processes for an ensemble of 1 members") as e:
        task.parse_request({"multi_gpu": True, "gpus": "2", "members": 1})
    assert e.value.status == 400


@pytest.mark.slow
@pytest.mark.parametrize("family", ["clamnet", "datasetgan"])
def test_a_dying_rank_of_clamnet_or_datasetgan_publishes_nothing(family, request, tmp_path, dying_rank):
    from labelfactory.tasks.datasetgan import DatasetGANTrain

    if family == "clamnet":
        datastore_copy = request.getfixturevalue("datastore_copy")
        task, ds = clamnet_trainer(tmp_path / "model", datastore_copy), request.getfixturevalue("datastore")
    else:
        model_dir, ds, _ = request.getfixturevalue("generated")
        task = DatasetGANTrain(model_dir, DatasetGANConfig(members=2, hidden=(8, 8), max_epochs=1))
    with pytest.raises(
        LabelFactoryError, match=f"{family} training on 2 cpu processes failed, rank 1 exited with code 3"
    ):
        task({"multi_gpu": True, "gpus": "2"}, ds)
    assert not (task.model_dir / f"{family}.pt").exists() and task.stats() == {}
    assert not list(task.model_dir.glob(f".{family}-launch-*")) and not (task.model_dir / LOCK_FILE).exists()


@pytest.mark.slow
def test_mean_teacher_trains_on_two_gloo_ranks(trainer, datastore):
    stats = trainer({"multi_gpu": True, "gpus": "2", "real": "2", "consistency": 0.5}, datastore)
    record = load_checkpoint(trainer.model_dir / "segmentation.pt", "segmentation")
    assert record["config"]["consistency"] == 0.5
    assert record["data"]["unlabelled_studies"] == ["thorax_aorta", "torso_3mm_long"]
    assert stats["unlabelled_slices"] == record["data"]["unlabelled_slices"] > 0 and trainer.stats() == stats


def test_the_mean_teacher_is_the_same_on_every_rank(tmp_path):
    from tests.conftest import free_port
    from tests.mean_teacher_ranks import teacher_on_rank

    torch.multiprocessing.spawn(teacher_on_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert not torch.equal(r0["student"]["1.running_mean"], r1["student"]["1.running_mean"])
    assert all(torch.equal(r0["teacher"][k], r1["teacher"][k]) for k in r0["teacher"])
    assert torch.equal(r1["teacher"]["1.running_mean"], r0["student"]["1.running_mean"])  # rank 0's statistics
