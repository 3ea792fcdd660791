"""Downstream segmenter: pair data sets, the four networks, MONAI training with validation, inference geometry, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from labelfactory.checkpoints import load_checkpoint
from labelfactory.errors import LabelFactoryError
from labelfactory.io import read_image
from labelfactory.segmentation.data import PairSubset, real_slices, synthetic_pairs, training_sets
from labelfactory.segmentation.infer import load_segmenter, segment_image
from labelfactory.segmentation.networks import NETWORKS, build_network
from labelfactory.segmentation.train import SegmentationConfig, train_segmenter

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory, make_pairs) -> Path:
    return make_pairs(tmp_path_factory.mktemp("synthetic"), 8)


def tiny(network: str = "unetpp", **kw) -> SegmentationConfig:
    return SegmentationConfig(
        **{"network": network, "size": SIZE, "steps": 4, "batch_size": 4, "val_interval": 2, "lr": 3e-3, **kw}
    )


def test_synthetic_pairs_read_the_synthesis_layout(pairs_dir, tmp_path, make_pairs):
    ds = synthetic_pairs(pairs_dir, SIZE)
    assert len(ds) == 8 and ds.groups[0] == "seed000000"
    item = ds[3]
    assert item["image"].shape == (1, SIZE, SIZE) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, SIZE, SIZE) and set(item["label"].unique().tolist()) <= {0, 1, 2, 6}
    assert -1 <= item["image"].min() < item["image"].max() <= 1
    with pytest.raises(LabelFactoryError, match="synthesize"):
        synthetic_pairs(tmp_path, SIZE)
    broken = make_pairs(tmp_path / "broken", 2)
    next((broken / "labels").iterdir()).unlink()
    with pytest.raises(LabelFactoryError, match="no labels/"):
        synthetic_pairs(broken, SIZE)


@pytest.mark.parametrize("name", NETWORKS)
def test_networks_map_one_channel_to_class_logits(name):
    net = build_network(name, 9)
    x = torch.randn(2, 1, SIZE, SIZE)
    net.train()
    out = net(x)
    if name == "unetpp":  # deep supervision: four heads, the full-depth one first
        assert isinstance(out, list) and len(out) == 4
        net.eval()
        assert torch.equal(net(x), net.net(x)[-1])
    else:
        assert out.shape == (2, 9, SIZE, SIZE)
    assert net.eval()(x).shape == (2, 9, SIZE, SIZE)


def test_training_sets_keep_validation_patients_out(pairs_dir, sample):
    studies = sample / "datastore"
    train, real, val, info = training_sets(
        studies, pairs_dir, k_real=0, size=SIZE
    )  # synthetic: every patient validates
    assert len(train) == 8 and real is None and set(val.groups) == {"abdomen", "torso_3mm"} and info["real_slices"] == 0
    train, real, val, info = training_sets(studies, None, k_real=None, size=SIZE)  # real only
    assert real is None and set(train.groups).isdisjoint(val.groups) and info["val_patients"] == ["torso_3mm"]
    train, real, val, info = training_sets(studies, pairs_dir, k_real=5, size=SIZE)  # hybrid
    assert len(train) == 8 and len(real) == 5 and info["real_slices"] == 5 and set(real.groups) == {"abdomen"}
    with pytest.raises(LabelFactoryError, match="nothing to train on"):
        training_sets(studies, None, k_real=0, size=SIZE)


@pytest.mark.parametrize("name", NETWORKS)
def test_each_segmenter_trains_validates_and_saves(name, pairs_dir, sample, tmp_path):
    val = real_slices(sample / "datastore", SIZE)
    val = PairSubset(val, range(0, len(val), 10))
    out = tmp_path / "segmentation.pt"
    result = train_segmenter(
        synthetic_pairs(pairs_dir, SIZE), val, tiny(name), out=out, log_dir=tmp_path / "tb", data={"pairs": 8}
    )
    assert result.steps == 4 and [h["step"] for h in result.history] == [2, 4]
    assert result.best_val_dice == max(h["val_dice"] for h in result.history)
    assert all(np.isfinite(h["loss"]) for h in result.history)
    payload = load_checkpoint(out, "segmentation")
    assert (
        payload["config"]["network"] == name
        and payload["data"] == {"pairs": 8}
        and payload["metrics"]["step"] == result.best_step
    )
    assert "package" in payload["provenance"]
    assert any((tmp_path / "tb").iterdir())


def test_training_is_deterministic_and_learns(pairs_dir):
    ds = synthetic_pairs(pairs_dir, SIZE)
    a = train_segmenter(ds, None, tiny("unet", steps=30, val_interval=30))
    b = train_segmenter(ds, None, tiny("unet", steps=30, val_interval=30))
    for p, q in zip(a.network.state_dict().values(), b.network.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    first = train_segmenter(ds, None, tiny("unet", steps=2, val_interval=2)).history[-1]["loss"]
    assert a.history[-1]["loss"] < first


def test_segment_image_returns_the_label_in_the_input_geometry(pairs_dir, sample, tmp_path):
    train_segmenter(synthetic_pairs(pairs_dir, SIZE), None, tiny("unetpp", steps=2), out=tmp_path / "m.pt")
    seg = load_segmenter(tmp_path / "m.pt")
    volume = read_image(sample / "datastore" / "torso_3mm.nii.gz")
    label = segment_image(seg, volume)
    assert label.array.shape == volume.array.shape and label.array.dtype == np.uint8
    assert label.spacing == volume.spacing and label.origin == volume.origin and label.direction == volume.direction
    picture = read_image(next((pairs_dir / "images").iterdir()))
    assert segment_image(seg, picture).array.shape == picture.array.shape
    with pytest.raises(LabelFactoryError, match="train segmentation first") as e:
        load_segmenter(tmp_path / "absent.pt")
    assert e.value.status == 409


def test_cli_train_segmentation_hybrid(pairs_dir, sample, tmp_path, capsys):
    from labelfactory.cli import main

    out = tmp_path / "model" / "segmentation.pt"
    rc = main(
        [
            "train-segmentation",
            "--synthetic",
            str(pairs_dir),
            "--studies",
            str(sample / "datastore"),
            "--real",
            "6",
            "--out",
            str(out),
            "--network",
            "unet",
            "--size",
            str(SIZE),
            "--steps",
            "2",
            "--val-interval",
            "2",
            "--batch-size",
            "4",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["data"]["real_slices"] == 6 and summary["data"]["val_patients"] == ["torso_3mm"]
    assert load_checkpoint(out, "segmentation")["config"]["network"] == "unet"
    assert main(["train-segmentation", "--out", str(out)]) == 2  # nothing to train on: one line, exit 2
