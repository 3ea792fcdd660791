"""Synthesis throughput: pairs per second of `labelfactory synthesize` per seed (B = 1, the path before blocks) and in
fixed blocks of B seeds (`labelfactory.datasetgan.synthesis`), with the OpenKBP sample's models (64^2).

Two rates per B: `label` (generator + interpreter only: `Interpreter.label` over the seeds' blocks) and `synthesize`
(the whole command: also the files, manifest and preview written). The columns run interleaved, round by round
(B = 1, 8, 16, 32, then again), and each rate is the median over rounds, so a machine shared with other jobs slows
every column alike. Every round starts a new output folder.

Usage: python benchmarks/synthesis_speed.py [--models sample-data/openkbp/models] [--seeds 32] [--rounds 3]
           [--blocks 1,8,16,32] [--threads N] [--device cpu] [--out benchmarks/results/synthesis_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from labelfactory.datasetgan.labeller import load_interpreter  # noqa: E402 (after the path above)
from labelfactory.datasetgan.synthesis import block_seeds, seed_blocks, synthesize  # noqa: E402
from labelfactory.datasetgan.taps import ws_from_seeds  # noqa: E402
from labelfactory.devices import resolve_device  # noqa: E402
from labelfactory.latent_record import TRUNCATION_PSI  # noqa: E402
from labelfactory.stylegan2.checkpoint import load_generator  # noqa: E402


def label_seconds(interp, seeds: list[int], block: int) -> float:
    """Seconds to label `seeds` in blocks of `block` (generator and interpreter, nothing written)."""
    t0 = time.perf_counter()
    for first in seed_blocks(seeds, block):
        lab = interp.label(ws_from_seeds(interp.G, block_seeds(first, block), TRUNCATION_PSI))
        lab.mask.cpu()  # waits for a GPU
    return time.perf_counter() - t0


def synthesize_seconds(interp, seeds: list[int], block: int, work: Path) -> float:
    """Seconds of a whole `synthesize` run of `seeds` into a new folder under `work`."""
    t0 = time.perf_counter()
    synthesize(interp, seeds, tempfile.mkdtemp(dir=work), block=block, progress=False)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, default=REPO / "sample-data" / "openkbp" / "models")
    p.add_argument("--seeds", type=int, default=32, help="seeds per run, 0..N-1 (default 32)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported (default 3)")
    p.add_argument("--blocks", default="1,8,16,32", help="block sizes B; 1 is the per-seed path (default 1,8,16,32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "synthesis_speed.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    G = load_generator(args.models / "stylegan2.pt", device)
    interp = load_interpreter(args.models / "datasetgan.pt", G)
    seeds, blocks = list(range(args.seeds)), [int(b) for b in args.blocks.split(",")]
    times: dict[int, dict[str, list[float]]] = {b: {"label": [], "synthesize": []} for b in blocks}
    for b in blocks:  # warm-up: allocator, kernels, autotuning
        label_seconds(interp, seeds[:b], b)
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            for b in blocks:
                times[b]["label"].append(label_seconds(interp, seeds, b))
                times[b]["synthesize"].append(synthesize_seconds(interp, seeds, b, Path(work)))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    rate = {b: {k: args.seeds / statistics.median(v) for k, v in t.items()} for b, t in times.items()}
    base = rate[blocks[0]]
    rows = {
        str(b): {
            "label_pairs_per_s": round(rate[b]["label"], 3),
            "synthesize_pairs_per_s": round(rate[b]["synthesize"], 3),
            "label_speedup": round(rate[b]["label"] / base["label"], 2),
            "synthesize_speedup": round(rate[b]["synthesize"] / base["synthesize"], 2),
            "seconds": times[b],
        }
        for b in blocks
    }
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "resolution": G.img_resolution,
        "members": interp.ensemble.config.members,
        "seeds": args.seeds,
        "rounds": args.rounds,
        "baseline_block": blocks[0],
        "blocks": rows,
    }
    print(f"{'B':>4} {'label pairs/s':>14} {'x':>6} {'synthesize pairs/s':>19} {'x':>6}")
    for b, row in rows.items():
        print(
            f"{b:>4} {row['label_pairs_per_s']:>14.2f} {row['label_speedup']:>6.2f} "
            f"{row['synthesize_pairs_per_s']:>19.2f} {row['synthesize_speedup']:>6.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
