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


# ---------------------------------------------------------------------------------------------- `run`: the protocol

ROWS = "real-3-aug,real-3,real-all,real-3-relabelled"


def _run(work: Path, protocol: Path, *extra: str) -> int:
    return le.main(
        [
            "run",
            "--openkbp",
            str(DATA),
            "--work",
            str(work),
            "--reduced",
            "--rows",
            ROWS,
            "--dev-split",
            str(work.parent / "dev_split.json"),
            "--protocol",
            str(protocol),
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory):
    """A reduced `run` on the bundled cases: choose on dev, refused test, freeze, then segmenters, test, report."""
    d = tmp_path_factory.mktemp("protocol")
    work, protocol = d / "work", d / "protocol.json"
    torch.set_num_threads(1)
    assert _run(work, protocol) == 0  # stops after choose: nothing trained for the test yet
    stopped = sorted(p.name for p in work.iterdir())
    with pytest.raises(SystemExit, match="not frozen"):
        _run(work, protocol, "--stages", "test")
    assert _run(work, protocol, "--freeze") == 0
    return work, protocol, stopped


def test_run_chooses_on_dev_then_refuses_test_until_frozen(protocol_run):
    work, protocol, stopped = protocol_run
    assert stopped == ["annotator", "choose"]  # the real rows need no generator, labels or synthetic set
    split = json.loads((work.parent / "dev_split.json").read_text())
    assert split["n"] == 1 and split["patients"] == 6  # round(6 * 26 / 170) = 1 train patient, by patient
    frozen = json.loads(protocol.read_text())
    assert frozen["frozen"] and frozen["choices"]["steps"] in (1, 2) and frozen["choices"]["augment"] == "nnunet2d"
    assert frozen["chosen_on"].startswith("dev split: 1 train patients")


def test_run_writes_per_patient_results_with_the_commit(protocol_run):
    work, _, _ = protocol_run
    results = json.loads((work / "report" / "label_efficiency.json").read_text())
    assert len(results["commit"]) >= 40 and results["reference"] == "real-3-aug"
    runs = {(r["row"], r["draw"], r["seed"]) for r in results["runs"]}
    assert runs == {(r, d, 0) for r in ("real-3-aug", "real-3", "real-3-relabelled") for d in (0, 1)} | {
        ("real-all", 0, 0)
    }
    annotator = results["stages"]["annotator"]
    assert annotator["gan_overlap"] == {"patients": 5, "of": 5, "gan_patients": 6}  # gan.sh saw every train patient
    relabelled = [r for r in results["runs"] if r["row"] == "real-3-relabelled"]
    plain = [r for r in results["runs"] if r["row"] == "real-3"]
    assert [r["real_slices"] for r in relabelled] == [r["real_slices"] for r in plain]  # same slices, new masks
    dev = set(results["dev"])
    for r in results["runs"]:
        assert len(r["per_patient"]) == 1  # reduced: one validation patient
        patient = next(iter(r["per_patient"].values()))
        assert 0 <= patient["dice"] <= 1 and set(patient["organs"]) <= set(le.openkbp.ORGANS.values())
        if r["row"] != "real-all":
            assert len(r["real_slices"]) == 3 and not {s.split(":")[0] for s in r["real_slices"]} & dev
    draws = [r["real_slices"] for r in results["runs"] if r["row"] == "real-3"]
    assert draws[0] != draws[1]  # two label draws
    assert (work / "report" / "table.md").read_text() == le.results_table(results)  # the table is the JSON's


def test_run_resumes_without_redoing_a_stage(protocol_run):
    work, protocol, _ = protocol_run
    before = {p: p.stat().st_mtime_ns for p in (work / "test").glob("*.json")}
    assert _run(work, protocol) == 0
    assert {p: p.stat().st_mtime_ns for p in (work / "test").glob("*.json")} == before  # test scored once


def test_publish_table_replaces_only_between_markers(tmp_path):
    md = tmp_path / "RESULTS.md"
    start, end = le.TABLE_MARKERS
    md.write_text(f"intro\n{start}\nold\n{end}\noutro\n")
    le.publish_table("| new |\n", md)
    assert md.read_text() == f"intro\n{start}\n| new |\n{end}\noutro\n"
    md.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        le.publish_table("| new |\n", md)


def test_dev_split_is_fixed_and_checked(tmp_path):
    names = [f"train_pt_{i}" for i in range(170)]
    split = le.make_dev_split(names)
    assert split["n"] == 26 and split == le.make_dev_split(list(reversed(names)))  # order-free, seeded
    path = tmp_path / "dev.json"
    assert le.dev_split(path, names) == split["dev"]
    with pytest.raises(SystemExit, match="not in this data"):
        le.dev_split(path, names[:10])


def test_patient_scores_average_the_contoured_organs_only():
    truth = np.zeros((1, 4, 4), np.uint8)
    truth[0, :2, :2] = 1  # brainstem: 4 voxels
    truth[0, 3, 3] = 2  # spinal cord: 1 voxel
    pred = np.zeros_like(truth)
    pred[0, :2, :1] = 1  # 2 of brainstem's 4: Dice 2*2/(2+4) = 2/3
    pred[0, 0, 3] = 7  # a mandible where none was contoured: not scored
    case = le.openkbp.Case("p", "validation", Path(), Path(), Path(), (1.0, 1.0, 2.5), (1, 2))
    s = le.patient_scores(pred, truth, case)
    assert s["organs"]["brainstem"]["dice"] == pytest.approx(2 / 3)
    assert s["organs"]["spinal cord"]["dice"] == 0.0 and np.isnan(s["organs"]["spinal cord"]["hd95"])
    assert s["dice"] == pytest.approx(1 / 3) and set(s["organs"]) == {"brainstem", "spinal cord"}


def test_fid_model_samples_at_the_synthesis_psi():
    torch.manual_seed(0)
    G = Generator(**KW).eval()
    z = torch.randn(2, KW["z_dim"])
    with torch.no_grad():
        assert torch.equal(le.Truncated(G, 0.7)(z), G(z, truncation_psi=0.7, noise_mode="const"))
        assert not torch.equal(le.Truncated(G, 0.7)(z), G(z, truncation_psi=1.0, noise_mode="const"))


def test_table_pairs_by_patient_and_draw_against_the_reference():
    def run(row, draw, dice):
        return {
            "row": row,
            "draw": draw,
            "seed": 0,
            "per_patient": {p: {"dice": d, "hd95": 1.0} for p, d in dice.items()},
        }

    ref = [run("ref", 0, {"a": 0.1, "b": 0.2, "c": 0.3}), run("ref", 1, {"a": 0.3, "b": 0.4, "c": 0.5})]
    drawn = [run("x", 0, {"a": 0.2, "b": 0.4, "c": 0.6}), run("x", 1, {"a": 0.4, "b": 0.6, "c": 0.8})]
    single = [run("y", 0, {"a": 0.3, "b": 0.4, "c": 0.5})]  # paired by patient with ref draw means 0.2, 0.3, 0.4
    table = le.results_table({"reference": "ref", "runs": ref + drawn + single})
    x = next(line for line in table.splitlines() if line.startswith("| x |"))
    y = next(line for line in table.splitlines() if line.startswith("| y |"))
    assert "| 2 (2 x 1) | 0.500 +- 0.141 |" in x and "+0.200 (n=6)" in x  # (0.4 + 0.6) / 2; sd of 0.4, 0.6
    assert "+0.100 (n=3)" in y
