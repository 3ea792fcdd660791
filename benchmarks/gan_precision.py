"""float32 vs bf16 GAN training after the same budget: FID of each run's G_ema and its loss curves.

Runs are `labelfactory train-stylegan2` output folders (e.g. the same seed with and without
`--mixed-precision`); each is read from its training-state.pt (G_ema) and TensorBoard events
(Loss/G/loss, Loss/D/loss, Loss/r1_penalty, augment p per step, averaged over windows of steps).
FID: `--fid-images` images of each G_ema (const noise, fixed seed) against the real slices of
`--studies`, with the pytorch-fid Inception the trainer uses; the real features are computed once.

Usage: python benchmarks/gan_precision.py /tmp/eq/fp32-0 /tmp/eq/bf16-0 ... --studies sample-data/datastore \
           --fid-images 256 --out benchmarks/results/gan_precision.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from labelfactory.checkpoints import load_checkpoint
from labelfactory.evaluation.fid import FIDEvaluator
from labelfactory.jsonio import write_json_atomic
from labelfactory.stylegan2.config import StyleGAN2Config
from labelfactory.stylegan2.data import load_training_slices, real_image_paths
from labelfactory.stylegan2.networks import Generator
from labelfactory.stylegan2.training import STATE_FILE, STATE_KIND

TAGS = ("Loss/G/loss", "Loss/D/loss", "Loss/r1_penalty", "Progress/augment")


def curves(run: Path, window: int) -> dict[str, list[float]]:
    """Each tag's per-step values averaged over consecutive windows of `window` logged points."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in TAGS:
        if tag in acc.Tags()["scalars"]:
            v = np.array([e.value for e in acc.Scalars(tag)])
            n = len(v) // window * window
            out[tag] = v[:n].reshape(-1, window).mean(axis=1).round(4).tolist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--studies", type=Path, default=Path("sample-data/datastore"))
    ap.add_argument("--fid-images", type=int, default=256)
    ap.add_argument("--window", type=int, default=25, help="logged steps per curve point")
    ap.add_argument("--out", default="benchmarks/results/gan_precision.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    results, fid = [], None
    for run in a.runs:
        payload = load_checkpoint(run / STATE_FILE, STATE_KIND)
        cfg = StyleGAN2Config.from_dict(payload["config"])
        G = Generator(**cfg.generator_kwargs)
        G.load_state_dict(payload["state"]["G_ema"])
        G.eval()
        if fid is None:
            reals = load_training_slices(real_image_paths(a.studies), cfg.resolution)
            fid = FIDEvaluator.create(reals, min(a.fid_images, len(reals)))
        r = {
            "run": str(run),
            "seed": cfg.seed,
            "mixed_precision": cfg.mixed_precision,
            "kimg": payload["state"]["cur_nimg"] / 1000,
            "resolution": cfg.resolution,
            "fid": fid(G) if fid else None,
            "curves": curves(run, a.window),
        }
        results.append(r)
        print(f"{run}: bf16={cfg.mixed_precision} seed {cfg.seed} kimg {r['kimg']} FID {r['fid']}", flush=True)
    write_json_atomic({"fid_images": a.fid_images, "window": a.window, "results": results}, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
