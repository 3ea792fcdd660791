"""Retrain the shipped OpenKBP segmenter through the library's one training path (issue 28 item 2).

The shipped `sample-data/openkbp/models/segmentation.pt` was made by the experiment's own loop. This script makes
its successor with `train_segmenter`, the function Slicer's Train button calls, so the model's recorded config is a
recipe the app repeats:

1. synthetic pairs: the shipped generator and interpreter, seeds from 1,000,000, the most uncertain 10% dropped;
2. real slices: the protocol's real-30 draw 0 (train patients minus the dev split), partial contours flagged;
3. one segmenter per `--real-share` candidate (0: pooled), nnU-Net 2D augmentation, best weights by per-patient
   Dice on the dev split's slices; the candidate with the best dev Dice is chosen (no validation patient seen);
4. the chosen model scored once on the 33 validation patients (3D, per patient, contoured organs only);
5. `--ship`: copied into the models folder with its SHA-256.

    .venv/bin/python benchmarks/retrain_openkbp_segmenter.py --openkbp ../shared/datasets/openkbp \\
        --work /work/runs/openkbp-segmenter [--real-share 0,0.25] [--ship sample-data/openkbp/models]

Resumable: rerun the same command. Writes WORK/result.json (dev Dice per candidate, the choice, per-patient test
scores, the commit) and benchmarks/results/openkbp_segmenter.json.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import label_efficiency as le

from labelfactory.checkpoints import copy_model
from labelfactory.datasets import openkbp
from labelfactory.jsonio import read_json, write_json_atomic
from labelfactory.segmentation.data import RealSlices, synthetic_pairs
from labelfactory.segmentation.train import MODEL_FILE, train_segmenter

MODELS = le.REPO / "sample-data" / "openkbp" / "models"


def synthesize_pairs(work: Path, models: Path, pairs: int, drop: float, spacing: float) -> Path:
    """The shipped generator + interpreter's pairs in WORK/synthetic (resumable: synthesize skips seeds done)."""
    from labelfactory.datasetgan.labeller import load_interpreter
    from labelfactory.datasetgan.synthesis import synthesize
    from labelfactory.stylegan2.checkpoint import load_generator

    out = work / "synthetic"
    if read_json(out / "done.json") is None:
        G = load_generator(models / "stylegan2.pt", "cpu")
        interpreter = load_interpreter(models / "datasetgan.pt", G)
        n = math.ceil(pairs / (1 - drop))
        res = synthesize(
            interpreter,
            list(range(le.SYNTH_SEED0, le.SYNTH_SEED0 + n)),
            out,
            drop_fraction=drop,
            window=openkbp.WINDOW,
            spacing=(spacing, spacing),
            progress=False,
        )
        write_json_atomic({"kept": len(res.kept), "dropped": len(res.dropped)}, out / "done.json")
    return out


def dev_slices(run: le.Run) -> RealSlices:
    """Every body-crop slice with an organ of the dev patients, flagged with each patient's contours."""
    cases = [run.slices(c) for c in run.cases("dev")]
    images = torch.cat([c.images for c in cases])
    masks = torch.cat([c.organs for c in cases])
    groups = [c.case.name for c in cases for _ in range(len(c.images))]
    flags = torch.stack([c.contoured for c in cases for _ in range(len(c.images))])
    keep = (masks > 0).flatten(1).any(1)
    idx = torch.nonzero(keep)[:, 0].tolist()
    return RealSlices(images[idx], masks[idx], [groups[i] for i in idx], flags[idx])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--openkbp", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--models", type=Path, default=MODELS, help="generator + interpreter to synthesize with")
    p.add_argument("--real-share", default="0,0.25", help="candidates, chosen on the dev split")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--pairs", type=int, default=1500)
    p.add_argument("--ship", type=Path, help="copy the chosen model here (with its SHA-256)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = le.Run(
        argparse.Namespace(
            openkbp=args.openkbp,
            work=args.work,
            rows="",
            reduced=False,
            dev_split=le.PROTOCOL_DIR / "dev_split.json",
            protocol=le.PROTOCOL_DIR / "protocol.json",
            generator=None,
        )
    )
    spacing = float(np.median([c.spacing_mm[0] for c in run._cases["train"]]))  # in-plane mm, as the experiment
    folder = synthesize_pairs(args.work, args.models, args.pairs, 0.1, spacing)
    synthetic = synthetic_pairs(folder, 64, openkbp.WINDOW, dict(le.LABEL_NAMES))
    images, masks, contoured, ids = run.pool()
    pick = run.draw(30, 0)
    real = RealSlices(images[pick], masks[pick], [ids[i] for i in pick], contoured[pick])
    dev = dev_slices(run)
    le.log(f"{len(synthetic)} synthetic pairs, {len(real)} real slices, {len(dev)} dev slices")
    data = {"synthetic": str(folder), "pairs": len(synthetic), "real_slices": real.groups, "dev_patients": run.dev}
    candidates = {}
    for share in [float(x) for x in args.real_share.split(",")]:
        d = args.work / f"share{share}"
        config = le.row_config("unetpp", 64, args.steps, args.batch_size, 0, augment="nnunet2d", real_share=share)
        config.val_interval = 250
        record = read_json(d / "trained.json")
        if record is None:
            result = train_segmenter(
                synthetic, dev, config, out=d / MODEL_FILE, data=data, real_set=real, state_file=d / "state.pt"
            )
            record = {"dev_dice": result.best_val_dice, "best_step": result.best_step, "history": result.history}
            write_json_atomic(record, d / "trained.json")
        candidates[share] = record
        le.log(f"real_share {share}: dev per-patient Dice {record['dev_dice']:.4f} at step {record['best_step']}")
    chosen = max(candidates, key=lambda s: candidates[s]["dev_dice"])
    model = args.work / f"share{chosen}" / MODEL_FILE
    test = read_json(args.work / "test.json")
    if test is None:  # scored once
        test = {"model": str(model), "per_patient": run.score(model, "test")}
        write_json_atomic(test, args.work / "test.json")
    per = test["per_patient"]
    dice = [v["dice"] for v in per.values()]
    organs = sorted({o for v in per.values() for o in v["organs"]})
    by_organ = {
        o: float(np.nanmean([v["organs"][o]["dice"] for v in per.values() if o in v["organs"]])) for o in organs
    }
    result = {
        "commit": le.git_commit(),
        "candidates": {str(k): {"dev_dice": v["dev_dice"], "best_step": v["best_step"]} for k, v in candidates.items()},
        "chosen_real_share": chosen,
        "test_mean_dice": float(np.mean(dice)),
        "test_patients": len(per),
        "test_by_organ": by_organ,
        "per_patient": per,
    }
    write_json_atomic(result, args.work / "result.json")
    write_json_atomic(result, le.REPO / "benchmarks" / "results" / "openkbp_segmenter.json")
    print(f"chosen real_share {chosen}; test per-patient mean Dice {result['test_mean_dice']:.3f} on {len(per)}")
    for o, v in by_organ.items():
        print(f"  {o:22s} {v:.3f}")
    if args.ship:
        copy_model(model, args.ship / MODEL_FILE)
        print(f"shipped {args.ship / MODEL_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
