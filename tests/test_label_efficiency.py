"""The label-efficiency experiment (benchmarks/label_efficiency.py) reduced to tiny sizes on the bundled OpenKBP cases.

One end-to-end run (module fixture) through every stage, a real server loop included; then what it wrote, that a
rerun skips finished stages, that an interrupted training resumes to the same weights, and the 3D scoring rules.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from labelfactory.checkpoints import hash_path, sha256_of
from labelfactory.io import read_image
from labelfactory.stylegan2.checkpoint import publish_generator
from labelfactory.stylegan2.networks import Generator

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "sample-data" / "openkbp" / "cases"
KW = dict(z_dim=32, w_dim=32, img_resolution=64, channel_base=512, channel_max=32, mapping_layers=2)


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("label_efficiency", REPO / "benchmarks" / "label_efficiency.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["label_efficiency"] = module
    spec.loader.exec_module(module)
    return module


le = _load_benchmark()


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A tiny generator (trained on nothing, in OpenKBP's window) and one reduced run of every stage."""
    d = tmp_path_factory.mktemp("label_efficiency")
    torch.manual_seed(0)
    window = {"window_hu": [le.openkbp.WINDOW.low, le.openkbp.WINDOW.high]}
    publish_generator(Generator(**KW).eval(), KW, d / "stylegan2.pt", config={"tiny": True}, data=window, kimg=0.0)
    out = d / "out"
    torch.set_num_threads(1)
    assert le.main(["--data", str(DATA), "--generator", str(d / "stylegan2.pt"), "--out", str(out), "--reduced"]) == 0
    return out


@pytest.mark.slow
def test_every_stage_finishes_with_its_outputs(experiment):
    from labelfactory.checkpoints import load_checkpoint
    from labelfactory.datasetgan.labeller import KIND
    from labelfactory.segmentation.infer import load_segmenter

    sizes = le.Sizes.reduced()
    for stage in le.STAGES[:-1]:
        assert (experiment / stage / "done.json").is_file(), stage
    annotator = load_segmenter(experiment / "annotator" / "segmentation.pt")
    assert annotator.label_names == le.LABEL_NAMES
    assert annotator.record["config"]["slicing"] == "body-crop"
    assert len(list((experiment / "labels" / "random").glob("seed*.nii.gz"))) == sizes.annotations
    assert len(le.datastore_records(experiment / "labels" / "uncertainty" / "datastore")) == sizes.annotations
    for name in ("random", "uncertainty"):
        interp = load_checkpoint(experiment / "synthetic" / name / "datasetgan.pt", KIND)
        assert interp["config"]["label_names"] == le.LABEL_NAMES
        pairs = experiment / "synthetic" / name / "pairs"
        images = sorted((pairs / "images").glob("seed*.nii.gz"))
        assert len(images) == sizes.pairs
        mask = read_image(pairs / "labels" / images[0].name).array
        assert mask.shape == (sizes.size, sizes.size) and set(np.unique(mask)) <= set(le.LABEL_NAMES.values())
    results = json.loads((experiment / "report" / "results.json").read_text())
    assert set(results["table"]) == set(le.ROWS)
    assert all(row["seeds"] == sizes.seeds for row in results["table"].values())
    assert set(results["table_iii"]) == {"unetpp", *sizes.table_iii.split(",")}
    assert set(results["table"]["hybrid"]["organs"]) == set(le.openkbp.ORGANS.values())
    assert set(results["figures"]) == {"generator", "annotator", "pairs", "validation"}
    assert "| real-all |" in (experiment / "report" / "results.md").read_text()


@pytest.mark.slow
def test_hybrid_trains_on_the_synthetic_pairs_plus_the_real_30(experiment):
    record = json.loads((experiment / "segmenters" / "hybrid.unetpp.seed1" / "eval.json").read_text())
    real = json.loads((experiment / "segmenters" / "real-30.unetpp.seed1" / "eval.json").read_text())
    assert record["data"]["pairs"] == le.Sizes.reduced().pairs
    assert record["data"]["real"]["real_slices"] == real["data"]["real_slices"]
    assert len(real["data"]["real_slices"]) == le.Sizes.reduced().annotations


@pytest.mark.slow
def test_a_rerun_skips_finished_stages(experiment, monkeypatch, capsys):
    def never(self, folder):
        raise AssertionError("a finished stage ran again")

    for stage in le.STAGES[:-1]:
        monkeypatch.setattr(le.Experiment, stage, never)
    args = ["--data", str(DATA), "--out", str(experiment), "--reduced", "--stages", ",".join(le.STAGES[:-1])]
    assert le.main(args) == 0
    assert capsys.readouterr().err.count("skipped") == len(le.STAGES) - 1


@pytest.mark.slow
def test_shipped_models_serve_an_openkbp_volume_under_its_organ_names(experiment, tmp_path, app_copy, start_server):
    """`--ship`: generator, uncertainty-30 interpreter and hybrid seed 0 (same bytes, hashes, a README with their
    figures); a server on those models segments an OpenKBP CT and synthesizes pairs under OpenKBP's organ names."""
    import requests

    from labelfactory.checkpoints import hash_path, verify_hash
    from labelfactory.labels import OPENKBP

    shipped = tmp_path / "models"
    args = ["--data", str(DATA), "--out", str(experiment), "--reduced", "--stages", "report", "--ship", str(shipped)]
    assert le.main(args) == 0
    for name, src in le.shipped_sources(experiment).items():
        assert (shipped / name).read_bytes() == src.read_bytes() and hash_path(shipped / name).is_file()
        verify_hash(shipped / name)
    hybrid = json.loads((experiment / "segmenters" / "hybrid.unetpp.seed0" / "eval.json").read_text())
    readme = (shipped / "README.md").read_text()
    assert f"**{hybrid['validation']['mean_dice']:.3f}**" in readme and "Babier" in readme
    store = tmp_path / "store"
    store.mkdir()
    (store / "validation_pt_201.nii.gz").write_bytes((DATA / "volumes" / "validation_pt_201_ct.nii.gz").read_bytes())
    srv = start_server(store, app_copy, conf={"skip_trainers": "true", "model_dir": str(shipped)})
    organs = {n: v for n, v in OPENKBP.values.items() if v}
    r = requests.post(
        srv.url + "/infer/segmentation", params={"image": "validation_pt_201", "output": "image"}, timeout=300
    )
    assert r.status_code == 200, r.text
    (tmp_path / "mask.nii.gz").write_bytes(r.content)
    mask = read_image(tmp_path / "mask.nii.gz").array
    assert mask.shape == read_image(store / "validation_pt_201.nii.gz").array.shape
    assert set(np.unique(mask)) <= set(OPENKBP.values.values())
    r = requests.post(srv.url + "/infer/segmentation", params={"image": "validation_pt_201", "output": "json"})
    assert r.json()["label_names"] == organs
    r = requests.post(srv.url + "/infer/synthesis", params={"image": "seed000001", "output": "json"}, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["label_names"] == organs


@pytest.mark.slow
def test_a_run_from_shipped_models_rebuilds_the_uncertainty_set_and_trains_table_iii(experiment, tmp_path):
    """`--models`: the shipped generator and uncertainty-30 interpreter stand in for the generator, annotator and
    labels stages; the uncertainty set comes out as the full run made it, table III trains on it, the random set
    (no labels) stays to do, and the report publishes under its own name."""
    shipped = le.ship(experiment, tmp_path / "models")
    out = tmp_path / "out"

    def run(folder: Path, *args: str) -> int:
        return le.main(["--data", str(DATA), "--models", str(shipped), "--out", str(folder), "--reduced", *args])

    assert run(out, "--stages", "synthetic,segmenters,report", "--rows", "synthetic-uncertainty", "--seeds", "0") == 0
    assert (out / "generator" / "stylegan2.pt").read_bytes() == (shipped / "stylegan2.pt").read_bytes()
    assert (out / "synthetic" / "uncertainty" / "done.json").is_file() and not (out / "synthetic" / "random").exists()
    assert not (out / "synthetic" / "done.json").exists()  # the random set is still to do
    for kind in ("images", "labels"):
        made = sorted((out / "synthetic" / "uncertainty" / "pairs" / kind).glob("seed*.nii.gz"))
        before = sorted((experiment / "synthetic" / "uncertainty" / "pairs" / kind).glob("seed*.nii.gz"))
        assert [f.name for f in made] == [f.name for f in before] and len(made) == le.Sizes.reduced().pairs
        a, b = (np.stack([read_image(f).array for f in files]) for files in (made, before))
        if kind == "images":
            np.testing.assert_allclose(a, b, atol=1e-3)
        else:
            assert (a == b).mean() > 0.99
    assert sorted(p.name for p in (out / "segmenters").iterdir() if p.is_dir()) == ["synthetic-uncertainty.unet.seed0"]
    results = json.loads((out / "report" / "results.json").read_text())
    assert results["models"] == str(shipped) and set(results["table_iii"]) == {"unet"} and not results["table"]
    assert (out / "report" / "results.md").read_text().startswith(f"# Label efficiency on OpenKBP, from {shipped}")
    with pytest.raises(SystemExit, match="need it synthesized first"):
        run(tmp_path / "other", "--stages", "segmenters", "--rows", "synthetic-random")
    (shipped / "datasetgan.pt").write_bytes((shipped / "datasetgan.pt").read_bytes()[:-1] + b"x")
    with pytest.raises(SystemExit, match="SHA-256"):
        run(out, "--stages", "report")
    hash_path(shipped / "datasetgan.pt").write_text(f"{sha256_of(shipped / 'datasetgan.pt')}  datasetgan.pt\n")
    with pytest.raises(SystemExit, match="another model"):  # checked, but not the model this run folder was built on
        run(out, "--stages", "report")


def test_the_real_rows_train_before_any_generator_exists(tmp_path):
    """`--rows real-30`: those segmenters train and are scored; the stage stays open for the rows that need the GAN,
    which refuse to start before the synthetic stage has finished."""
    out = tmp_path / "out"
    args = ["--data", str(DATA), "--out", str(out), "--reduced", "--stages", "segmenters", "--rows", "real-30"]
    assert le.main(args) == 0
    runs = sorted(p.name for p in (out / "segmenters").iterdir() if p.is_dir())
    assert runs == [f"real-30.unetpp.seed{s}" for s in range(le.Sizes.reduced().seeds)]
    ev = json.loads((out / "segmenters" / runs[0] / "eval.json").read_text())
    assert ev["row"] == "real-30" and 0.0 <= ev["validation"]["mean_dice"] <= 1.0
    assert not (out / "segmenters" / "done.json").exists()
    assert json.loads((out / "segmenters" / "cpu.json").read_text())["cpu_seconds"] > 0
    with pytest.raises(SystemExit, match="real-3"):
        le.main([*args[:-1], "real-3"])
    with pytest.raises(SystemExit, match="need it synthesized first"):  # never a half-written synthetic set
        le.main([*args[:-1], "hybrid"])


def test_two_runs_sharing_a_row_train_each_segmenter_once(tmp_path, capsys):
    """A segmenter another process is training (its run lock held) is skipped, not trained twice; once free, the
    next run trains it."""
    import fcntl

    out = tmp_path / "out"
    args = ["--data", str(DATA), "--out", str(out), "--reduced", "--stages", "segmenters", "--rows", "real-30"]
    held = out / "segmenters" / "real-30.unetpp.seed0"
    held.mkdir(parents=True)
    with open(held / "run.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # "another process" holds seed 0
        assert le.main(args) == 0
        assert "real-30.unetpp.seed0 is being trained by another process" in capsys.readouterr().err
        assert not (held / "eval.json").exists() and not any(held.glob("*.pt"))
        assert (out / "segmenters" / "real-30.unetpp.seed1" / "eval.json").is_file()
    assert le.main(args) == 0
    assert json.loads((held / "eval.json").read_text())["row"] == "real-30"


def _add_cpu_many(folder: Path, n: int) -> None:
    for _ in range(n):
        le.add_cpu(folder, 1.0)


def test_two_runs_adding_to_one_stages_cpu_record_lose_nothing(tmp_path):
    """Two `--rows` runs of one stage add CPU seconds to one record at once: every addition counts."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_add_cpu_many, args=(tmp_path, 200)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert json.loads((tmp_path / "cpu.json").read_text())["cpu_seconds"] == pytest.approx(400.0)


def test_scores_count_only_patients_that_have_the_organ():
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[0, :2, :2] = 1  # brainstem: 4 voxels
    pred = np.zeros_like(truth)
    pred[0, :2, :1] = 1  # 2 of them found
    pred[1, :, :] = 2  # spinal cord everywhere: not contoured for this patient, so not scored
    one = le.volume_scores(pred, truth, present=(1,))
    assert one == {1: {"tp": 2, "fp": 0, "fn": 2}}
    both = truth.copy()
    both[1, 0, 0] = 2
    other = le.volume_scores(both, both, present=(1, 2))  # a patient with both organs, found exactly
    summary = le.summarize({"a": one, "b": other})
    brainstem = summary["organs"]["brainstem"]
    assert brainstem["patients"] == 2
    assert brainstem["dice"] == pytest.approx(2 * 6 / (2 * 6 + 2))  # pooled: tp 2 + 4, fn 2
    assert brainstem["dice_patient_mean"] == pytest.approx((2 * 2 / 6 + 1.0) / 2)
    assert summary["organs"]["spinal cord"] == {"patients": 1, "dice": 1.0, "iou": 1.0, "dice_patient_mean": 1.0}
    assert set(summary["organs"]) == {"brainstem", "spinal cord"}
