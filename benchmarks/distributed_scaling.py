"""One process vs several under torchrun on the CPU (gloo): segmentation training steps/s and synthesis pairs/s.

Segmentation: `labelfactory train-segmentation` on synthetic pairs (no validation), the global batch split over the
ranks (DDP); steps/s from the log times of its first and last rounds (start-up and the first round left out).
Synthesis: `labelfactory synthesize` of a small random generator and interpreter; pairs/s from the log times of the
ranks' first "makes" line to rank 0's closing line (start-up and model loading left out; the merge, drop,
manifests and preview counted). Each process has one thread
(OMP_NUM_THREADS=1), so N ranks use N cores: on a machine with fewer free cores the figures say so.

Usage: PYTHONPATH=lib python benchmarks/distributed_scaling.py [--ranks 1,2] [--steps 60] [--seeds 16]
Prints a table and writes benchmarks/results/distributed_scaling.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from labelfactory.datasetgan import EnsembleConfig, PixelEnsemble, TapLayout, save_interpreter
from labelfactory.labels import LABEL_NAMES
from labelfactory.stylegan2.checkpoint import load_generator, publish_generator
from labelfactory.stylegan2.networks import Generator

OUT = Path(__file__).parent / "results" / "distributed_scaling.json"
GAN = dict(z_dim=64, w_dim=64, img_resolution=64, channel_base=2048, channel_max=64, mapping_layers=2)
_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "  # logging's asctime at a line's start
_STEP_LINE = re.compile(_STAMP + r".*step (\d+)/\d+ ", re.M)
_SYNTH_START = re.compile(_STAMP + r".*synthesize: rank \d+ of \d+ makes", re.M)
_SYNTH_END = re.compile(_STAMP + r".*synthesize: \d+ new pairs", re.M)


def models(folder: Path) -> Path:
    """A random 64^2 generator and a 3-member interpreter beside it: the synthesis workload (shapes, not quality)."""
    torch.manual_seed(0)
    publish_generator(Generator(**GAN).eval(), GAN, folder / "stylegan2.pt", config={}, data={}, kimg=0.0)
    G = load_generator(folder / "stylegan2.pt")
    layout = TapLayout.of(G)
    K = max(LABEL_NAMES.values()) + 1
    ens = PixelEnsemble(EnsembleConfig(layout.channels, layout.resolutions, 64, K, members=3, hidden=(64, 32)))
    save_interpreter(folder / "datasetgan.pt", ens.eval(), LABEL_NAMES, {}, {}, G)
    return folder / "stylegan2.pt"


def torchrun(ranks: int, args: list[str]) -> tuple[float, str]:
    """(wall seconds, stderr) of `labelfactory <args>` on `ranks` gloo processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1"]
    cmd += ["--nproc-per-node", str(ranks), "-m", "labelfactory.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(args[:1])} on {ranks} ranks failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stderr


def synthesis_rate(generator: Path, work: Path, ranks: int, seeds: int) -> float:
    """Pairs per second from the first rank's start to rank 0's end of the run."""
    args = ["synthesize", "--generator", str(generator), "--out", str(work / f"synth-{ranks}"), "--no-progress"]
    _, log = torchrun(ranks, [*args, "--seeds", f"0-{seeds - 1}"])
    start = min(_time(t) for t in _SYNTH_START.findall(log))
    return seeds / (_time(_SYNTH_END.search(log).group(1)) - start).total_seconds()


def _time(stamp: str) -> datetime.datetime:
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")


def segmentation_rate(pairs: Path, work: Path, ranks: int, steps: int, size: int) -> float:
    """Training steps per second between the first and the last logged round (rounds of steps/6)."""
    args = ["train-segmentation", "--synthetic", str(pairs), "--out", str(work / f"seg-{ranks}.pt")]
    args += ["--network", "unet", "--size", str(size), "--batch-size", "8", "--steps", str(steps)]
    args += ["--val-interval", str(steps // 6), "--augment", "none"]
    _, log = torchrun(ranks, args)
    rounds = [(_time(t), int(s)) for t, s in _STEP_LINE.findall(log)]
    (t0, s0), (t1, s1) = rounds[0], rounds[-1]
    return (s1 - s0) / (t1 - t0).total_seconds()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2", help="process counts to compare (default 1,2)")
    p.add_argument("--steps", type=int, default=60, help="segmentation training steps (global batch 8)")
    p.add_argument("--size", type=int, default=64, help="segmentation slice side (px)")
    p.add_argument("--seeds", type=int, default=64, help="synthesis: seeds made (default 64)")
    args = p.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        generator = models(work)
        pairs = work / "pairs"  # the segmenter trains on synthesized pairs
        torchrun(1, ["synthesize", "--generator", str(generator), "--out", str(pairs), "--seeds", "0-31",
                     "--drop-fraction", "0", "--no-progress"])  # fmt: skip
        for n in ranks:
            row = {"ranks": n, "segmentation_steps_per_s": segmentation_rate(pairs, work, n, args.steps, args.size)}
            row["synthesis_pairs_per_s"] = synthesis_rate(generator, work, n, args.seeds)
            rows.append(row)
            print(f"{n} rank(s): segmentation {row['segmentation_steps_per_s']:.2f} steps/s, "
                  f"synthesis {row['synthesis_pairs_per_s']:.2f} pairs/s", flush=True)  # fmt: skip
    base = rows[0]
    for row in rows:
        row["segmentation_speedup"] = row["segmentation_steps_per_s"] / base["segmentation_steps_per_s"]
        row["synthesis_speedup"] = row["synthesis_pairs_per_s"] / base["synthesis_pairs_per_s"]
    result = {
        "what": "gloo ranks on the CPU, one thread each; segmentation: unet, batch 8 over all ranks, "
        f"{args.size}^2, steps/s; synthesis: 64^2 random generator + 3-member interpreter, pairs/s",
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "torch": torch.__version__,
        "config": vars(args),
        "rows": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
