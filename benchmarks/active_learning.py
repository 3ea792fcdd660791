"""Active-learning strategies against random picks, by label-set draw (issue 23 item 5): the loop simulated in-process.

A unit is one strategy on one draw d. Its label set grows one generated image at a time: image n is `pick`ed
(`labelfactory.tasks.active_learning.pick`, the function the server's `generated_uncertain` calls) among the K
candidate seeds of window n, labelled by the stand-in annotator (a segmentation model, `ModelAnnotator`, on the
generated image exactly as `labelfactory annotate` sees it), and every `retrain_every` labels the interpreter is
refitted on the labels so far (`fit_interpreter`, the app's default `DatasetGANConfig`, as the server's loop of
docs/RESULTS.md section 0a did). The fit after the last label is the unit's interpreter, scored against the
annotator on `held_out` generated seeds disjoint from every window: Dice per organ pooled over those images, their
mean (the endpoint), and the organs no label holds.

Strategies (`STRATEGIES`): `random` (explore 1: every image is its window's first seed, a random latent; no
intermediate fit is needed), `uncertainty` (explore 2, the app's default), `uncertainty-pure` (explore 0),
`coverage` (rule coverage, explore 2: the rarest predicted organs; an ensemble never taught an organ never draws
it, so coverage needs the random picks as much as uncertainty does, and explore 2 keeps its random picks those of
`uncertainty`). Pairing: draw d fixes the windows (image n of draw d chooses among seeds CANDIDATE_SEED0 +
d * DRAW_STRIDE + (n - 1) K ...), so every strategy of a draw starts from the same `retrain_every` random labels
and shares its explore picks with `random`'s picks at the same n; the interpreter's own seed is the app's (0).

Each unit writes WORK/units/<strategy>-d<draw>.json and is skipped on a rerun; a unit in progress keeps its picks
and latest interpreter (<unit>.partial.json, <unit>.interp.pt) after every fit and resumes from them. Every run
then reads all units in WORK and writes the study: per strategy the mean Dice over draws (mean, sample SD, 95% t
interval), per organ and organs never labelled; paired t and Wilcoxon against `random` over the draws both hold,
Holm-corrected over the strategies (`labelfactory.evaluation.statistics`); the CPU seconds per unit and the commit.
One torch thread; `--worker K/N` takes every N-th unit (draw-major order) from the K-th, so N processes share it.

    .venv/bin/python benchmarks/active_learning.py --work /work/runs/active-learning --draws 0-4
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from labelfactory.annotator_model import ModelAnnotator
from labelfactory.datasetgan.labeller import Interpreter, load_interpreter
from labelfactory.datasetgan.records import LatentRecord
from labelfactory.datasetgan.taps import ws_from_seeds
from labelfactory.datasetgan.train import DatasetGANConfig, fit_interpreter
from labelfactory.evaluation.statistics import holm, paired_test, summary
from labelfactory.jsonio import read_json, write_json_atomic
from labelfactory.latent_record import TRUNCATION_PSI
from labelfactory.stylegan2.checkpoint import load_generator
from labelfactory.stylegan2.identity import generated_to_image, generator_window, parse_seeds, seed_name
from labelfactory.tasks.active_learning import CANDIDATES, EXPLORE, organ_counts, pick

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interpreter_budget import masks_and_scores  # the same scoring as the interpreter-budget study
from label_efficiency import REPO, git_commit, worker

MODELS = REPO / "sample-data" / "openkbp" / "models"
HELD_OUT_SEED0 = 900_000  # held-out seeds: HELD_OUT_SEED0 ... + held_out - 1
CANDIDATE_SEED0 = 1_000_000  # draw d's windows start at CANDIDATE_SEED0 + d * DRAW_STRIDE
DRAW_STRIDE = 100_000  # seeds per draw (>= budget x candidates), so no two draws or held-out seeds share a seed


@dataclass(frozen=True)
class Strategy:
    """A way to pick: `pick`'s rule and explore (1: every image random)."""

    rule: str
    explore: int

    @property
    def fits_along(self) -> bool:
        """Whether its picks read the interpreter (all but explore 1), so it needs the fits before the last."""
        return self.explore != 1


STRATEGIES = {  # in the order a draw runs them: the baseline, the new rule, the app's default, pure uncertainty
    "random": Strategy("uncertainty", 1),
    "coverage": Strategy("coverage", EXPLORE),
    "uncertainty": Strategy("uncertainty", EXPLORE),
    "uncertainty-pure": Strategy("uncertainty", 0),
}


@dataclass(frozen=True)
class Sizes:
    """Every size of the study; `reduced()` gives the test's."""

    budget: int = 30  # labelled images per set
    retrain_every: int = 5  # labels between interpreter fits (the label-efficiency server loop's)
    candidates: int = CANDIDATES  # K seeds per window (the app's default)
    held_out: int = 200  # generated seeds the final interpreter is scored on
    truncation_psi: float = TRUNCATION_PSI
    config: DatasetGANConfig = field(default_factory=DatasetGANConfig)  # every fit's (the app's default)

    @classmethod
    def reduced(cls) -> Sizes:
        tiny = DatasetGANConfig(members=2, hidden=(16, 16), max_epochs=1, pixels_per_image=64)
        return cls(budget=4, retrain_every=2, candidates=4, held_out=4, config=tiny)

    def to_dict(self) -> dict:
        return {**asdict(self), "config": self.config.to_dict()}


class Lab:
    """The generator, the annotator and the held-out records one process shares between its units."""

    def __init__(self, generator: Path, annotator: Path, sizes: Sizes):
        self.G = load_generator(generator)
        self.annotator = ModelAnnotator(annotator)
        self.names = self.annotator.label_names
        self.sizes = sizes
        self.held_out = self.annotate(list(range(HELD_OUT_SEED0, HELD_OUT_SEED0 + sizes.held_out)))

    def window(self, draw: int, n: int) -> list[int]:
        """The K candidate seeds of image n (1-based) of draw `draw`."""
        k = self.sizes.candidates
        first = CANDIDATE_SEED0 + draw * DRAW_STRIDE + (n - 1) * k
        return list(range(first, first + k))

    @torch.no_grad()
    def annotate(self, seeds: list[int]) -> list[LatentRecord]:
        """The annotator's (R, R) int64 masks of the generated images of `seeds` (psi `truncation_psi`)."""
        psi, records = self.sizes.truncation_psi, []
        for i in range(0, len(seeds), 16):
            ws = ws_from_seeds(self.G, seeds[i : i + 16], psi)
            images = self.G.synthesis(ws, noise_mode="const")
            for seed, w, img in zip(seeds[i : i + 16], ws[:, 0].cpu(), images, strict=True):
                mask = self.annotator(generated_to_image(img, generator_window(self.G))).astype(np.int64)
                records.append(LatentRecord(w, mask, seed_name(seed), seed, psi))
        return records

    def fit(self, records: list[LatentRecord], out: Path) -> Interpreter:
        """The app's recipe on `records`, written to `out` (a resumed unit reloads it)."""
        done = fit_interpreter(self.G, records, self.names, self.sizes.config, out)
        return Interpreter(self.G, done.ensemble, self.names)

    def score(self, interp: Interpreter, records: list[LatentRecord]) -> dict:
        """Dice per organ on the held-out images (pooled), their mean, and the organs the label set lacks."""
        _, scored = masks_and_scores(interp, self.held_out, self.names)
        held = organ_counts(r.mask for r in records)
        organs = [n for n, v in self.names.items() if v]
        return {
            "mean_dice": scored["mean_dice"],
            "dice": {n: scored["dice"][n] for n in organs},
            "images_per_organ": {n: held[self.names[n]] for n in organs},
            "organs_never_labelled": [n for n in organs if not held[self.names[n]]],
        }


def run_unit(lab: Lab, name: str, draw: int, folder: Path) -> dict:
    """One strategy on one draw: the label set, its fits and the last fit's scores; resumes from the last fit."""
    strategy, budget, every = STRATEGIES[name], lab.sizes.budget, lab.sizes.retrain_every
    unit = f"{name}-d{draw}"
    partial, interp_file = folder / f"{unit}.partial.json", folder / f"{unit}.interp.pt"
    state = read_json(partial, {"picks": [], "fit_cpu_s": [], "cpu_s": 0.0})
    records = lab.annotate([p["seed"] for p in state["picks"]])
    interp = load_interpreter(interp_file, lab.G) if state["picks"] and strategy.fits_along else None
    t0 = time.process_time()
    for n in range(len(records) + 1, budget + 1):
        seeds = lab.window(draw, n)
        ws = ws_from_seeds(lab.G, seeds, lab.sizes.truncation_psi)
        chosen = pick(ws, interp, organ_counts(r.mask for r in records), n, strategy.explore, strategy.rule)
        records += lab.annotate([seeds[chosen.index]])
        state["picks"].append(
            {"n": n, "seed": seeds[chosen.index], "picked": chosen.why, "uncertainty": chosen.uncertainty}
        )
        if n == budget or (strategy.fits_along and n % every == 0):
            t_fit = time.process_time()
            interp = lab.fit(records, interp_file)
            state["fit_cpu_s"].append(time.process_time() - t_fit)
            if n < budget:
                write_json_atomic({**state, "cpu_s": state["cpu_s"] + time.process_time() - t0}, partial)
            print(f"  {unit}: fit on {n} labels, {state['fit_cpu_s'][-1]:.0f} CPU-s", flush=True)
    scored = lab.score(interp, records)
    cpu = state["cpu_s"] + time.process_time() - t0
    return {"strategy": name, "draw": draw, **asdict(strategy), **scored, **state, "cpu_s": cpu}


def study(units: list[dict], names: list[str]) -> dict:
    """Per strategy: mean Dice over draws (summary), per organ, organs never labelled, CPU-s; paired tests vs
    random over the draws both hold, Holm-corrected over the strategies (t and Wilcoxon separately)."""
    by = {s: {u["draw"]: u for u in units if u["strategy"] == s} for s in names}
    rows = {}
    for s, got in by.items():
        draws = sorted(got)
        organs = list(got[draws[0]]["dice"]) if draws else []
        rows[s] = {
            "draws": draws,
            "mean_dice": summary([got[d]["mean_dice"] for d in draws]),
            "mean_dice_by_draw": [got[d]["mean_dice"] for d in draws],
            "dice": {o: summary([got[d]["dice"][o] for d in draws])["mean"] for o in organs},
            "organs_never_labelled": summary([len(got[d]["organs_never_labelled"]) for d in draws])["mean"],
            "cpu_s_per_unit": summary([got[d]["cpu_s"] for d in draws])["mean"],
        }
    others = [s for s in names if s != "random" and "random" in by]
    for s in others:
        common = sorted(set(by[s]) & set(by["random"]))
        rows[s]["vs_random"] = paired_test(
            [by[s][d]["mean_dice"] for d in common], [by["random"][d]["mean_dice"] for d in common]
        )
    for test in ("t_p", "wilcoxon_p"):
        adjusted = holm([rows[s]["vs_random"][test] for s in others])
        for s, p in zip(others, adjusted, strict=True):
            rows[s]["vs_random"][f"{test}_holm"] = p
    return rows


def table(rows: dict) -> str:
    """The study as a markdown table."""
    lines = [
        "| strategy | draws | mean Dice (mean +- SD) | 95% CI | vs random (paired) | t p / Wilcoxon p (Holm) "
        "| organs never labelled | CPU-s per unit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s, r in rows.items():
        m, vs = r["mean_dice"], r.get("vs_random")
        diff = f"{vs['mean_diff']:+.3f} (n {vs['n']})" if vs else ""
        p = f"{vs['t_p_holm']:.3f} / {vs['wilcoxon_p_holm']:.3f}" if vs else ""
        lines.append(
            f"| {s} | {m['n']} | {m['mean']:.3f} +- {m['sd']:.3f} | {m['ci_t'][0]:.3f}..{m['ci_t'][1]:.3f} | {diff} "
            f"| {p} | {r['organs_never_labelled']:.1f} | {r['cpu_s_per_unit']:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generator", type=Path, default=MODELS / "stylegan2.pt")
    p.add_argument("--annotator-model", type=Path, default=MODELS / "segmentation.pt")
    p.add_argument("--work", type=Path, required=True, help="folder of the units (kept between runs)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated, of " + ", ".join(STRATEGIES))
    p.add_argument("--draws", default="0-4", help="label-set draws, e.g. 0-4 or 1,3")
    p.add_argument("--worker", type=worker, default=(1, 1), help="K/N: every N-th unit from the K-th (1-based)")
    p.add_argument("--reduced", action="store_true", help="the test's tiny sizes")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "active_learning.json")
    args = p.parse_args(argv)
    unknown = set(args.strategies.split(",")) - set(STRATEGIES)
    if unknown:
        p.error(f"--strategies: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(STRATEGIES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    sizes = Sizes.reduced() if args.reduced else Sizes()
    assert sizes.budget * sizes.candidates <= DRAW_STRIDE, "the draws' windows would overlap"
    names, draws = args.strategies.split(","), parse_seeds(args.draws)
    folder = args.work / "units"
    folder.mkdir(parents=True, exist_ok=True)
    identity = {"generator": str(args.generator), "annotator": str(args.annotator_model), "sizes": sizes.to_dict()}
    k, n = args.worker
    mine = [(s, d) for d in draws for s in names][k - 1 :: n]
    todo = [(s, d) for s, d in mine if not (folder / f"{s}-d{d}.json").is_file()]
    print(f"{len(todo)} of {len(mine)} units to run (worker {k}/{n})", flush=True)
    lab = Lab(args.generator, args.annotator_model, sizes) if todo else None
    for i, (s, d) in enumerate(todo):
        result = run_unit(lab, s, d, folder)
        write_json_atomic({**identity, **result, "commit": git_commit()}, folder / f"{s}-d{d}.json")
        for f in [folder / f"{s}-d{d}.partial.json", *folder.glob(f"{s}-d{d}.interp.*")]:  # .sha256, .previous.pt
            f.unlink(missing_ok=True)
        print(
            f"{s} draw {d}: mean Dice {result['mean_dice']:.3f}, organs never labelled "
            f"{result['organs_never_labelled'] or 'none'}; {result['cpu_s']:.0f} CPU-s "
            f"({len(todo) - i - 1} units left, ~{result['cpu_s'] * (len(todo) - i - 1) / 3600:.1f} CPU-h at this rate)",
            flush=True,
        )
    units = [read_json(f) for f in sorted(folder.glob("*-d*.json")) if not f.name.endswith(".partial.json")]
    stale = [f"{u['strategy']}-d{u['draw']}" for u in units if {key: u[key] for key in identity} != identity]
    if stale:
        raise SystemExit(f"units made with other models or sizes in {folder}: {', '.join(stale)}; use another --work")
    rows = study(units, [s for s in STRATEGIES if any(u["strategy"] == s for u in units)])
    print(table(rows))
    write_json_atomic({"commit": git_commit(), **identity, "strategies": rows, "units": units}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
