"""How often a 30-image label set misses an organ, per next-sample strategy: the odds behind `explore`'s default.

An interpreter ensemble never shown a class is confidently wrong on it, not uncertain, so in `generated_uncertain`
only the random picks (the first `--warmup` images, before any interpreter, and 1 in `explore` after) can find a
class the labels so far lack. This script measures, for a generator and the stand-in annotator:

1. each organ's frequency among generated images (`--pool` seeds, annotated by `labelfactory annotate`);
2. for each `explore`, the random picks among `--budget` images and the share of 20,000 random draws of that many
   pool images (without replacement) that hold no image of the organ;
3. the organs of actual label sets (`--sets name=folder`: folders of label files, e.g. the experiment's
   `labels/random` or a datastore's `labels/final`), images per organ;
4. what the interpreters trained on such sets make of the pool (`--interpreters name=datasetgan.pt`): Dice per
   organ against the annotator (pooled over the pool's images) and the share of images each draws the organ in.

Generated images and the annotator only: nothing real, no validation patient. Prints a table, writes a JSON.

    .venv/bin/python benchmarks/selection_coverage.py --generator G.pt --annotator-model A.pt --work /tmp/pool \\
        --sets random=RUN/labels/random --out benchmarks/results/selection_coverage.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from labelfactory.io import read_image
from labelfactory.jsonio import write_json_atomic
from labelfactory.segmentation.infer import load_segmenter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interpreter_budget import annotate, masks_and_scores  # the same annotated seeds, the same scoring


def random_picks(budget: int, warmup: int, explore: int) -> int:
    """Random images among `budget` picks: the first `warmup`, then every `explore`-th image (1-based)."""
    return sum(1 for n in range(1, budget + 1) if n <= warmup or (explore and n % explore == 0))


def presence(folder: Path, organs: dict[str, int]) -> np.ndarray:
    """(images, organs) bool: which organs each label file of `folder` holds."""
    files = sorted(folder.glob("*.nii.gz"))
    if not files:
        raise SystemExit(f"no label files (*.nii.gz) in {folder}")
    return np.stack([np.isin(list(organs.values()), read_image(f).array) for f in files])


def miss_rates(pool: np.ndarray, picks: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """(organs,) share of `draws` random subsets of `picks` pool images that hold no image of each organ."""
    idx = np.argsort(rng.random((draws, len(pool))), axis=1)[:, :picks]
    return (~pool[idx].any(axis=1)).mean(0)


def interpreter_on_pool(generator: Path, interpreter: Path, pool: Path, names: dict[str, int]) -> dict:
    """Dice per organ of `interpreter` against the annotator's masks of `pool`, and its organ frequency there."""
    from labelfactory.datasetgan.labeller import load_interpreter
    from labelfactory.datasetgan.records import records_from_seed_masks
    from labelfactory.latent_record import TRUNCATION_PSI
    from labelfactory.stylegan2.checkpoint import load_generator

    G = load_generator(generator)
    records = records_from_seed_masks(G, pool, TRUNCATION_PSI, max(names.values()) + 1, 255)
    pred, scored = masks_and_scores(load_interpreter(interpreter, G), records, names)
    organs = [n for n, v in names.items() if v]
    drawn = np.stack([np.isin([names[n] for n in organs], m) for m in pred.numpy()]).mean(0)
    return {
        "mean_dice": scored["mean_dice"],
        "dice": {n: scored["dice"][n] for n in organs},
        "organ_frequency": dict(zip(organs, drawn.round(4).tolist(), strict=True)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generator", type=Path, required=True)
    p.add_argument("--annotator-model", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True, help="folder for the annotated pool (kept between runs)")
    p.add_argument("--pool", default="800000-800599", help="generated seeds that estimate the organ frequencies")
    p.add_argument("--budget", type=int, default=30, help="labelled images per set")
    p.add_argument("--warmup", type=int, default=5, help="random images before the first interpreter (the loop's)")
    p.add_argument("--explore", default="0,2,3,4,6", help="explore values to compare (0: pure uncertainty)")
    p.add_argument("--sets", nargs="*", default=[], help="name=folder of label files, counted per organ")
    p.add_argument("--interpreters", nargs="*", default=[], help="name=datasetgan.pt, scored on the pool")
    p.add_argument("--draws", type=int, default=20000)
    p.add_argument("--out", type=Path, help="JSON file")
    args = p.parse_args(argv)
    annotate(args.generator, args.annotator_model, args.pool, args.work)
    names = load_segmenter(args.annotator_model).label_names
    organs = {n: v for n, v in names.items() if v}
    pool = presence(args.work, organs)
    rng = np.random.default_rng(0)
    freq = dict(zip(organs, pool.mean(0).round(4).tolist(), strict=True))
    print(f"pool: {len(pool)} generated images; organ frequency: " + ", ".join(f"{n} {f:.3f}" for n, f in freq.items()))
    strategies = {}
    for explore in (int(e) for e in args.explore.split(",")):
        picks = random_picks(args.budget, args.warmup, explore)
        missed = miss_rates(pool, picks, args.draws, rng)
        strategies[f"explore {explore}"] = {
            "explore": explore,
            "random_picks": picks,
            "miss_rate": dict(zip(organs, missed.round(4).tolist(), strict=True)),
            "expected_organs_missed": float(missed.sum()),
            "worst": max(zip(missed.tolist(), organs, strict=True))[1],
        }
        s = strategies[f"explore {explore}"]
        print(
            f"explore {explore}: {picks:2d} random of {args.budget}; organs missed by the random picks "
            f"{s['expected_organs_missed']:.2f} on average, worst {s['worst']} {missed.max():.3f}",
            flush=True,
        )
    sets = {}
    for item in args.sets:
        name, folder = item.split("=", 1)
        have = presence(Path(folder), organs)
        sets[name] = {
            "folder": folder,
            "images": len(have),
            "images_per_organ": dict(zip(organs, have.sum(0).tolist(), strict=True)),
        }
        print(
            f"set {name}: {len(have)} images; "
            + ", ".join(f"{n} {c}" for n, c in sets[name]["images_per_organ"].items())
        )
    interpreters = {}
    for item in args.interpreters:
        name, file = item.split("=", 1)
        interpreters[name] = {"file": file, **interpreter_on_pool(args.generator, Path(file), args.work, names)}
        r = interpreters[name]
        print(
            f"interpreter {name}: mean Dice vs annotator {r['mean_dice']:.3f}; Dice / share of images drawn in: "
            + ", ".join(f"{n} {r['dice'][n]:.2f} / {r['organ_frequency'][n]:.2f}" for n in organs),
            flush=True,
        )
    record = {
        "generator": str(args.generator),
        "annotator": str(args.annotator_model),
        "pool_seeds": args.pool,
        "pool_images": len(pool),
        "budget": args.budget,
        "warmup": args.warmup,
        "draws": args.draws,
        "organ_frequency": freq,
        "strategies": strategies,
        "sets": sets,
        "interpreters": interpreters,
    }
    if args.out:
        write_json_atomic(record, args.out)
    print(json.dumps({k: round(v["expected_organs_missed"], 2) for k, v in strategies.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
