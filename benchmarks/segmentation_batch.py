"""Seconds per slice of UNet++ inference on the CPU by batch size and slice size: what `segment_image`'s CPU default
batch rests on. Prints a table and writes a JSON.

    .venv/bin/python benchmarks/segmentation_batch.py [--threads 1] [--slices 64] [--out benchmarks/results/...]

The shipped OpenKBP segmenter (sample-data/openkbp/models/segmentation.pt, UNet++, trained on 64 px body crops) at
every size: it is fully convolutional, and the time does not depend on what the slices show.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

from labelfactory.segmentation.infer import load_segmenter, predict_slices

REPO = Path(__file__).resolve().parents[1]


def seconds_per_slice(network: torch.nn.Module, size: int, n: int, batch: int, repeats: int) -> float:
    """Best of `repeats` timings of `n` random (1, size, size) slices in batches of `batch`, per slice (s)."""
    x = torch.rand(n, 1, size, size) * 2 - 1
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict_slices(network, x, batch, precision="fp32")
        best = min(best, time.perf_counter() - t0)
    return best / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--slices", type=int, default=64, help="slices per timing")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "segmentation_batch.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    network = load_segmenter(REPO / "sample-data" / "openkbp" / "models" / "segmentation.pt", "cpu").network
    rows = []
    print(f"{'size':>5} {'batch':>5} {'ms/slice':>9}")
    for size in args.sizes:
        for batch in args.batches:
            s = seconds_per_slice(network, size, args.slices, batch, args.repeats)
            rows.append({"size": size, "batch": batch, "seconds_per_slice": s})
            print(f"{size:>5} {batch:>5} {1000 * s:>9.1f}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {"threads": args.threads, "slices": args.slices, "repeats": args.repeats, "rows": rows, "commit": commit}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
