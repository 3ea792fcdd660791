"""How long to train the style interpreter: its Dice on generated images as a function of the epoch budget.

Generated images only (nothing real, no validation patient): `--train` seeds and `--test` seeds of a generator are
labelled by an annotator model (the label-efficiency experiment's stand-in, `labelfactory annotate
--annotator-model`); the ensemble is trained on the first set under each budget (max epochs : patience) and scored
on the second, Dice per class pooled over the test images against the annotator's masks. One thread; prints a line
per budget and writes a JSON.

    .venv/bin/python benchmarks/interpreter_budget.py --generator G.pt --annotator-model A.pt \\
        --work /tmp/budget --budgets 4:3,30:3,100:5 --out benchmarks/results/interpreter_budget.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from labelfactory.datasetgan.labeller import Interpreter
from labelfactory.datasetgan.records import records_from_seed_masks
from labelfactory.datasetgan.taps import ws_from_w
from labelfactory.datasetgan.train import DatasetGANConfig, train_ensemble
from labelfactory.evaluation.metrics import confusion_matrix, scores
from labelfactory.jsonio import write_json_atomic
from labelfactory.latent_record import TRUNCATION_PSI
from labelfactory.segmentation.infer import load_segmenter
from labelfactory.stylegan2.checkpoint import load_generator


def annotate(generator: Path, annotator: Path, seeds: str, out: Path) -> None:
    """The annotator's masks of the generated images of `seeds` (a-b) in `out` (kept between runs)."""
    first, last = (int(s) for s in seeds.split("-"))
    if len(list(out.glob("seed*.nii.gz"))) == last - first + 1:
        return
    cmd = [sys.executable, "-m", "labelfactory.cli", "annotate", "--generator", str(generator)]
    cmd += ["--seeds", seeds, "--annotator-model", str(annotator), "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def masks_and_scores(interpreter: Interpreter, records: list, names: dict[str, int]) -> tuple[torch.Tensor, dict]:
    """The interpreter's (N, H, W) masks of the records' latents, and `scores` against the records' masks (pooled
    over the images, background out of the means)."""
    ws = ws_from_w(interpreter.G, torch.stack([r.w for r in records]))
    pred = torch.cat([interpreter.label(ws[i : i + 8]).mask for i in range(0, len(ws), 8)])
    truth = torch.from_numpy(np.stack([r.mask for r in records])).long()
    return pred, scores(confusion_matrix(pred, truth, max(names.values()) + 1), names)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generator", type=Path, required=True)
    p.add_argument("--annotator-model", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True, help="folder for the annotated seeds")
    p.add_argument("--train", default="500000-500029", help="seeds the interpreter learns from")
    p.add_argument("--test", default="700000-700039", help="seeds it is scored on")
    p.add_argument("--budgets", default="4:3,30:3,100:5", help="max_epochs:patience, comma-separated")
    p.add_argument("--members", type=int, default=DatasetGANConfig.members)
    p.add_argument("--out", type=Path, help="JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for part in ("train", "test"):
        annotate(args.generator, args.annotator_model, getattr(args, part), args.work / part)
    G = load_generator(args.generator)
    names = load_segmenter(args.annotator_model).label_names
    k = max(names.values()) + 1
    train = records_from_seed_masks(G, args.work / "train", TRUNCATION_PSI, k, 255)
    test = records_from_seed_masks(G, args.work / "test", TRUNCATION_PSI, k, 255)
    results = {}
    for budget in args.budgets.split(","):
        epochs, patience = (int(x) for x in budget.split(":"))
        cfg = DatasetGANConfig(members=args.members, max_epochs=epochs, patience=patience)
        t0 = time.process_time()
        ensemble, history = train_ensemble(G, train, k, cfg, progress=False)
        cpu = time.process_time() - t0
        interpreter = Interpreter(G, ensemble, names)
        _, scored = masks_and_scores(interpreter, test, names)
        dice = {n: d for n, d in scored["dice"].items() if names[n]}
        results[budget] = {
            "epochs_run": len(history["epoch_loss"]),
            "best_loss": history["best_loss"],
            "train_cpu_s": cpu,
            "mean_dice": scored["mean_dice"],
            "dice": dice,
            "epoch_loss": history["epoch_loss"],
        }
        print(
            f"budget {budget}: {results[budget]['epochs_run']} epochs, {cpu:.0f} CPU-s, loss "
            f"{history['best_loss']:.4f}, mean Dice vs annotator {results[budget]['mean_dice']:.3f} ("
            + ", ".join(f"{n} {d:.2f}" for n, d in dice.items())
            + ")",
            flush=True,
        )
    record = {
        "generator": str(args.generator),
        "kimg": float(G.checkpoint_info["kimg"]),
        "annotator": str(args.annotator_model),
        "train_seeds": args.train,
        "test_seeds": args.test,
        "members": args.members,
        "threads": 1,
        "results": results,
    }
    if args.out:
        write_json_atomic(record, args.out)
    print(json.dumps({b: round(r["mean_dice"], 3) for b, r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
