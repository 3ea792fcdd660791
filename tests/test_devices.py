"""The one device rule (`labelfactory.devices`): how a spec resolves, that `auto` takes the GPU when one is present,
and that every app task trains and infers on its device: on the CPU here, on CUDA too where a GPU exists."""

from __future__ import annotations

import json

import pytest
import torch
from monailabel.datastore.local import LocalDatastore

from labelfactory import devices
from labelfactory.clamnet import train as clamnet_train
from labelfactory.datasetgan import train as datasetgan_train
from labelfactory.devices import module_device, resolve_device
from labelfactory.errors import LabelFactoryError
from labelfactory.io import read_image
from labelfactory.labels import DEFAULT
from labelfactory.segmentation.train import SegmentationConfig
from labelfactory.stylegan2.checkpoint import load_generator
from labelfactory.tasks import clamnet as clamnet_task
from labelfactory.tasks import datasetgan as datasetgan_task
from labelfactory.tasks import segmentation as segmentation_task
from labelfactory.tasks import stylegan2 as stylegan2_task
from labelfactory.tasks.clamnet import ClamNetInfer, ClamNetTrain
from labelfactory.tasks.datasetgan import DatasetGANInfer, DatasetGANModels, DatasetGANTrain
from labelfactory.tasks.segmentation import SegmentationInfer, SegmentationTrain
from labelfactory.tasks.stylegan2 import StyleGAN2Train
from labelfactory.tasks.synthesis import SynthesisInfer
from tests.conftest import REPO
from tests.test_clamnet_task import TINY as TINY_CLAMNET
from tests.test_gan_task import TINY as TINY_GAN
from tests.test_interpreter_tasks import FAST, add_generated
from tests.test_interpreter_tasks import setup as setup

pytestmark = pytest.mark.usefixtures("one_thread")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on GPU machines, not in CI)")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine that reports two CUDA GPUs (nothing is moved there: only the device is resolved)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_cpu_and_auto_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    with pytest.raises(LabelFactoryError, match="no usable CUDA GPU") as e:
        resolve_device("cuda")
    assert e.value.status == 400


@pytest.mark.parametrize("spec", ["gpu", "cpu:1", "auto:0", "cuda:x", "cuda:-1"])
def test_unknown_specs_are_refused(spec, two_gpus):
    with pytest.raises(LabelFactoryError, match="expected auto"):
        resolve_device(spec)


def test_auto_and_cuda_take_the_gpu_and_the_ranks_own_under_torchrun(two_gpus, monkeypatch):
    assert resolve_device("auto") == resolve_device("cuda") == resolve_device("") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(LabelFactoryError, match="GPU 2 does not exist"):
        resolve_device("cuda:2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index wins
    assert resolve_device("cpu") == torch.device("cpu")


def test_precision_auto_is_bf16_on_cuda_only():
    assert devices.use_bf16(torch.device("cuda", 0)) and not devices.use_bf16(torch.device("cpu"))
    assert not devices.use_bf16(torch.device("cuda", 0), "fp32") and devices.use_bf16(torch.device("cpu"), "bf16")
    with pytest.raises(LabelFactoryError, match="precision"):
        devices.use_bf16(torch.device("cpu"), "fp16")


def test_every_app_task_takes_the_apps_device_and_shows_it(two_gpus, tmp_path, app_config):
    """`auto` on a machine with a GPU: each config's trainer, infer, strategy and scoring report cuda:0 in /info."""
    device = str(resolve_device("auto"))  # what main.py passes
    shown = {}
    for module, cls in (
        ("clamnet", "ClamNet"),
        ("datasetgan", "DatasetGAN"),
        ("segmentation", "Segmentation"),
        ("stylegan2", "StyleGAN2"),
    ):
        c = getattr(app_config(module), cls)()
        c.init(module, str(tmp_path / "model"), {}, None, label_map=DEFAULT, device=device)
        for kind, tasks in (
            ("infer", c.infer()),
            ("train", c.trainer()),
            ("strategy", c.strategy()),
            ("scoring", c.scoring_method()),
        ):
            for name, task in (tasks or {}).items():
                shown[f"{kind} {name}"] = task.info()["device"]
    assert set(shown) >= {
        "infer clamnet",
        "infer datasetgan",
        "infer synthesis",
        "infer segmentation",
        "train clamnet",
        "train datasetgan",
        "train segmentation",
        "train stylegan2",
        "strategy generated_uncertain",
        "scoring generated_uncertainty",
    }
    assert set(shown.values()) == {"cuda:0"}


def spy(monkeypatch, module, name: str) -> list:
    """Wrap `module.name` (calling through); returns the list of (args, kwargs, result) of its calls."""
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize("device", DEVICES)
def test_segmentation_trains_and_infers_on_its_device(device, datastore_copy, tmp_path, make_pairs, monkeypatch):
    calls = spy(monkeypatch, segmentation_task, "train_segmenter")
    loads = spy(monkeypatch, segmentation_task, "load_segmenter")
    model_dir, want = tmp_path / "model", resolve_device(device)
    synthetic = make_pairs(tmp_path / "synthetic", 4, size=32)
    cfg = SegmentationConfig(network="unet", size=32, steps=1, val_interval=1, batch_size=2)
    trainer = SegmentationTrain(model_dir, cfg, str(synthetic), device=device)
    trainer({"real": "2"}, LocalDatastore(str(datastore_copy), extensions=("*.nii.gz",), auto_reload=False))
    assert calls[0][1]["device"] == want and module_device(calls[0][2].network) == want
    infer = SegmentationInfer(model_dir, device=device)
    label_file, _ = infer({"image": str(datastore_copy / "torso_3mm.nii.gz")})
    assert loads[0][0][1] == want and module_device(infer.model.get().network) == want
    assert infer.info()["device"] == str(want)
    assert read_image(label_file).array.shape == read_image(datastore_copy / "torso_3mm.nii.gz").array.shape


@pytest.mark.parametrize("device", DEVICES)
def test_clamnet_trains_and_infers_on_its_device(device, datastore_copy, tmp_path, monkeypatch):
    calls = spy(monkeypatch, clamnet_train, "train_clamnet")
    loads = spy(monkeypatch, clamnet_task, "load_clamnet")
    model_dir, want, organ_dirs = tmp_path / "model", resolve_device(device), [str(datastore_copy / "reference")]
    ds = LocalDatastore(str(datastore_copy), extensions=("*.nii.gz",))
    ClamNetTrain(model_dir, TINY_CLAMNET, organ_dirs=organ_dirs, device=device)({"steps": 1}, ds)
    assert calls[0][0][3] == want and module_device(calls[0][2][0]) == want
    assert {v.device for v in clamnet_train.load_clamnet(model_dir / "clamnet.pt", "cpu")[0].state_dict().values()} == {
        torch.device("cpu")
    }  # the file loads on the CPU, whatever it trained on
    infer = ClamNetInfer(model_dir, organ_dirs, device=device)
    _, result = infer({"image": str(datastore_copy / "thorax_aorta.nii.gz")})
    assert loads[0][0][1] == want and module_device(infer.model.get()[0]) == want and result["result"] == "marker"


@pytest.mark.parametrize("device", DEVICES)
def test_datasetgan_and_synthesis_train_and_infer_on_their_device(device, setup, monkeypatch):
    model_dir, ds, G, tmp = setup
    calls = spy(monkeypatch, datasetgan_train, "train_ensemble")
    loads = spy(monkeypatch, datasetgan_task, "load_generator")
    want = resolve_device(device)
    ids = [add_generated(ds, G, s, tmp) for s in range(2)]
    DatasetGANTrain(model_dir, FAST, device=device)({}, ds)
    (G_trained, *_), _, (ensemble, _) = calls[0]
    assert loads[0][0][1] == want  # the trainer's generator, loaded onto its device
    assert module_device(G_trained) == module_device(ensemble) == want
    models = DatasetGANModels(model_dir, device=device)
    interp = models.interpreter()
    assert loads[1][0][1] == want  # the served one
    assert module_device(interp.G) == module_device(interp.factorized) == want
    info = ds.get_image_info(ids[0])
    out, _ = DatasetGANInfer(models)({"image": ds.get_image_uri(ids[0]), "labelfactory": info["labelfactory"]})
    assert read_image(out).array.shape == (32, 32)
    lab = interp.label(torch.zeros(1, G.num_ws, G.w_dim))  # ws from anywhere; outputs on the device
    assert {t.device for t in (lab.image, lab.mask, lab.uncertainty, lab.score)} == {want}
    synthesis = SynthesisInfer(models)
    _, result = synthesis({"image": "seed000007", "seed": 7})
    assert result["seed"] == 7 and synthesis.info()["device"] == str(want)


@pytest.mark.parametrize("device", DEVICES)
def test_stylegan2_trains_on_its_device_and_publishes_a_cpu_loadable_file(device, tmp_path, monkeypatch):
    import shutil

    from tests.test_gan_task import REPO

    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(REPO / "sample-data" / "datastore" / "torso_3mm.nii.gz", store)
    calls = spy(monkeypatch, stylegan2_task, "train")
    task = StyleGAN2Train(tmp_path / "model", TINY_GAN, device=device)
    task({}, LocalDatastore(str(store), extensions=("*.nii.gz",), auto_reload=False))
    assert calls[0][1]["device"] == resolve_device(device)
    G = load_generator(tmp_path / "model" / "stylegan2.pt", "cpu")
    assert module_device(G) == torch.device("cpu") and G.img_resolution == TINY_GAN.resolution


def test_the_interpreters_bf16_votes_match_fp32_on_the_shipped_models(sample):
    """Issue 29's check of bf16 against the fp32 path, here on the CPU (the GPU's in scripts/gpu_check.py):
    >= 99.9% of the shipped OpenKBP interpreter's votes equal on 8 generated slices, uncertainty close."""
    from labelfactory.datasetgan.labeller import load_interpreter
    from labelfactory.datasetgan.taps import ws_from_seeds

    models = sample / "openkbp" / "models"
    G = load_generator(models / "stylegan2.pt")
    ws = ws_from_seeds(G, list(range(8)), 0.7)
    fp32, bf16 = (load_interpreter(models / "datasetgan.pt", G, p).label(ws) for p in ("fp32", "bf16"))
    assert (fp32.mask == bf16.mask).float().mean() >= 0.999
    assert torch.allclose(fp32.uncertainty, bf16.uncertainty, atol=0.05)
    assert torch.allclose(fp32.image, bf16.image, atol=1e-6)  # the generator stays fp32


@pytest.mark.slow
def test_the_gpu_check_script_runs_every_row_on_the_cpu(tmp_path):
    """scripts/gpu_check.sh --cpu-smoke: every check runs (none "failed"), the bf16 interpreter's votes compared."""
    import os
    import subprocess
    import sys

    out = tmp_path / "gpu_check.json"
    script = REPO / "scripts" / "gpu_check.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), "--cpu-smoke", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {r["check"]: r for r in json.loads(out.read_text())["rows"]}
    assert not [r for r in rows.values() if r["what"].startswith(("failed", "skipped"))]
    assert rows["interpreter bf16 vs fp32"]["value"] >= 0.999 and rows["segmentation bf16 vs fp32"]["value"] >= 0.995
