"""ClamNet's target rules against Grad-CAM, the floor and a supervised ceiling on two weak tasks of OpenKBP (issue 30).

Tasks (`labelfactory.clamnet.openkbp`): `parotid`, "this slice holds a parotid" -> the parotid map (the sanity task,
patients with both parotids contoured), and `ptv70`, "this slice holds PTV70" -> the PTV70 map (docs/RESULTS.md
section 6). Body crops, slice labels for the weak methods, pixel truth for the ceiling and for scoring only.
Methods: clamnet-self, clamnet-cam, clamnet-difference (ClamNetConfig.target), grad-cam, floor (the whole body
on every slice), supervised (UNet++ on the pixel truth), each `--steps` optimizer steps of batch `--batch`
(clamnet-cam's seed classifier is grad-cam's classifier, trained first: twice the steps in all); `--single-seed`
methods run on the first seed only (the floor needs no seed; the CPU may not afford the others). Every threshold
is chosen on the first `--threshold-patients` train patients (best pooled Dice); every figure is per validation
patient (its slices pooled): mean over patients of the seed-mean, 95% bootstrap interval over patients, and a
Wilcoxon signed-rank test of each ClamNet rule against grad-cam and the floor on the same patients. The ablation
behind the seeds (`evidence_within_slices`): does each evidence map rank the target's pixels above the rest of the
body within the abnormal slices, or does it only tell abnormal slices from normal ones?

    .venv/bin/python benchmarks/clamnet_weak.py --train-patients 20 --steps 200 --seeds 0 1 2
    .venv/bin/python benchmarks/clamnet_weak.py --reduced   # the bundled 10-patient sample, minutes: a smoke test

Writes `--out` (JSON, with the commit), its tables beside it (`.md`) and `--png` (validation slices, each method's
map over the truth outline).
Per-method records are cached under `--work/<task>/seed<k>/` so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import wilcoxon

from labelfactory.checkpoints import code_version
from labelfactory.clamnet.cam import CamConfig, cam_maps, class_activation_maps, train_classifier
from labelfactory.clamnet.data import WeakSlices, slice_levels
from labelfactory.clamnet.evaluate import pixel_auroc
from labelfactory.clamnet.experiment import FLOOR, Budget, describe, run_method
from labelfactory.clamnet.loss import label_targets
from labelfactory.clamnet.network import MARKER
from labelfactory.clamnet.openkbp import TARGETS, WeakTask, case_levels, load_weak_task, target_mask
from labelfactory.clamnet.report import task_picture
from labelfactory.clamnet.targets import difference_evidence
from labelfactory.datasets.openkbp import WINDOW, Case, read_cases
from labelfactory.io import read_image
from labelfactory.jsonio import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
OPENKBP = REPO.parent / "shared" / "datasets" / "openkbp"
SAMPLE_CASES = REPO / "sample-data" / "openkbp" / "cases"
METHODS = {  # name here -> name in labelfactory.clamnet.experiment
    "clamnet-self": "clamnet",
    "clamnet-cam": "clamnet_target_cam",
    "clamnet-difference": "clamnet_target_difference",
    "clamnet-level-self": "clamnet_level_self",
    "clamnet-level-difference": "clamnet_level_difference",
    "grad-cam": "gradcam",
    "floor": FLOOR,
    "supervised": "supervised",
}
RULES = ("clamnet-self", "clamnet-cam", "clamnet-difference", "clamnet-level-self", "clamnet-level-difference")
EVIDENCE = ("cam", "grad-cam", "difference", "difference-level", "intensity")
BOOTSTRAP = 2000
# the sanity tasks: ptv70's slices with add_synthetic_lesions as the label, task -> the disc's radius (px): 3 (about
# 1.5 % of the body crop's pixels), 6 (about 6 %, near the a-priori marker_fraction 0.1 of every rule)
SYNTHETIC = {"lesion": 3, "lesion6": 6}
LESION_LEVELS = (-60.0, -20.0)  # mm above the landmark: the oropharynx, where PTV70 is in ~95 % of the patients


def load(root: Path, task: WeakTask, train_patients: int, val_patients: int, cache: Path) -> dict[str, WeakSlices]:
    """{"train", "validation"} slices of the task, from `cache` when it holds these patients at this task."""
    train_cases = read_cases(root, "train")[: train_patients or None]
    val_cases = read_cases(root, "validation")[: val_patients or None]
    key = {"train": [c.name for c in train_cases], "validation": [c.name for c in val_cases], "task": asdict(task)}
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved["key"] == key:
            out = {k: WeakSlices(**saved[k]) for k in ("train", "validation")}
            by_name = {c.name: c for c in train_cases + val_cases}
            return {k: with_levels(v, by_name) for k, v in out.items()}  # caches older than WeakSlices.level
    out = {"train": load_weak_task(train_cases, task), "validation": load_weak_task(val_cases, task)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, **{k: vars(v) for k, v in out.items()}}, cache)
    return out


def with_levels(slices: WeakSlices, cases: dict[str, Case]) -> WeakSlices:
    """`slices` with `level` filled in where it is None (openkbp.case_levels, per study)."""
    if slices.level is not None:
        return slices
    level = torch.zeros(len(slices))
    studies = np.array(slices.study)
    for s in dict.fromkeys(slices.study):
        rows = torch.from_numpy(np.nonzero(studies == s)[0])
        level[rows] = case_levels(cases[s], slices.file_slice[rows])
    slices.level = level
    return slices


def presence_by_level(root: Path, task: WeakTask, cache: Path, bin_mm: float = 10.0) -> dict[str, Any]:
    """Does the label vary at a fixed level? Over every patient of the data set (both splits) with the target
    contoured: per `bin_mm` bin of level (openkbp.case_levels), patients with the target on a slice there and patients
    with body there but no target. Cached in `cache`."""
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    from labelfactory.clamnet.openkbp import has_target

    bins: dict[int, list[set[str]]] = {}
    for case in read_cases(root):
        if not has_target(case, task.target):
            continue
        image = read_image(case.ct)
        body = (image.array > -500).reshape(len(image.array), -1).any(1)
        present = target_mask(case, image, task.target).array.reshape(len(image.array), -1).any(1)
        z = torch.from_numpy(np.nonzero(body)[0])
        for zi, lv in zip(z.tolist(), case_levels(case, z).tolist(), strict=True):
            if np.isnan(lv):
                continue
            b = bins.setdefault(int(np.floor(lv / bin_mm)), [set(), set()])
            b[int(present[zi])].add(case.name)
    rows = [
        {"level_mm": [k * bin_mm, (k + 1) * bin_mm], "with": len(b[1]), "without": len(b[0] - b[1])}
        for k, b in sorted(bins.items())
    ]
    out = {"bin_mm": bin_mm, "rows": rows}
    torch.save(out, cache)
    return out


def interval(values: np.ndarray, seed: int = 0) -> list[float]:
    """95% bootstrap interval of the mean of `values` (one per patient)."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, (BOOTSTRAP, len(values))).mean(1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def per_patient_table(records: dict[int, dict[str, Any]], metric: str) -> dict[str, float]:
    """{patient: metric averaged over seeds} from {seed: run_method record}; patients with no value left out, and
    patients without the target (no abnormal slice: the synthetic tasks' patients without a lesion), as an organ is
    scored only on the patients that have it."""
    patients = next(iter(records.values()))["per_patient"]
    out = {}
    for p in patients:
        if not next(iter(records.values()))["per_patient"][p].get("abnormal_slices", 1):
            continue
        vals = [r["per_patient"][p][metric] for r in records.values() if r["per_patient"][p][metric] is not None]
        if vals:
            out[p] = float(np.mean(vals))
    return out


def summarise(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per method: mean of per-patient Dice / AUROC (seed-averaged), 95% interval, seed means; paired tests of each
    ClamNet rule against grad-cam and the floor (Wilcoxon on per-patient values)."""
    table: dict[str, Any] = {}
    for method, records in runs.items():
        row: dict[str, Any] = {"seeds": sorted(records), "thresholds": [r["threshold"] for r in records.values()]}
        for metric in ("dice", "auroc"):
            pp = per_patient_table(records, metric)
            values = np.array(list(pp.values()))
            seed_means = [
                float(np.mean([r["per_patient"][p][metric] for p in pp if r["per_patient"][p][metric] is not None]))
                for r in records.values()
            ]
            row[metric] = {
                "mean": float(values.mean()),
                "ci95": interval(values),
                "seed_means": seed_means,
                "per_patient": pp,
            }
        table[method] = row
    tests = {}
    for rule in (m for m in RULES if m in table):
        for other in (m for m in ("grad-cam", "floor") if m in table):
            for metric in ("dice", "auroc"):
                a, b = table[rule][metric]["per_patient"], table[other][metric]["per_patient"]
                common = sorted(set(a) & set(b))
                diff = np.array([a[p] - b[p] for p in common])
                p_value = float(wilcoxon(diff).pvalue) if len(diff) and np.any(diff != 0) else None
                tests[f"{rule} vs {other} {metric}"] = {
                    "mean_difference": float(diff.mean()) if len(diff) else None,
                    "wins": int((diff > 0).sum()),
                    "patients": len(diff),
                    "wilcoxon_p": p_value,
                }
    return {"methods": table, "paired": tests}


def run_task(task: WeakTask, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every method and seed on one task. Returns (the task's JSON record, what its picture needs)."""
    work = args.work / task.target
    if task.target in SYNTHETIC:  # the same crops as ptv70, a synthetic label
        base = replace(task, target="ptv70")
        data = load(args.root, base, args.train_patients, args.val_patients, args.work / "ptv70" / "slices.pt")
        radius = SYNTHETIC[task.target]
        data = {k: add_synthetic_lesions(v, seed, radius=radius) for seed, (k, v) in enumerate(data.items())}
    else:
        data = load(args.root, task, args.train_patients, args.val_patients, work / "slices.pt")
    train, evaluation = data["train"], data["validation"]
    names = list(dict.fromkeys(train.study))[: args.threshold_patients]
    threshold_set = train.subset(np.nonzero([s in names for s in train.study])[0])
    runs: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in args.methods}
    for seed in args.seeds:
        budget = Budget(
            steps=args.steps, batch=args.batch, seed=seed, marker_fraction=args.marker_fraction, picture_slices=3
        )
        (work / f"seed{seed}").mkdir(parents=True, exist_ok=True)
        for method in (m for m in args.methods if seed == args.seeds[0] or m not in args.single_seed):
            runs[method][seed] = run_method(
                METHODS[method], train, threshold_set, evaluation, budget, work / f"seed{seed}"
            )
    seed0 = work / f"seed{args.seeds[0]}"
    saved = {m: torch.load(seed0 / f"{METHODS[m]}.pt", weights_only=True) for m in args.methods}
    indices = saved[args.methods[0]]["indices"]
    picture = {
        "title": task.target,
        "x": evaluation.x[indices, 0],
        "truth": evaluation.truth[indices, 0],
        "names": [f"{evaluation.study[i]} z{int(evaluation.file_slice[i])}" for i in indices],
        "maps": {m: saved[m]["maps"] for m in args.methods},
        "thresholds": {m: runs[m][args.seeds[0]]["threshold"] for m in args.methods},
    }
    presence = None if task.target in SYNTHETIC else presence_by_level(args.root, task, work / "presence.pt")
    record = {
        "task": asdict(task),
        "presence_by_level": presence,
        "evidence": evidence_within_slices(train, evaluation, args.steps, args.seeds[0], presence),
        "data": {"train": describe(train), "threshold": describe(threshold_set), "validation": describe(evaluation)},
        "train_s": {m: [r["train_s"] for r in runs[m].values()] for m in args.methods},
        **summarise(runs),
    }
    return record, picture


def evidence_within_slices(
    train: WeakSlices, evaluation: WeakSlices, steps: int, seed: int, presence: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ablation behind the seeds: each evidence map's pixel AUROC over the body of all validation slices, and
    over the body of abnormal slices only (where the target is; 0.5 = it does not say where in the slice), with the
    classifier's slice accuracy. The classifier: grad-cam's (same steps, seed). `intensity`: the crop itself (does the
    target differ in brightness at all?). For the level-matched difference also: within abnormal slices at `mixed`
    levels only (bins of `presence` where 20-80 % of the patients lack the target: where level matching has normal
    slices to contrast with), the share of abnormal slices that found a level match, and `synthetic_lesion`: the same
    evidence on the same validation slices with a visible lesion (+100 HU disc, radius 3 px) put into every other
    patient's slices 20-60 mm below the landmark, at a random place in the body, as the label (does the rule find an
    abnormality that some patients have at a level and others have not, on real anatomy?)."""
    classifier = train_classifier(train, CamConfig(steps=steps, seed=seed))[0]
    with torch.no_grad():
        called = torch.cat([classifier(evaluation.x[i : i + 64])[:, 0] > 0 for i in range(0, len(evaluation), 64)])
    maps = {
        "cam": class_activation_maps(classifier, evaluation.x, evaluation.organ),
        "grad-cam": cam_maps(classifier, evaluation.x, evaluation.organ, batch=64),
        "difference": difference_evidence(evaluation)[:, 0],
        "difference-level": difference_evidence(evaluation, pairing="level")[:, 0],
        "intensity": evaluation.x[:, 0] * evaluation.organ[:, 0],
    }
    organ, truth, ab = evaluation.organ[:, 0] > 0.5, evaluation.truth[:, 0] > 0.5, evaluation.abnormal
    out: dict[str, Any] = {"slice_accuracy": float((called == ab).float().mean())}
    for name, m in maps.items():
        out[name] = {
            "auroc_all_slices": pixel_auroc(m[organ], truth[organ]),
            "auroc_within_abnormal_slices": pixel_auroc(m[ab][organ[ab]], truth[ab][organ[ab]]),
        }
    level = maps["difference-level"]
    out["difference-level"]["matched_abnormal_share"] = float((level[ab].flatten(1) > 0).any(1).float().mean())
    if presence is not None and evaluation.level is not None:
        mixed = torch.zeros(len(evaluation), dtype=torch.bool)
        for row in presence["rows"]:
            share = row["without"] / max(1, row["with"] + row["without"])
            if 0.2 <= share <= 0.8:
                lo, hi = row["level_mm"]
                mixed |= (evaluation.level >= lo) & (evaluation.level < hi)
        rows = ab & mixed
        out["difference-level"]["mixed_level_abnormal_slices"] = int(rows.sum())
        out["difference-level"]["auroc_within_abnormal_slices_mixed_levels"] = pixel_auroc(
            level[rows][organ[rows]], truth[rows][organ[rows]]
        )
        out["synthetic_lesion"] = synthetic_lesion_check(evaluation, seed)
    return out


def add_synthetic_lesions(
    slices: WeakSlices, seed: int, levels: tuple[float, float] = LESION_LEVELS, hu: float = 100.0, radius: int = 3
) -> WeakSlices:
    """`slices` with a visible 'lesion' as the label: in every other patient (1st, 3rd, ...), on each slice whose level
    lies in `levels` (mm), a disc of `radius` px, `hu` brighter, at a random place in the body (>= 3 px from its
    edge); truth the disc, abnormal where there is one, eta 1. The other patients have none at those levels: presence
    varies at a fixed level, and the abnormality shows on the CT, as a lesion does and a PTV does not."""
    g = torch.Generator().manual_seed(seed)
    x, truth = slices.x.clone(), torch.zeros_like(slices.truth)
    with_lesion = set(list(dict.fromkeys(slices.study))[::2])
    yy, xx = torch.meshgrid(torch.arange(x.shape[-2]), torch.arange(x.shape[-1]), indexing="ij")
    level = slice_levels(slices)
    for i in range(len(x)):
        if slices.study[i] not in with_lesion or not (levels[0] <= float(level[i]) < levels[1]):
            continue
        body = slices.organ[i, 0] > 0.5
        inside = torch.nonzero(F.max_pool2d(-slices.organ[i], 7, 1, 3)[0] > -0.5)  # the body eroded by 3 px
        inside = inside if len(inside) else torch.nonzero(body)
        cy, cx = inside[int(torch.randint(len(inside), (), generator=g))].tolist()
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2) & body
        x[i, 0][disc] = (x[i, 0][disc] + 2 * hu / WINDOW.width).clamp(max=1.0)  # crops: the window over [-1, 1]
        truth[i, 0][disc] = 1.0
    abnormal = truth.flatten(1).any(1)
    return replace(
        slices, x=x, truth=truth, abnormal=abnormal, eta=torch.ones(len(x)), has_truth=torch.ones_like(abnormal)
    )


def synthetic_lesion_check(evaluation: WeakSlices, seed: int, marker_fraction: float = 0.1) -> dict[str, Any]:
    """The difference evidences on `evaluation` with a synthetic lesion as the label (add_synthetic_lesions, radius 3
    and 6 px): pixel AUROC within abnormal slices, and the precision / recall of the target a rule would take from it
    (the top `marker_fraction` of each abnormal slice's body)."""
    out: dict[str, Any] = {}
    for radius in (3, 6):
        synthetic = add_synthetic_lesions(evaluation, seed, radius=radius)
        abnormal, organ, t = synthetic.abnormal, synthetic.organ[:, 0] > 0.5, synthetic.truth[:, 0] > 0.5
        rec: dict[str, Any] = {"abnormal_slices": int(abnormal.sum())}
        for name, pairing in (("difference", "patient"), ("difference-level", "level")):
            m = difference_evidence(synthetic, pairing=pairing)
            target = label_targets(abnormal, synthetic.organ, m, marker_fraction)[:, MARKER].bool()[abnormal]
            hit = float((target & t[abnormal]).sum())
            gate = organ[abnormal]
            rec[name] = {
                "auroc_within_abnormal_slices": pixel_auroc(m[:, 0][abnormal][gate], t[abnormal][gate]),
                "target_precision": hit / max(1.0, float(target.sum())),
                "target_recall": hit / max(1.0, float(t[abnormal].sum())),
            }
        out[f"radius{radius}"] = rec
    return out


def markdown(result: dict[str, Any]) -> str:
    """Per task: the methods' per-patient means with 95% intervals, the evidence ablation, the paired tests."""
    commands = ", ".join(f"`{c}`" for c in result.get("commands", [result["command"]]))
    lines = [f"Commands: {commands} (commit {result['code'].get('git', '?')})", ""]
    for target, rec in result["tasks"].items():
        v = rec["data"]["validation"]
        lines += [
            f"**{target}** ({v['patients']} validation patients, {v['slices']} slices, "
            f"{v['abnormal_slices']} abnormal)",
            "",
            "| method | seeds | Dice (per-patient mean, 95% CI) | pixel AUROC (95% CI) | seed means (Dice) |",
            "|---|---|---|---|---|",
        ]
        for m, row in rec["methods"].items():
            d, a = row["dice"], row["auroc"]
            seeds = ", ".join(f"{x:.3f}" for x in d["seed_means"])
            lines.append(
                f"| {m} | {len(row['seeds'])} | {d['mean']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}] | "
                f"{a['mean']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] | {seeds} |"
            )
        ev = rec["evidence"]
        lines += [
            "",
            f"Evidence (classifier slice accuracy {ev['slice_accuracy']:.3f}): pixel AUROC over all slices' body / "
            "within abnormal slices only: "
            + "; ".join(
                f"{n} {ev[n]['auroc_all_slices']:.3f} / {ev[n]['auroc_within_abnormal_slices']:.3f}" for n in EVIDENCE
            ),
            "",
            extra_evidence(ev),
            "",
            "| paired (per patient) | mean difference | wins | Wilcoxon p |",
            "|---|---|---|---|",
        ]
        for name, t in rec["paired"].items():
            p = "n/a" if t["wilcoxon_p"] is None else f"{t['wilcoxon_p']:.2g}"
            lines.append(f"| {name} | {t['mean_difference']:+.3f} | {t['wins']}/{t['patients']} | {p} |")
        lines.append("")
    return "\n".join(lines)


def extra_evidence(ev: dict[str, Any]) -> str:
    """The level-matched difference's extra figures (mixed levels, match share, the synthetic lesion) as a line."""
    lv = ev.get("difference-level", {})
    parts = []
    if "matched_abnormal_share" in lv:
        parts.append(f"abnormal slices with a level match {lv['matched_abnormal_share']:.3f}")
    if lv.get("auroc_within_abnormal_slices_mixed_levels") is not None:
        parts.append(
            f"difference-level within abnormal slices at mixed levels ({lv['mixed_level_abnormal_slices']} slices) "
            f"{lv['auroc_within_abnormal_slices_mixed_levels']:.3f}"
        )
    for key, syn in ev.get("synthetic_lesion", {}).items():
        parts.append(
            f"synthetic lesion {key} ({syn['abnormal_slices']} slices), AUROC within abnormal / top-fraction target "
            "precision: "
            + ", ".join(
                f"{n} {syn[n]['auroc_within_abnormal_slices']:.3f} / {syn[n]['target_precision']:.3f}"
                for n in ("difference", "difference-level")
            )
        )
    return "; ".join(parts)


def print_table(result: dict[str, Any]) -> None:
    for target, rec in result["tasks"].items():
        print(f"\n{target}: per-patient mean over {rec['data']['validation']['patients']} validation patients")
        for m, row in rec["methods"].items():
            d, a = row["dice"], row["auroc"]
            print(
                f"  {m:20s} Dice {d['mean']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]  "
                f"AUROC {a['mean']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"
            )
        ev = rec["evidence"]
        print(f"  evidence (classifier slice accuracy {ev['slice_accuracy']:.3f}), pixel AUROC all / within abnormal:")
        for name in EVIDENCE:
            print(f"    {name}: {ev[name]['auroc_all_slices']:.3f} / {ev[name]['auroc_within_abnormal_slices']:.3f}")
        print(f"    {extra_evidence(ev)}")
        for name, t in rec["paired"].items():
            p = "n/a" if t["wilcoxon_p"] is None else f"{t['wilcoxon_p']:.2g}"
            print(f"  {name}: mean diff {t['mean_difference']:+.3f}, wins {t['wins']}/{t['patients']}, p {p}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=OPENKBP, help="OpenKBP layout (cases.csv, volumes/)")
    ap.add_argument("--tasks", nargs="+", default=["parotid", "ptv70"], choices=[*TARGETS, *SYNTHETIC])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--single-seed", nargs="*", default=[], choices=list(METHODS), help="methods run on the first seed only (CPU)"
    )
    ap.add_argument("--size", type=int, default=64, help="crop side (px)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--marker-fraction", type=float, default=0.1, help="ClamNet's share of the body (a priori)")
    ap.add_argument("--train-patients", type=int, default=20, help="first N train patients (0: all)")
    ap.add_argument("--val-patients", type=int, default=0, help="first N validation patients (0: all 33)")
    ap.add_argument("--threshold-patients", type=int, default=6, help="the first N train patients choose thresholds")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "clamnet-weak")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "clamnet_weak.json")
    ap.add_argument("--png", type=Path, default=REPO / "docs" / "results" / "clamnet_weak.png")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--merge", action="store_true", help="keep the other tasks of an existing --out (tasks with their own methods)"
    )
    ap.add_argument(
        "--reduced",
        action="store_true",
        help="the bundled sample (6 train, 4 validation patients), 32^2, 3 steps, one seed: a smoke test",
    )
    args = ap.parse_args()
    if args.reduced:
        args.root, args.size, args.steps, args.seeds = SAMPLE_CASES, 32, 3, [0]
        args.train_patients, args.val_patients, args.threshold_patients = 0, 0, 2
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result: dict[str, Any] = {"command": "benchmarks/clamnet_weak.py " + " ".join(sys.argv[1:]), "tasks": {}}
    pictures = []
    for target in args.tasks:
        record, picture = run_task(WeakTask(target=target, size=args.size), args)
        result["tasks"][target] = record
        pictures.append(picture)
    result["budget"] = {
        "steps": args.steps,
        "batch": args.batch,
        "seeds": args.seeds,
        "single_seed": args.single_seed,
        "size": args.size,
        "train_patients": args.train_patients,
        "threshold_patients": args.threshold_patients,
        "marker_fraction": args.marker_fraction,
    }
    result["code"] = code_version()
    if args.merge and args.out.is_file():
        old = json.loads(args.out.read_text())
        commands = old.get("commands", [old["command"]]) if "command" in old else old.get("commands", [])
        result["tasks"] = {**{k: v for k, v in old["tasks"].items() if k not in result["tasks"]}, **result["tasks"]}
        result["commands"] = [*commands, result["command"]]
        budgets = old.get("budgets", {t: old["budget"] for t in old["tasks"]})
        result["budgets"] = {**budgets, **{t: result["budget"] for t in args.tasks}}
    write_json_atomic(result, args.out, 2)
    args.out.with_suffix(".md").write_text(markdown(result))
    task_picture(pictures, args.png)
    print_table(result)


if __name__ == "__main__":
    main()
