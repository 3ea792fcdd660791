"""StyleGAN2-ADA training throughput: images/s, s/kimg and peak memory for full training steps
(G main + lazy path length, D main + lazy R1, ADA at p=0.2, EMA) at 64^2 and the paper's 256^2 config.

Anchor (stylegan2-ada-pytorch, 'auto' config at 256^2): 12.53 s/kimg on one A100, 20.84 on one V100.
Usage: python benchmarks/gan_throughput.py [--steps 20] [--batch 16] [--mixed-precision] [--channels-last] [--out results.json]
Timed steps follow warm-up steps; the step count is rounded up to a multiple of 16 on GPU so lazy
regularization runs at its real frequency.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time

import torch

from labelfactory.gan.config import PRESETS
from labelfactory.gan.training import Trainer


def bench(name: str, cfg, steps: int, warmup: int, device: torch.device) -> dict:
    images = torch.rand(64, 1, cfg.resolution, cfg.resolution) * 2 - 1
    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(cfg, images, tmp, progress=False, device=device)
        t.augment_pipe.p.fill_(0.2)
        t.ada.interval = 10**9  # keep p fixed while timing
        for _ in range(warmup):
            t.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            t.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    n = steps * cfg.batch_size
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"name": name, "resolution": cfg.resolution, "batch_size": cfg.batch_size, "steps": steps, "images_per_s": n / dt, "s_per_kimg": dt / n * 1000,
            "peak_memory_mib": peak, "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process max RSS",
            "mixed_precision": cfg.mixed_precision, "channels_last": cfg.channels_last,
            "G_params_M": sum(p.numel() for p in t.G.parameters()) / 1e6, "D_params_M": sum(p.numel() for p in t.D.parameters()) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 16 on GPU, 2 on CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="override the batch size (default: the config's; 4 for 256^2 on CPU)")
    ap.add_argument("--resolutions", default="64,256")
    ap.add_argument("--mixed-precision", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--out", default="gan_throughput.json")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    steps, warmup = a.steps or (16 if gpu else 2), a.warmup if a.warmup is not None else (16 if gpu else 1)
    configs = {64: ("64^2 demo-width", PRESETS["demo"].with_overrides(pl_weight=2.0)), 256: ("256^2 paper", PRESETS["paper256"])}
    results = []
    for res in (int(r) for r in a.resolutions.split(",")):
        name, cfg = configs[res]
        batch = a.batch or (4 if res == 256 and not gpu else None)
        cfg = cfg.with_overrides(batch_size=batch, mixed_precision=a.mixed_precision or None, channels_last=a.channels_last or None, fid_kimg=0.0)
        r = bench(name, cfg, steps, warmup, device)
        results.append(r)
        print(f"{name:18s} batch {r['batch_size']:3d}: {r['images_per_s']:8.2f} img/s  {r['s_per_kimg']:9.1f} s/kimg  peak {r['peak_memory_mib']:.0f} MiB", flush=True)
    machine = {"device": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    with open(a.out, "w") as f:
        json.dump({"machine": machine, "anchor_s_per_kimg": {"A100": 12.53, "V100": 20.84}, "results": results}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
