"""The active-learning study (benchmarks/active_learning.py) at its reduced sizes: a tiny generator in OpenKBP's
window, the shipped OpenKBP segmenter as the annotator, 2 draws of the 4 strategies, 4 labels each.

One run (module fixture); then what it wrote, that the draws pair the strategies, that a rerun skips its units and
that a unit interrupted after a fit resumes to the same label set and scores.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from labelfactory.datasets import openkbp
from labelfactory.stylegan2.checkpoint import publish_generator
from labelfactory.stylegan2.networks import Generator

REPO = Path(__file__).resolve().parents[1]
ANNOTATOR = REPO / "sample-data" / "openkbp" / "models" / "segmentation.pt"
KW = dict(z_dim=32, w_dim=32, img_resolution=64, channel_base=512, channel_max=32, mapping_layers=2)


def _load_benchmark():
    path = REPO / "benchmarks" / "active_learning.py"
    spec = importlib.util.spec_from_file_location("active_learning_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


al = _load_benchmark()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(work folder, generator file, the JSON it wrote, units by name) of one reduced run."""
    d = tmp_path_factory.mktemp("active_learning")
    torch.manual_seed(0)
    window = {"window_hu": [openkbp.WINDOW.low, openkbp.WINDOW.high]}
    publish_generator(Generator(**KW).eval(), KW, d / "stylegan2.pt", config={"tiny": True}, data=window, kimg=0.0)
    args = ["--generator", str(d / "stylegan2.pt"), "--annotator-model", str(ANNOTATOR), "--work", str(d / "work")]
    assert al.main([*args, "--reduced", "--draws", "0-1", "--out", str(d / "out.json")]) == 0
    units = {f"{u['strategy']}-d{u['draw']}": u for u in json.loads((d / "out.json").read_text())["units"]}
    return d, args, json.loads((d / "out.json").read_text()), units


def test_the_study_holds_every_strategy_by_draw_with_paired_tests(study):
    _, _, out, units = study
    assert set(units) == {f"{s}-d{d}" for s in al.STRATEGIES for d in (0, 1)}
    assert sorted(f.name for f in (study[0] / "work" / "units").iterdir()) == sorted(f"{u}.json" for u in units)
    assert out["commit"] and out["sizes"]["budget"] == 4 and out["sizes"]["config"]["members"] == 2
    assert list(out["strategies"]) == list(al.STRATEGIES)
    for name, row in out["strategies"].items():
        by_draw = [units[f"{name}-d{d}"]["mean_dice"] for d in (0, 1)]
        assert row["draws"] == [0, 1] and row["mean_dice"]["mean"] == pytest.approx(sum(by_draw) / 2)
        assert set(row["dice"]) == {n for n in openkbp.ORGANS.values()}
        assert ("vs_random" in row) == (name != "random")
    vs = out["strategies"]["coverage"]["vs_random"]
    assert vs["n"] == 2 and {"t_p", "wilcoxon_p", "t_p_holm", "wilcoxon_p_holm"} <= set(vs)
    unit = units["coverage-d1"]
    assert len(unit["picks"]) == 4 and len(unit["fit_cpu_s"]) == 2 and unit["cpu_s"] > 0  # fits after labels 2, 4
    assert len(units["random-d1"]["fit_cpu_s"]) == 1  # random reads no interpreter: only the last fit
    assert unit["organs_never_labelled"] == [n for n, c in unit["images_per_organ"].items() if c == 0]


def test_a_draw_fixes_the_windows_and_the_random_picks(study):
    """Image n of draw d comes from window n of draw d, the same for every strategy; the first `retrain_every`
    picks (no interpreter yet) and the explore picks (even n at explore 2) are `random`'s seeds at that n."""
    _, _, _, units = study
    k = al.Sizes.reduced().candidates
    for d in (0, 1):
        random = [p["seed"] for p in units[f"random-d{d}"]["picks"]]
        assert random == [al.CANDIDATE_SEED0 + d * al.DRAW_STRIDE + (n - 1) * k for n in range(1, 5)]
        for name in ("uncertainty", "uncertainty-pure", "coverage"):
            picks = units[f"{name}-d{d}"]["picks"]
            for p in picks:
                assert 0 <= p["seed"] - random[p["n"] - 1] < k  # within window n
            shared = [n for n in range(1, 5) if n <= 2 or (units[f"{name}-d{d}"]["explore"] and n % 2 == 0)]
            assert all(picks[n - 1]["seed"] == random[n - 1] for n in shared), (name, d)
    assert units["coverage-d0"]["picks"][2]["picked"].startswith("coverage: ")
    assert al.HELD_OUT_SEED0 + al.Sizes().held_out <= al.CANDIDATE_SEED0


def test_a_rerun_skips_and_an_interrupted_unit_resumes_to_the_same_scores(study, capsys, monkeypatch):
    d, args, _, units = study
    assert al.main([*args, "--reduced", "--draws", "0-1", "--out", str(d / "again.json")]) == 0
    assert "0 of 8 units to run" in capsys.readouterr().out

    lab = al.Lab(Path(args[1]), ANNOTATOR, al.Sizes.reduced())
    folder = d / "interrupted"
    folder.mkdir()
    fit = al.Lab.fit

    def fit_once(self, records, out):
        if len(records) > 2:
            raise KeyboardInterrupt  # killed during the second fit
        return fit(self, records, out)

    monkeypatch.setattr(al.Lab, "fit", fit_once)
    with pytest.raises(KeyboardInterrupt):
        al.run_unit(lab, "uncertainty-pure", 0, folder)
    assert len(json.loads((folder / "uncertainty-pure-d0.partial.json").read_text())["picks"]) == 2
    monkeypatch.setattr(al.Lab, "fit", fit)
    resumed, whole = al.run_unit(lab, "uncertainty-pure", 0, folder), units["uncertainty-pure-d0"]
    assert resumed["picks"] == whole["picks"] and len(resumed["fit_cpu_s"]) == 2
    assert (resumed["mean_dice"], resumed["dice"]) == (whole["mean_dice"], whole["dice"])
