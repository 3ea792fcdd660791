"""The label-efficiency protocol (`benchmarks/label_efficiency.py run`) reduced to tiny sizes on the bundled OpenKBP
cases: a tiny generator, the annotator, both label sets (random seeds; a real server loop for the uncertainty set),
both synthetic sets, choices on the dev split, the freeze, the locked test, workers, per-patient results and the
table's statistics.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from labelfactory.io import read_image
from labelfactory.stylegan2.checkpoint import publish_generator
from labelfactory.stylegan2.networks import Generator

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "sample-data" / "openkbp" / "cases"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("label_efficiency", REPO / "benchmarks" / "label_efficiency.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["label_efficiency"] = module
    spec.loader.exec_module(module)
    return module


le = _load_benchmark()
SIZE = le.RunSizes.reduced().size
# a generator trained on nothing, at the reduced crop size
KW = dict(z_dim=32, w_dim=32, img_resolution=SIZE, channel_base=512, channel_max=32, mapping_layers=2)
# every kind of row: real (plain, augmented, all, relabelled, Mean Teacher), synthetic (random set), hybrid
# (uncertainty set: the server loop)
ROWS = "real-3-aug,real-3,real-all,real-3-relabelled,real-3-mean-teacher,synthetic-random-3,hybrid-share-uncertainty"
N_UNITS = 5 * 2 + 2  # drawn rows x 2 draws + real-all + synthetic-random-3


def _run(work: Path, protocol: Path, *extra: str) -> int:
    return le.main(["run", *_args(work, protocol, *extra)])


def _args(work: Path, protocol: Path, *extra: str) -> list[str]:
    return [
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


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory):
    """A reduced `run` on the bundled cases: generator, annotator, labels, synthetic sets, choose on dev, refused test,
    freeze, then segmenters, test and report by two workers one after the other (each takes every other segmenter)."""
    d = tmp_path_factory.mktemp("protocol")
    work, protocol = d / "work", d / "protocol.json"
    torch.manual_seed(0)
    window = {"window_hu": [le.openkbp.WINDOW.low, le.openkbp.WINDOW.high]}
    publish_generator(Generator(**KW).eval(), KW, d / "stylegan2.pt", config={"tiny": True}, data=window, kimg=0.0)
    torch.set_num_threads(1)
    assert _run(work, protocol, "--generator", str(d / "stylegan2.pt")) == 0  # stops after choose
    stopped = sorted(p.name for p in work.iterdir())
    with pytest.raises(SystemExit, match="not frozen"):
        _run(work, protocol, "--stages", "test")
    assert _run(work, protocol, "--freeze", "--worker", "1/2") == 0
    first = sorted(p.name for p in (work / "segmenters").iterdir() if (p / "data.json").is_file())
    assert not (work / "segmenters" / "done.json").is_file()  # half the segmenters: the stage is not done
    assert _run(work, protocol, "--worker", "2/2") == 0
    assert (work / "segmenters" / "done.json").is_file() and (work / "test" / "done.json").is_file()
    return work, protocol, stopped, first


def test_run_chooses_on_dev_then_refuses_test_until_frozen(protocol_run):
    work, protocol, stopped, _ = protocol_run
    assert stopped == ["annotator", "choose", "generator", "labels", "synthetic"]  # nothing trained for the test
    split = json.loads((work.parent / "dev_split.json").read_text())
    assert split["n"] == 1 and split["patients"] == 6  # round(6 * 26 / 170) = 1 train patient, by patient
    frozen = json.loads(protocol.read_text())
    assert frozen["frozen"] and frozen["choices"]["steps"] in (1, 2) and frozen["choices"]["augment"] == "nnunet2d"
    assert frozen["choices"]["consistency"] == 1.0  # the Mean Teacher's weight, from its (reduced) grid
    assert frozen["choices"]["real_share"] == 0.5 and frozen["choices"]["explore"] == le.FactorySizes().explore
    assert frozen["chosen_on"].startswith("dev split: 1 train patients")


def test_the_labels_and_synthetic_stages_make_both_sets(protocol_run):
    """Random set: `annotations` seed files; uncertainty set: as many records in the server loop's datastore; per
    set an interpreter trained on them under OpenKBP's label names and `pairs` kept pairs of the crop size."""
    from labelfactory.checkpoints import load_checkpoint
    from labelfactory.datasetgan.labeller import KIND

    work = protocol_run[0]
    n, pairs = le.RunSizes.reduced().annotations, le.FactorySizes.reduced().pairs
    assert len(list((work / "labels" / "random").glob("seed*.nii.gz"))) == n
    assert len(le.datastore_records(work / "labels" / "uncertainty" / "datastore")) == n
    labels = json.loads((work / "labels" / "done.json").read_text())["result"]
    assert labels["uncertainty"]["count"] == n and labels["pending"] == []
    for name in le.SETS:
        interp = load_checkpoint(work / "synthetic" / name / "datasetgan.pt", KIND)
        assert interp["config"]["label_names"] == le.LABEL_NAMES and interp["data"]["count"] == n
        assert interp["data"]["selection"] == name
        folder = work / "synthetic" / name / "pairs"
        images = sorted((folder / "images").glob("seed*.nii.gz"))
        seeds = {int(f.name.removeprefix("seed").removesuffix(".nii.gz")) for f in images}
        assert len(seeds) == pairs and seeds <= set(range(le.SYNTH_SEED0, le.SYNTH_SEED0 + 7))  # ceil(6 / 0.9) seeds
        mask = read_image(folder / "labels" / images[0].name).array
        assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= set(le.LABEL_NAMES.values())
    assert (work / "synthetic" / "pairs.png").is_file()


def test_the_synthetic_rows_train_on_their_set_the_hybrid_beside_its_drawn_real_slices(protocol_run):
    work = protocol_run[0]
    pairs = le.FactorySizes.reduced().pairs

    def data(unit: str) -> dict:
        return json.loads((work / "segmenters" / unit / "data.json").read_text())

    synthetic, hybrid, real = (
        data(f"{r}.draw0.seed0") for r in ("synthetic-random-3", "hybrid-share-uncertainty", "real-3")
    )
    assert synthetic["synthetic"]["pairs"] == pairs and "real_slices" not in synthetic
    assert Path(synthetic["synthetic"]["synthetic"]) == work / "synthetic" / "random" / "pairs"
    assert Path(hybrid["synthetic"]["synthetic"]) == work / "synthetic" / "uncertainty" / "pairs"
    assert hybrid["synthetic"]["pairs"] == pairs and hybrid["recipe"]["real_share"] == 0.5
    assert hybrid["real_slices"] == real["real_slices"]  # draw 0 of the same 3 real slices


def test_run_writes_per_patient_results_with_the_commit(protocol_run):
    work, _, _, _ = protocol_run
    results = json.loads((work / "report" / "label_efficiency.json").read_text())
    assert len(results["commit"]) >= 40 and results["reference"] == "real-3-aug"
    runs = {(r["row"], r["draw"], r["seed"]) for r in results["runs"]}
    drawn = ("real-3-aug", "real-3", "real-3-relabelled", "real-3-mean-teacher", "hybrid-share-uncertainty")
    undrawn = {("real-all", 0, 0), ("synthetic-random-3", 0, 0)}
    assert runs == {(r, d, 0) for r in drawn for d in (0, 1)} | undrawn
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
        if r["row"] in drawn:
            assert len(r["real_slices"]) == 3 and not {s.split(":")[0] for s in r["real_slices"]} & dev
    draws = [r["real_slices"] for r in results["runs"] if r["row"] == "real-3"]
    assert draws[0] != draws[1]  # two label draws
    assert (work / "report" / "table.md").read_text() == le.results_table(results)  # the table is the JSON's


def test_run_resumes_without_redoing_a_stage(protocol_run, monkeypatch, capsys):
    """A rerun skips every finished stage (none of them is entered) and scores no segmenter again."""
    work, protocol, _, _ = protocol_run

    def never(self, folder):
        raise AssertionError("a finished stage ran again")

    done = ("generator", "annotator", "labels", "synthetic", "choose")
    for stage in done:
        monkeypatch.setattr(le.Run, f"stage_{stage}", never)
    before = {p: p.stat().st_mtime_ns for p in (work / "test").glob("*.draw*.json")}
    assert len(before) == N_UNITS
    assert _run(work, protocol) == 0
    assert {p: p.stat().st_mtime_ns for p in (work / "test").glob("*.draw*.json")} == before  # test scored once
    assert capsys.readouterr().err.count("skipped") == len(done)


def test_workers_split_the_segmenters_and_sizes_stay_frozen(protocol_run):
    work, protocol, _, first = protocol_run
    units = [le.unit_name(*u) for u in le.Run(le.parse_run_args(_args(work, protocol))).units()]
    assert first == sorted(units[0::2])  # worker 1/2: the 1st, 3rd, ... segmenter; worker 2/2 the rest
    rows = ROWS.split(",")
    assert units[: len(rows)] == [f"{r}.draw0.seed0" for r in rows]  # round 0: every row before any draw 1
    assert json.loads(protocol.read_text())["sizes"]["draws"] == 2
    with pytest.raises(SystemExit, match=r"sizes \['draws'\] differ"):
        _run(work, protocol, "--draws", "3")


def test_the_real_rows_run_before_any_generator_exists(tmp_path):
    """Real rows need no generator, annotator, labels or synthetic set: their dev trial trains and is scored with
    none of them; a row on a synthetic set refuses to train before that set is whole."""
    work, protocol = tmp_path / "work", tmp_path / "protocol.json"
    assert _run(work, protocol, "--rows", "real-3", "--steps-grid", "1") == 0
    assert sorted(p.name for p in work.iterdir()) == ["choose"]
    dice = json.loads((work / "choose" / "done.json").read_text())["result"]["dev_mean_dice"]
    assert list(dice) == ["steps=1"] and 0 <= dice["steps=1"] <= 1
    run = le.Run(le.parse_run_args(_args(work, protocol, "--rows", "synthetic-random-3")))
    (work / "synthetic" / "random" / "pairs" / "images").mkdir(parents=True)  # being written: no done.json yet
    with pytest.raises(SystemExit, match="synthesized first"):
        run.training_pairs(run.rows[0], 0)


def test_run_is_the_default_command(tmp_path):
    """`label_efficiency.py ARGS` is `label_efficiency.py run ARGS` (here both refuse the report before the freeze)."""
    args = _args(tmp_path / "work", tmp_path / "protocol.json", "--rows", "real-3", "--stages", "report")
    for argv in (args, ["run", *args]):
        with pytest.raises(SystemExit, match="stage report refused: the protocol .* is not frozen"):
            le.main(argv)


def test_units_come_in_rounds_with_seeds_for_the_undrawn_rows(tmp_path):
    args = le.parse_run_args(_args(tmp_path / "work", tmp_path / "protocol.json", "--rows", "real-3,real-all"))
    args.draws, args.seeds, args.undrawn_seeds = 3, 1, 2
    names = [le.unit_name(*u) for u in le.Run(args).units()]
    assert names == [
        "real-3.draw0.seed0",
        "real-all.draw0.seed0",
        "real-3.draw1.seed0",
        "real-all.draw0.seed1",
        "real-3.draw2.seed0",
    ]


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


def test_a_trial_another_process_trains_is_left_to_it_and_waited_for(tmp_path, monkeypatch):
    """Two `choose` processes share the dev trials: one held by another process is skipped, then awaited."""
    import fcntl
    import threading

    run = le.Run(le.parse_run_args(_args(tmp_path / "work", tmp_path / "protocol.json")))
    calls = []
    monkeypatch.setattr(run, "dev_trial", lambda d, row, steps, **extra: calls.append(d.name) or float(steps))
    folders = [tmp_path / "a", tmp_path / "b"]
    folders[0].mkdir()
    held = open(folders[0] / "trial.lock", "a")  # held across the call, closed (released) by the timer
    fcntl.flock(held, fcntl.LOCK_EX)
    threading.Timer(0.5, held.close).start()
    row = le.Row("r", real=3)
    out = run.dev_trials([("a", folders[0], row, 1, {}), ("b", folders[1], row, 2, {})])
    assert calls == ["b", "a"] and out == {"a": 1.0, "b": 2.0}  # b first; a once its lock was free; keys in order


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


def test_a_fresh_machine_resumes_from_the_kept_folder_without_retraining(protocol_run, tmp_path):
    work, protocol, _, _ = protocol_run
    keep = tmp_path / "kept"
    assert _run(work, protocol, "--keep", str(keep)) == 0  # every stage done: only carried into the kept folder
    assert (keep / "annotator" / "segmentation.pt").is_file() and (keep / "choose" / "done.json").is_file()
    assert not list((keep / "segmenters").glob("*/segmentation.pt"))  # final weights stay behind: scores go
    scores = sorted(p.name for p in (work / "test").glob("*.draw*.json"))
    assert sorted(p.name for p in (keep / "test").glob("*.json") if p.name != "cpu.json") == scores

    fresh = tmp_path / "fresh" / "work"
    fresh.parent.mkdir(parents=True)
    (fresh.parent / "dev_split.json").write_text((work.parent / "dev_split.json").read_text())
    assert le.main(["run", *_args(fresh, protocol, "--keep", str(keep))]) == 0
    assert not list((fresh / "segmenters").glob("*/segmentation.pt"))  # every unit scored: none retrained
    before = json.loads((work / "report" / "label_efficiency.json").read_text())["runs"]
    after = json.loads((fresh / "report" / "label_efficiency.json").read_text())["runs"]
    assert [(r["row"], r["draw"], r["seed"], r["per_patient"]) for r in after] == [
        (r["row"], r["draw"], r["seed"], r["per_patient"]) for r in before
    ]


def test_the_kept_folder_holds_the_shared_pretraining_but_no_final_weights(tmp_path):
    work, keep = tmp_path / "work", tmp_path / "kept"
    files = ("pretrain.random.nnunet2d.2steps.seed0/segmentation.pt", "real-3-aug.draw0.seed0/segmentation.pt")
    for name in (*files, "cpu.json"):
        (work / "segmenters" / name).parent.mkdir(parents=True, exist_ok=True)
        (work / "segmenters" / name).write_bytes(name.encode())
    assert le.keep_files(work, keep, "segmenters") == 2
    assert sorted(str(p.relative_to(keep)) for p in keep.rglob("*") if p.is_file()) == [
        "segmenters/cpu.json",
        f"segmenters/{files[0]}",
    ]
    assert le.keep_files(work, keep, "segmenters") == 0  # unchanged files are not copied again
    fresh = tmp_path / "fresh"
    assert le.restore_kept(keep, fresh) == 2 and (fresh / "segmenters" / files[0]).read_bytes() == files[0].encode()
