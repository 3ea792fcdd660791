"""The label-efficiency protocol (`benchmarks/label_efficiency.py run`) reduced to tiny sizes on the bundled OpenKBP
cases: choices on the dev split, the freeze, the locked test, workers, per-patient results and the table's statistics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_label_efficiency import DATA, le

ROWS = "real-3-aug,real-3,real-all,real-3-relabelled,real-3-mean-teacher"


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
    """A reduced `run` on the bundled cases: choose on dev, refused test, freeze, then segmenters, test and report
    by two workers one after the other (each takes every other segmenter)."""
    d = tmp_path_factory.mktemp("protocol")
    work, protocol = d / "work", d / "protocol.json"
    torch.set_num_threads(1)
    assert _run(work, protocol) == 0  # stops after choose: nothing trained for the test yet
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
    assert stopped == ["annotator", "choose"]  # the real rows need no generator, labels or synthetic set
    split = json.loads((work.parent / "dev_split.json").read_text())
    assert split["n"] == 1 and split["patients"] == 6  # round(6 * 26 / 170) = 1 train patient, by patient
    frozen = json.loads(protocol.read_text())
    assert frozen["frozen"] and frozen["choices"]["steps"] in (1, 2) and frozen["choices"]["augment"] == "nnunet2d"
    assert frozen["choices"]["consistency"] == 1.0  # the Mean Teacher's weight, from its (reduced) grid
    assert frozen["chosen_on"].startswith("dev split: 1 train patients")


def test_run_writes_per_patient_results_with_the_commit(protocol_run):
    work, _, _, _ = protocol_run
    results = json.loads((work / "report" / "label_efficiency.json").read_text())
    assert len(results["commit"]) >= 40 and results["reference"] == "real-3-aug"
    runs = {(r["row"], r["draw"], r["seed"]) for r in results["runs"]}
    drawn = ("real-3-aug", "real-3", "real-3-relabelled", "real-3-mean-teacher")
    assert runs == {(r, d, 0) for r in drawn for d in (0, 1)} | {("real-all", 0, 0)}
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
    work, protocol, _, _ = protocol_run
    before = {p: p.stat().st_mtime_ns for p in (work / "test").glob("*.draw*.json")}
    assert len(before) == 9  # 4 drawn rows x 2 draws + real-all
    assert _run(work, protocol) == 0
    assert {p: p.stat().st_mtime_ns for p in (work / "test").glob("*.draw*.json")} == before  # test scored once


def test_workers_split_the_segmenters_and_sizes_stay_frozen(protocol_run):
    work, protocol, _, first = protocol_run
    units = [le.unit_name(*u) for u in le.Run(le.parse_run_args(_args(work, protocol))).units()]
    assert first == sorted(units[0::2])  # worker 1/2: the 1st, 3rd, ... segmenter; worker 2/2 the rest
    assert units[:5] == [f"{r}.draw0.seed0" for r in ROWS.split(",")]  # round 0: every row before any draw 1
    assert json.loads(protocol.read_text())["sizes"]["draws"] == 2
    with pytest.raises(SystemExit, match=r"sizes \['draws'\] differ"):
        _run(work, protocol, "--draws", "3")


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
