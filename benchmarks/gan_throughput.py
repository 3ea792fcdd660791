"""StyleGAN2-ADA training throughput over whole lazy cycles, per phase, ours side by side with the reference.

A cycle is 16 minibatches: Gmain every step, Greg (path length) every 4, Dmain every step, Dreg (R1)
every 16, the ADA update (p starts at 0.2, interval 4) and the G_ema update, i.e. every phase at its
real frequency. Each column runs in its own worker process (its own peak RSS) and the driver
interleaves them cycle by cycle (A/B/A/B...), after one warm-up cycle per column (its time is
reported as `first_cycle_wall_s`). `--sampled` (for 256^2 on a CPU, where a cycle takes an hour)
times one step at batch index 0, which runs every phase once, and scales each phase to its count in
a cycle (16 Gmain, 4 Greg, 16 Dmain, 1 Dreg, 16 EMA/ADA/other): the same work, ~9x less time.

Columns: `ours` variants (`--ours fp32,bf16+cl`: '+'-joined flags from VARIANT_FLAGS), the same code
from another checkout (`--before DIR/lib`, e.g. a git worktree of an older commit), and NVlabs
stylegan2-ada-pytorch itself (`--reference DIR`, its clone; its code is imported from there, never
copied here): its own networks, loss (`StyleGAN2Loss`), augment pipe ('bgc', as its default) and the
phase loop of its `training_loop.py`, on CPU with its pure-PyTorch fallbacks, float32
(`num_fp16_res=0`, no clamp). Without `--reference` that column is skipped.

Usage: python benchmarks/gan_throughput.py --configs demo64,openkbp64 --cycles 3 --ours fp32,bf16 \
           [--before /tmp/lf-before/lib] [--reference /tmp/sg2ref] [--threads 1] [--out results.json]
Results are merged into the JSON file by (config, column).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

CYCLE = 16  # minibatches per lazy cycle (D_reg_interval)
# 64^2 configs train with path length on (as the reference's paper configs); demo itself has it off
CONFIGS = {
    "demo64": ("demo", dict(pl_weight=2.0)),
    # the OpenKBP run's own preset (64^2, 4x the demo's widths from 16^2 down, batch 16, no path length)
    "openkbp64": ("openkbp64", {}),
    "paper256": ("paper256", dict(batch_size=16)),
}
VARIANT_FLAGS = {
    "bf16": {"mixed_precision": True},
    "nocl": {"channels_last": False},
}


def _scale_sampled(seconds: tuple[float, float], phases: dict, intervals: dict[str, int]) -> tuple[tuple, dict]:
    """One step that ran every phase (batch_idx 0) -> the cycle it stands for: each phase times CYCLE / interval."""
    scaled = {k: [v * CYCLE / intervals.get(k, 1) for v in vals] for k, vals in phases.items()}
    rest = [(s - sum(v[i] for v in phases.values())) * CYCLE for i, s in enumerate(seconds)]
    total = tuple(rest[i] + sum(v[i] for v in scaled.values()) for i in range(2))
    return total, scaled


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _now() -> tuple[float, float]:
    """(wall, process CPU) seconds: with one thread on a shared CPU, CPU time is what another load cannot stretch."""
    return time.perf_counter(), time.process_time()


class _PhaseClock:
    """Accumulates (wall, CPU) seconds per phase name."""

    def __init__(self):
        self.seconds: dict[str, list[float]] = {}

    def add(self, name: str, t0: tuple[float, float]) -> None:
        now, acc = _now(), self.seconds.setdefault(name, [0.0, 0.0])
        acc[0] += now[0] - t0[0]
        acc[1] += now[1] - t0[1]

    def wrap(self, name_of, fn):
        def timed(*args, **kwargs):
            t0 = _now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name_of(args, kwargs), t0)

        return timed


def _ours(cfg_name: str, overrides: dict, lib: str | None):
    """A callable running one cycle of our Trainer; phases timed by wrapping the loss, optimiser, EMA and ADA calls."""
    if lib:
        sys.path.insert(0, lib)
    import tempfile

    import torch

    from labelfactory.stylegan2.config import PRESETS, StyleGAN2Config
    from labelfactory.stylegan2.training import Trainer

    preset, base = CONFIGS[cfg_name]
    known = {k: v for k, v in {**base, **overrides}.items() if k in StyleGAN2Config.__dataclass_fields__}
    if len(known) != len(base) + len(overrides):
        raise SystemExit(f"this checkout's StyleGAN2Config lacks {sorted(set(base) | set(overrides) - set(known))}")
    cfg = PRESETS[preset].with_overrides(fid_kimg=0.0, **known)
    images = torch.rand(256, 1, cfg.resolution, cfg.resolution) * 2 - 1
    t = Trainer(cfg, images, tempfile.mkdtemp(prefix="gan-bench-"), progress=False, device=torch.device("cpu"))
    t.augment_pipe.p.fill_(0.2)
    clock, current = _PhaseClock(), {"phase": None}

    def phase_name(args, kwargs):
        current["phase"] = args[0] if args else kwargs["phase"]
        return current["phase"]

    t.loss.accumulate_gradients = clock.wrap(phase_name, t.loss.accumulate_gradients)
    for opt in t.opts.values():
        opt.step = clock.wrap(lambda a, k: current["phase"], opt.step)
    t._update_ema = clock.wrap(lambda a, k: "ema", t._update_ema)
    t.ada.step = clock.wrap(lambda a, k: "ada", t.ada.step)

    def cycle(sampled: bool = False):
        clock.seconds = {}
        t0 = _now()
        for _ in range(1 if sampled else CYCLE):
            if sampled:
                t.batch_idx = 0
            t.step()
        t1 = _now()
        seconds = (t1[0] - t0[0], t1[1] - t0[1])
        if sampled:
            return _scale_sampled(seconds, clock.seconds, {"Greg": cfg.G_reg_interval, "Dreg": cfg.D_reg_interval})
        return seconds, dict(clock.seconds)

    info = {
        "batch_size": cfg.batch_size,
        "resolution": cfg.resolution,
        "config": {**base, **overrides},
        "G_params": sum(p.numel() for p in t.G.parameters()),
        "D_params": sum(p.numel() for p in t.D.parameters()),
    }
    return cycle, info


def _reference(cfg_name: str, root: str):
    """A callable running one cycle of stylegan2-ada-pytorch's own training phases, built from its clone at `root`."""
    sys.path.insert(0, root)
    import numpy as np
    import torch
    from torch_utils import training_stats
    from training import augment, loss, networks  # the reference's modules, from its clone

    from labelfactory.stylegan2.config import PRESETS

    preset, base = CONFIGS[cfg_name]
    cfg = PRESETS[preset].with_overrides(**base)
    B = cfg.batch_size
    G = networks.Generator(
        cfg.z_dim,
        0,
        cfg.w_dim,
        cfg.resolution,
        1,
        mapping_kwargs=dict(num_layers=cfg.mapping_layers),
        synthesis_kwargs=dict(
            channel_base=cfg.channel_base, channel_max=cfg.channel_max, num_fp16_res=0, conv_clamp=None
        ),
    )
    D = networks.Discriminator(
        0,
        cfg.resolution,
        1,
        channel_base=cfg.channel_base,
        channel_max=cfg.channel_max,
        num_fp16_res=0,
        conv_clamp=None,
        epilogue_kwargs=dict(mbstd_group_size=cfg.mbstd_group),
    )
    G.train().requires_grad_(False)
    D.train().requires_grad_(False)
    import copy

    G_ema = copy.deepcopy(G).eval()
    pipe = (
        augment.AugmentPipe(
            xflip=1,
            rotate90=1,
            xint=1,
            scale=1,
            rotate=1,
            aniso=1,
            xfrac=1,
            brightness=1,
            contrast=1,
            lumaflip=1,
            hue=1,
            saturation=1,
        )
        .train()
        .requires_grad_(False)
    )
    pipe.p.copy_(torch.as_tensor(0.2))
    ada_stats = training_stats.Collector(regex="Loss/signs/real")
    lossobj = loss.StyleGAN2Loss(
        "cpu",
        G.mapping,
        G.synthesis,
        D,
        augment_pipe=pipe,
        style_mixing_prob=cfg.style_mixing_prob,
        r1_gamma=cfg.r1_gamma,
        pl_weight=cfg.pl_weight,
    )
    phases = []
    for name, module, interval in (("G", G, cfg.G_reg_interval), ("D", D, cfg.D_reg_interval)):
        ratio = interval / (interval + 1)
        opt = torch.optim.Adam(module.parameters(), lr=cfg.lr * ratio, betas=[b**ratio for b in cfg.betas], eps=1e-8)
        phases += [(name + "main", module, opt, 1), (name + "reg", module, opt, interval)]
    images = torch.rand(256, 1, cfg.resolution, cfg.resolution) * 2 - 1
    c = torch.zeros(B, 0)
    state = {"batch_idx": 0, "cur_nimg": 0}

    def cycle(sampled: bool = False):
        clock = _PhaseClock()
        t_start = _now()
        for _ in range(1 if sampled else CYCLE):
            if sampled:
                state["batch_idx"] = 0
            t0 = _now()
            real = images[torch.randint(len(images), (B,))]
            all_z = torch.randn(len(phases) * B, cfg.z_dim).split(B)
            clock.add("other", t0)
            for (name, module, opt, interval), z in zip(phases, all_z, strict=True):
                if state["batch_idx"] % interval:
                    continue
                t0 = _now()
                opt.zero_grad(set_to_none=True)
                module.requires_grad_(True)
                lossobj.accumulate_gradients(
                    phase=name, real_img=real, real_c=c, gen_z=z, gen_c=c, sync=True, gain=interval
                )
                module.requires_grad_(False)
                for param in module.parameters():
                    if param.grad is not None:
                        torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
                opt.step()
                clock.add(name, t0)
            t0 = _now()
            with torch.no_grad():
                ema_nimg = min(B * 10 / 32 * 1000, state["cur_nimg"] * 0.05)
                beta = 0.5 ** (B / max(ema_nimg, 1e-8))
                for p_ema, p in zip(G_ema.parameters(), G.parameters(), strict=True):
                    p_ema.copy_(p.lerp(p_ema, beta))
                for b_ema, b in zip(G_ema.buffers(), G.buffers(), strict=True):
                    b_ema.copy_(b)
            clock.add("ema", t0)
            state["cur_nimg"] += B
            state["batch_idx"] += 1
            t0 = _now()
            if state["batch_idx"] % cfg.ada_interval == 0:
                ada_stats.update()
                adjust = (
                    np.sign(ada_stats["Loss/signs/real"] - cfg.ada_target)
                    * (B * cfg.ada_interval)
                    / (cfg.ada_kimg * 1000)
                )
                pipe.p.copy_((pipe.p + adjust).max(torch.zeros([])))
            clock.add("ada", t0)
        t1 = _now()
        seconds = (t1[0] - t_start[0], t1[1] - t_start[1])
        if sampled:
            return _scale_sampled(seconds, clock.seconds, {"Greg": cfg.G_reg_interval, "Dreg": cfg.D_reg_interval})
        return seconds, clock.seconds

    info = {
        "batch_size": B,
        "resolution": cfg.resolution,
        "config": base,
        "augment": "bgc (its default)",
        "G_params": sum(p.numel() for p in G.parameters()),
        "D_params": sum(p.numel() for p in D.parameters()),
    }
    return cycle, info


def worker(a: argparse.Namespace) -> None:
    """Build one column, then run a cycle per 'cycle' line on stdin; one JSON line per cycle on stdout."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the code under test prints goes to stderr
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.worker == "reference":
        cycle, info = _reference(a.config, a.reference)
    else:
        cycle, info = _ours(a.config, json.loads(a.options), a.lib)
    out.write(json.dumps({"ready": info, "rss_mib": _rss_mib()}) + "\n")
    for line in sys.stdin:
        if line.strip() != "cycle":
            break
        dt, phases = cycle(a.sampled)
        out.write(json.dumps({"seconds": dt, "phases": phases, "peak_rss_mib": _rss_mib()}) + "\n")


def _spawn(
    a: argparse.Namespace, config: str, kind: str, options: dict | None = None, lib: str | None = None
) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", kind, "--config", config, "--threads", str(a.threads)]
    cmd += ["--sampled"] if a.sampled else []
    if kind == "reference":
        cmd += ["--reference", a.reference]
    else:
        cmd += ["--options", json.dumps(options or {})] + (["--lib", lib] if lib else [])
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)


def _ask(proc: subprocess.Popen) -> dict:
    proc.stdin.write("cycle\n")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"worker {proc.args} died")
    return json.loads(line)


def _summary(name: str, info: dict, first: dict, runs: list[dict]) -> dict:
    """Per clock (wall, CPU): median cycle, images/s, s/kimg, and the mean seconds per cycle of each phase."""
    imgs, res = CYCLE * info["batch_size"], {}
    for i, clock in enumerate(("wall", "cpu")):
        secs = sorted(r["seconds"][i] for r in runs)
        med = secs[len(secs) // 2]
        names = sorted({k for r in runs for k in r["phases"]} - {"other"})
        phases = {k: sum(r["phases"].get(k, (0.0, 0.0))[i] for r in runs) / len(runs) for k in names}
        phases["other"] = sum(secs) / len(secs) - sum(
            phases.values()
        )  # data, latents, zero_grad, gradient clean-up, loop
        res[clock] = {
            "cycle_s": secs,
            "step_s": med / CYCLE,
            "images_per_s": imgs / med,
            "s_per_kimg": med / imgs * 1000,
            "phase_s_per_cycle": phases,
        }
    return {
        "column": name,
        **info,
        "cycles": len(runs),
        **res,
        "first_cycle_wall_s": first["seconds"][0] if first else None,
        "peak_rss_mib": runs[-1]["peak_rss_mib"],
    }


def drive(a: argparse.Namespace) -> None:
    out = Path(a.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc["results"] = [r for r in doc.get("results", []) if "config_name" in r]  # an older format's entries go
    doc["machine"] = {"cpu": _cpu_name(), "threads": a.threads, "python": platform.python_version()}
    doc["method"] = __doc__.split("\n\n")[1].replace("\n", " ")
    for config in a.configs.split(","):
        columns = {}
        for v in a.ours.split(",") if a.ours else []:
            opts = {k: val for flag in v.split("+") if flag != "fp32" for k, val in VARIANT_FLAGS[flag].items()}
            columns[f"ours-{v}"] = _spawn(a, config, "ours", opts)
        if a.before:
            columns["before-fp32"] = _spawn(a, config, "ours", {}, lib=a.before)
        if a.reference:
            columns["reference-fp32"] = _spawn(a, config, "reference")
        infos = {n: json.loads(p.stdout.readline())["ready"] for n, p in columns.items()}
        first = {n: _ask(p) if a.warmup else None for n, p in columns.items()}
        runs = {n: [] for n in columns}
        for i in range(a.cycles):
            for n, p in columns.items():
                runs[n].append(_ask(p))
                r = runs[n][-1]
                print(
                    f"{config} {n:22s} cycle {i}: wall {r['seconds'][0]:8.2f} s, CPU {r['seconds'][1]:8.2f} s",
                    flush=True,
                )
        for n, p in columns.items():
            p.stdin.close()
            p.wait()
            s = {"config_name": config, "label": a.label, **_summary(n, infos[n], first[n], runs[n])}
            doc["results"] = [
                r for r in doc["results"] if (r["config_name"], r["column"], r.get("label")) != (config, n, a.label)
            ] + [s]
            print(
                f"{config} {n:22s} CPU clock: {s['cpu']['images_per_s']:7.2f} img/s "
                f"{s['cpu']['s_per_kimg']:8.1f} s/kimg "
                f"(wall {s['wall']['images_per_s']:.2f} img/s)  peak RSS {s['peak_rss_mib']:.0f} MiB  "
                + " ".join(f"{k} {v:.2f}" for k, v in s["cpu"]["phase_s_per_cycle"].items()),
                flush=True,
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")


def _cpu_name() -> str:
    try:
        return next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="demo64", help=f"comma-separated: {', '.join(CONFIGS)}")
    ap.add_argument("--cycles", type=int, default=3, help="timed cycles per column (after one warm-up cycle)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false", help="time from the first cycle (256^2 on CPU)")
    ap.add_argument(
        "--ours",
        default="fp32",
        help=f"comma-separated variants, each '+'-joined flags of fp32, {', '.join(VARIANT_FLAGS)}",
    )
    ap.add_argument("--before", default=None, help="lib/ folder of another checkout: a 'before-fp32' column")
    ap.add_argument("--reference", default=None, help="a stylegan2-ada-pytorch clone: a 'reference-fp32' column")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sampled", action="store_true", help="time one step running every phase, scaled to a cycle")
    ap.add_argument("--label", default=None, help="tag stored with each result (e.g. a commit)")
    ap.add_argument("--out", default="benchmarks/results/gan_throughput.json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--lib", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    worker(a) if a.worker else drive(a)


if __name__ == "__main__":
    main()
