"""The label map belongs to the data set: models record it, the app serves it, a model of another map answers 409."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import requests
import torch

from labelfactory.checkpoints import load_checkpoint
from labelfactory.datasetgan import EnsembleConfig, PixelEnsemble, TapLayout, save_interpreter
from labelfactory.datasets import openkbp
from labelfactory.errors import LabelFactoryError
from labelfactory.io import read_image
from labelfactory.labels import OPENKBP, TOTALSEGMENTATOR, LabelMap, map_of, recorded_map, served_map
from labelfactory.segmentation.data import RealSlices
from labelfactory.segmentation.infer import Segmenter, segment_image
from labelfactory.segmentation.train import MODEL_FILE, SegmentationConfig, train_segmenter
from labelfactory.stylegan2.checkpoint import load_generator, publish_generator
from labelfactory.stylegan2.networks import Generator
from labelfactory.tasks.datasetgan import DatasetGANModels
from labelfactory.tasks.segmentation import SegmentationInfer
from tests.conftest import SAMPLE

pytestmark = pytest.mark.usefixtures("one_thread")
CASES = SAMPLE / "openkbp" / "cases"
STORE = SAMPLE / "openkbp" / "datastore"
WINDOW = (openkbp.WINDOW.level, openkbp.WINDOW.width)


def test_openkbp_map_is_the_data_sets_organs_and_round_trips_through_a_record():
    assert {v: n for v, (n, _) in OPENKBP.organs.items()} == openkbp.ORGANS
    assert OPENKBP.values["background"] == 0 and OPENKBP.values["mandible"] == 7
    assert LabelMap.from_record(OPENKBP.record()) == OPENKBP
    assert map_of(OPENKBP.values) is OPENKBP and map_of(TOTALSEGMENTATOR.values) is TOTALSEGMENTATOR
    assert map_of({"background": 0, "tumour": 1}).name == "unnamed"


def train_tiny(model_dir, label_map: LabelMap, slicing: str = "body-crop"):
    """A 2-step UNet on 32 px body crops of one bundled patient, published as model_dir/segmentation.pt."""
    case = openkbp.load_case(openkbp.read_cases(CASES, "train")[0], size=32)
    data = RealSlices(case.images[::8], case.organs[::8], [case.case.name] * len(case.images[::8]))
    cfg = SegmentationConfig(
        network="unet",
        size=32,
        steps=2,
        val_interval=2,
        batch_size=4,
        label_names=label_map.values,
        slicing=slicing,
        window=WINDOW,
    )
    return train_segmenter(data, None, cfg, out=model_dir / MODEL_FILE)


@pytest.fixture(scope="module")
def openkbp_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("openkbp_models")
    torch.manual_seed(0)
    train_tiny(d, OPENKBP)
    return d


def test_segmenter_records_its_map_and_refuses_to_serve_under_another(openkbp_models, tmp_path):
    assert recorded_map(load_checkpoint(openkbp_models / MODEL_FILE)) == OPENKBP
    assert served_map(None, openkbp_models) == (OPENKBP, "recorded by segmentation.pt")
    image = str(STORE / "validation_pt_201.nii.gz")
    label_file, info = SegmentationInfer(openkbp_models, OPENKBP.values)({"image": image})
    assert info["label_names"] == {n: v for n, v in OPENKBP.values.items() if v}
    assert read_image(label_file).array.shape == read_image(image).array.shape
    with pytest.raises(LabelFactoryError, match="trained with the label map 'openkbp'") as e:
        SegmentationInfer(openkbp_models, TOTALSEGMENTATOR.values)({"image": image})
    assert e.value.status == 409
    # and the other way round: a TotalSegmentator-map model under the OpenKBP map
    train_tiny(tmp_path, TOTALSEGMENTATOR, slicing="resize")
    with pytest.raises(LabelFactoryError, match="'totalsegmentator'.*serves 'openkbp'") as e:
        SegmentationInfer(tmp_path, OPENKBP.values)({"image": image})
    assert e.value.status == 409


def publish_interpreter(model_dir, label_map: LabelMap) -> None:
    """A tiny generator and an untrained interpreter with `label_map`, published in model_dir."""
    kw = dict(z_dim=32, w_dim=32, img_resolution=32, channel_base=512, channel_max=32, mapping_layers=2)
    torch.manual_seed(0)
    publish_generator(Generator(**kw).eval(), kw, model_dir / "stylegan2.pt", config={}, data={}, kimg=0.0)
    G = load_generator(model_dir / "stylegan2.pt")
    layout = TapLayout.of(G)
    k = max(label_map.values.values()) + 1
    ens = PixelEnsemble(EnsembleConfig(layout.channels, layout.resolutions, 32, k, members=2, hidden=(8, 8))).eval()
    save_interpreter(model_dir / "datasetgan.pt", ens, label_map.values, {}, {}, G)


def test_interpreter_records_its_map_and_refuses_to_serve_under_another(tmp_path):
    publish_interpreter(tmp_path, OPENKBP)
    assert recorded_map(load_checkpoint(tmp_path / "datasetgan.pt")) == OPENKBP
    assert DatasetGANModels(tmp_path, OPENKBP.values).interpreter().label_names == OPENKBP.values
    with pytest.raises(LabelFactoryError, match="datasetgan.pt was trained with the label map 'openkbp'") as e:
        DatasetGANModels(tmp_path, TOTALSEGMENTATOR.values).interpreter()
    assert e.value.status == 409


class BoneNet(torch.nn.Module):
    """A stand-in segmenter: 'mandible' (7) where the windowed input is brighter than `threshold`, else background."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = torch.nn.Parameter(torch.tensor(threshold), requires_grad=False)

    def forward(self, x):
        logits = torch.zeros((x.shape[0], 8, *x.shape[2:]))
        logits[:, 7] = x[:, 0] - self.threshold
        return logits


def test_body_crop_segmenter_pastes_each_slice_back_where_its_pixels_are():
    """3D OpenKBP CT in, a label volume on the same grid out: predictions land on the voxels they were made for."""
    image = read_image(STORE / "validation_pt_222.nii.gz")
    hu = image.array.astype(np.float32)
    segmenter = Segmenter(
        BoneNet(float(openkbp.WINDOW.to_unit(300.5))),
        64,
        OPENKBP.values,
        {"config": {"slicing": "body-crop", "window": WINDOW}},
    )
    label = segment_image(segmenter, image)
    assert label.array.shape == image.array.shape and label.spacing == pytest.approx(image.spacing)
    boxes = openkbp.body_boxes(hu, 64)
    expected = np.zeros(hu.shape, bool)
    for b in boxes:
        ys, xs = slice(max(b.y0, 0), b.y0 + 64), slice(max(b.x0, 0), b.x0 + 64)
        expected[b.z, ys, xs] = hu[b.z, ys, xs] > 300.5
    assert np.array_equal(label.array == 7, expected) and set(np.unique(label.array)) == {0, 7}
    # the expert mandible is bone: most of it is found where it is
    mandible = read_image(STORE / "organs" / "validation_pt_222.nii.gz").array == OPENKBP.values["mandible"]
    assert (label.array[mandible] == 7).mean() > 0.5
    # the same volume stored in another orientation gives the same labels, in that orientation
    flipped = image.with_array(image.array[:, ::-1].copy())
    flipped = type(image)(flipped.array, image.spacing, image.origin, (1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    assert np.array_equal(segment_image(segmenter, flipped).array, label.array[:, ::-1])


@pytest.mark.slow
def test_server_serves_the_map_its_models_record_and_refuses_another(openkbp_models, app_copy, start_server, tmp_path):
    """The models folder holds an OpenKBP segmenter (served first: its map is the server's) and an interpreter
    trained under the TotalSegmentator map, which answers 409."""
    store, models = tmp_path / "store", tmp_path / "models"
    shutil.copytree(STORE, store)
    shutil.copytree(openkbp_models, models)
    publish_interpreter(models, TOTALSEGMENTATOR)
    conf = {"models": "segmentation,datasetgan", "skip_trainers": "true", "skip_scoring": "true"}
    conf["model_dir"] = str(models)
    srv = start_server(store, app_copy, conf=conf)
    info = requests.get(srv.url + "/info/", timeout=30).json()
    assert info["labels"] == OPENKBP.values and info["label_map"] == "openkbp"
    assert info["label_colors"]["spinal cord"] == pytest.approx([c / 255 for c in OPENKBP.colors["spinal cord"]])
    infer = srv.url + "/infer/segmentation"
    r = requests.post(infer, params={"image": "validation_pt_201", "output": "json"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["label_names"] == {n: v for n, v in OPENKBP.values.items() if v}
    r = requests.post(srv.url + "/infer/synthesis", params={"image": "seed000001", "output": "json"}, timeout=120)
    assert r.status_code == 409 and "datasetgan.pt was trained with the label map 'totalsegmentator'" in r.text


def test_body_crop_segmenter_refuses_a_picture():
    segmenter = Segmenter(BoneNet(0.0), 64, OPENKBP.values, {"config": {"slicing": "body-crop", "window": WINDOW}})
    picture = read_image(STORE / "validation_pt_222.nii.gz")
    picture = picture.with_array(np.zeros(picture.array.shape, np.uint8))
    with pytest.raises(LabelFactoryError, match="CT in HU") as e:
        segment_image(segmenter, picture)
    assert e.value.status == 400
