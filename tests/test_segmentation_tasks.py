"""MONAI Label adapters `segmentation` (trainer and infer) called directly over a local datastore; the app config."""

from __future__ import annotations

import json

import pytest
from monailabel.datastore.local import LocalDatastore

from labelfactory.errors import LabelFactoryError
from labelfactory.io import read_image
from labelfactory.segmentation.train import SegmentationConfig
from labelfactory.tasks.segmentation import SegmentationInfer, SegmentationTrain

pytestmark = pytest.mark.usefixtures("one_thread")


def test_infer_answers_train_first_then_segments_in_the_input_geometry(datastore_copy, tmp_path, make_pairs):
    model_dir = tmp_path / "model"
    infer = SegmentationInfer(model_dir)
    image_path = datastore_copy / "torso_3mm.nii.gz"
    with pytest.raises(LabelFactoryError, match="train segmentation first") as e:
        infer({"image": str(image_path)})
    assert e.value.status == 409

    synthetic = make_pairs(tmp_path / "synthetic", 6, size=32)
    trainer = SegmentationTrain(
        model_dir, SegmentationConfig(size=32, steps=2, val_interval=2, batch_size=2), str(synthetic)
    )
    assert trainer.config()["network"][0] == "unetpp"
    datastore = LocalDatastore(str(datastore_copy), extensions=("*.nii.gz",), auto_reload=False)
    stats = trainer({"network": ["unet"], "real": "4", "steps": 2}, datastore)
    assert stats["network"] == "unet" and stats["synthetic_pairs"] == 6 and stats["real_slices"] == 4
    assert stats["val_patients"] == ["torso_3mm"]
    assert stats["best_metric"] == max(h["val_dice"] for h in stats["history"])  # the Dice of the model it kept
    assert trainer.stats() == json.loads((model_dir / "segmentation_train_stats.json").read_text())

    label_file, info = infer({"image": str(image_path), "result_extension": ".nrrd"})
    label, image = read_image(label_file), read_image(image_path)
    assert (
        label_file.endswith(".nrrd")
        and label.array.shape == image.array.shape
        and label.spacing == pytest.approx(image.spacing)
    )
    assert (
        info["label_names"]["liver"] == 1
        and "background" not in info["label_names"]
        and info["model"]["network"] == "unet"
    )


def test_trainer_uses_real_labels_only_without_a_synthetic_set(datastore_copy, tmp_path):
    trainer = SegmentationTrain(
        tmp_path / "model",
        SegmentationConfig(network="unet", size=32, steps=2, val_interval=2, batch_size=4),
        str(tmp_path / "absent"),
    )
    datastore = LocalDatastore(str(datastore_copy), extensions=("*.nii.gz",), auto_reload=False)
    stats = trainer({}, datastore)
    assert (
        stats["synthetic_pairs"] == 0
        and stats["real_patients"] == ["abdomen"]
        and (tmp_path / "model" / "segmentation.pt").is_file()
    )
    semi = trainer({"consistency": 0.5}, datastore)  # Mean Teacher on the images nobody labelled
    unlabelled = set(datastore.get_unlabeled_images())
    assert unlabelled and semi["unlabelled_studies"] == sorted(unlabelled) and semi["unlabelled_slices"] > 0


def test_app_config_offers_trainer_and_infer(tmp_path, app_config):
    config = app_config("segmentation").Segmentation()
    config.init("segmentation", str(tmp_path / "model"), {"segmentation_steps": "7"}, None)
    assert isinstance(config.infer()["segmentation"], SegmentationInfer)
    trainer = config.trainer()["segmentation"]
    assert trainer.config()["steps"] == 7 and trainer.synthetic_dir == str(tmp_path / "synthetic")
