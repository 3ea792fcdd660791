"""MONAI Label adapters for ClamNet, called directly: train on the sample datastore copy, infer on a volume and a 2D
image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from monailabel.datastore.local import LocalDatastore

from labelfactory.clamnet.train import ClamNetConfig
from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image, read_image, write_image
from labelfactory.tasks.clamnet import MODEL_FILE, ClamNetInfer, ClamNetTrain

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ClamNetConfig(size=32, features=(4, 4, 8, 8, 16, 4), steps=2, batch=2, seed=0)


def test_infer_without_model_says_train_first(tmp_path):
    with pytest.raises(LabelFactoryError, match="train clamnet first") as e:
        ClamNetInfer(tmp_path)({"image": "whatever.nii.gz"})
    assert e.value.status == 409


def test_train_then_infer_volume_and_2d(tmp_path, datastore_copy, sample):
    organ_dirs = [str(datastore_copy / "reference")]  # the copy holds image_labels.csv and reference/
    ds = LocalDatastore(str(datastore_copy), extensions=("*.nii.gz",))
    model_dir = tmp_path / "model"
    trainer = ClamNetTrain(model_dir, TINY, organ_dirs=organ_dirs)
    stats = trainer({"steps": 2}, ds)
    assert (model_dir / MODEL_FILE).is_file() and stats["abnormal"] > 0
    assert trainer.stats()["steps"] == 2 and "thorax_aorta" in stats["studies"]

    infer = ClamNetInfer(model_dir, organ_dirs)
    image_path = datastore_copy / "thorax_aorta.nii.gz"
    label_path, result = infer({"image": str(image_path)})
    prob_path, prob_result = infer({"image": str(image_path), "probability": True})
    assert result["result"] == "marker" and prob_result["result"] == "probability"
    image, label, prob = read_image(image_path), read_image(label_path), read_image(prob_path)
    assert label.array.shape == prob.array.shape == image.array.shape
    assert np.allclose(label.spacing, image.spacing) and np.allclose(prob.origin, image.origin)
    assert np.array_equal(label.array, prob.array >= result["threshold"])  # the mask is the thresholded map
    assert result["marker_voxels"] == int(label.array.sum())
    aorta = read_image(sample / "datastore" / "reference" / "thorax_aorta" / "mask_aorta.nii.gz").array > 0
    outside = ~aorta & (np.arange(aorta.shape[0])[:, None, None] > 155)  # slices without aorta stay 0
    assert prob.array[outside].max() == 0
    assert result["organ_crop"] == "organ mask of the study"

    # a 2D datastore image with its organ mask saved under a label tag, named in the request
    k = 60
    flat = Image(image.array[k], image.spacing[:2], image.origin[:2], (1.0, 0.0, 0.0, 1.0))
    p2d, m2d = tmp_path / "store" / "slice.nii.gz", tmp_path / "store" / "labels" / "organ" / "slice.nii.gz"
    write_image(flat, p2d)
    write_image(flat.with_array(aorta[k].astype(np.uint8)), m2d)
    label_path, result = infer({"image": str(p2d), "organ_mask": "organ"})
    assert read_image(label_path).array.shape == flat.array.shape and result["organ_crop"] == "organ_mask organ"
    assert json.loads(json.dumps(result)) == result  # the JSON the server sends, unchanged by the round trip
    assert set(result) >= {"label_names", "result", "threshold", "latencies"} and "probability" not in result
    for bad in (str(m2d), "../organ", "final"):  # a server path, a path in disguise, a tag without a label
        with pytest.raises(LabelFactoryError, match="organ_mask") as e:
            infer({"image": str(p2d), "organ_mask": bad})
        assert e.value.status == 400


def test_cli_train_clamnet(tmp_path, sample):
    from labelfactory.cli import main

    out = tmp_path / "clamnet.pt"
    rc = main(
        [
            "train-clamnet",
            "--studies",
            str(sample / "datastore"),
            "--organ-dir",
            str(sample / "datastore" / "reference"),
            "--steps",
            "1",
            "--batch",
            "2",
            "--size",
            "32",
            "--features",
            "4",
            "4",
            "8",
            "8",
            "16",
            "4",
            "--out",
            str(out),
        ]
    )
    assert rc == 0 and out.is_file()
    assert (
        main(["train-clamnet", "--studies", str(tmp_path), "--out", str(out)]) == 2
    )  # no labels CSV: a one-line error


def test_a_head_without_deep_supervision_is_refused_before_training(tmp_path):
    trainer = ClamNetTrain(tmp_path, TINY)
    with pytest.raises(LabelFactoryError, match="head=2 needs deep_supervision=true") as e:
        trainer.parse_request({"head": 2})
    assert e.value.status == 400
    assert trainer.parse_request({"head": "2", "deep_supervision": "true"}).head == 2
    assert {"head", "deep_supervision", "threshold"} <= set(trainer.config())
