"""MONAI Label trainer `stylegan2`, its TaskConfig and `labelfactory train-stylegan2`, on a tmp datastore copy."""

import json
import shutil
from pathlib import Path

import pytest
from monailabel.datastore.local import LocalDatastore

from labelfactory.cli import main as cli_main
from labelfactory.stylegan2.checkpoint import load_generator
from labelfactory.stylegan2.config import StyleGAN2Config
from labelfactory.tasks.stylegan2 import MODEL_FILE, STATS_FILE, StyleGAN2Train
from tests.conftest import TINY_GAN

REPO = Path(__file__).resolve().parents[1]
TINY = StyleGAN2Config(
    **TINY_GAN,
    pl_weight=0.0,
    total_kimg=0.008,
    snapshot_kimg=0.004,
    fid_kimg=0.0,
    preview_seeds=4,
)


@pytest.fixture
def small_store(tmp_path):
    dst = tmp_path / "store"
    dst.mkdir()
    shutil.copy(REPO / "sample-data" / "datastore" / "torso_3mm.nii.gz", dst)
    return dst


def test_trainer_publishes_model_stats_and_continues(small_store, tmp_path):
    ds = LocalDatastore(str(small_store), extensions=("*.nii.gz",), auto_reload=False)
    task = StyleGAN2Train(tmp_path / "model", TINY)
    stats = task({"total_kimg": "0.008"}, ds)
    G = load_generator(tmp_path / "model" / MODEL_FILE)
    assert G.img_resolution == 16 and G.checkpoint_info["kimg"] == 0.008
    assert G.checkpoint_info["data"]["images"] == ["torso_3mm"] and G.checkpoint_info["data"]["slices"] == 30
    assert stats["kimg"] == 0.008 and task.stats() == json.loads((tmp_path / "model" / STATS_FILE).read_text())
    assert task.config()["resolution"] == 16
    task({"total_kimg": 0.012}, ds)  # more kimg: continues from the saved state, not from scratch
    assert load_generator(tmp_path / "model" / MODEL_FILE).checkpoint_info["kimg"] == 0.012
    assert [h["kimg"] for h in task.stats()["history"]] == [0.004, 0.008, 0.012]


def test_app_config_builds_trainer(tmp_path, app_config):
    c = app_config("stylegan2").StyleGAN2()
    c.init(
        "stylegan2",
        str(tmp_path),
        {"stylegan2_preset": "demo", "stylegan2_resolution": "32", "stylegan2_total_kimg": "1"},
        None,
    )
    trainer = c.trainer()["stylegan2"]
    assert trainer.defaults.resolution == 32 and trainer.defaults.total_kimg == 1.0 and c.infer() == {}


def test_cli_train_gan(small_store, tmp_path, capsys):
    rc = cli_main(
        [
            "train-stylegan2",
            "--studies",
            str(small_store),
            "--out",
            str(tmp_path / "run"),
            "--model",
            str(tmp_path / "stylegan2.pt"),
            "--preset",
            "demo",
            "--resolution",
            "16",
            "--total-kimg",
            "0.008",
            "--batch-size",
            "4",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert load_generator(tmp_path / "stylegan2.pt").checkpoint_info["kimg"] == 0.008
    assert (tmp_path / "run" / "preview.png").is_file()
    assert cli_main(["train-stylegan2", "--studies", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run2")]) == 2
