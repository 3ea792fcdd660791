"""Every trainer and infer on one device, timed at the OpenKBP sample's sizes, with the issue-29 goals beside them.

Rows: the DatasetGAN interpreter's retrain on 30 annotated images (`fit_interpreter`); synthesis pairs/s at 64^2
(the sample's models) per seed and in blocks of 32, and at 256^2 (paper256 widths, random weights: the cost does
not depend on them); the segmenter's network on a 128-slice volume, fp32 and bf16, and the Dice between the two;
ClamNet's training step and its infer; the StyleGAN2 training step at 256^2, batch 32, fp32 and bf16. Each row runs
on its own: a failure or a missing module (SimpleITK, MONAI on a bare machine) fails that row only, and a row
that would start past the time budget is skipped. Prints a table and writes JSON.

`--cpu-smoke`: tiny sizes on the CPU, to prove the script end to end where no GPU is (a minute or two).
Usage: scripts/gpu_check.sh [--cpu-smoke] [--out gpu_check.json] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))
SAMPLE_MODELS = REPO / "sample-data" / "openkbp" / "models"
FULL = dict(
    records=30,
    seeds=256,
    seeds_per_seed=32,
    block=32,
    res256=256,
    volume=128,
    crops=128,
    clamnet_steps=50,
    gan_steps=32,
)
SMOKE = dict(records=3, seeds=4, seeds_per_seed=2, block=2, res256=32, volume=4, crops=4, clamnet_steps=2, gan_steps=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds of one call of `fn`, the device's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def sample_interpreter(device: torch.device, precision: str = "auto"):
    from labelfactory.datasetgan.labeller import load_interpreter
    from labelfactory.stylegan2.checkpoint import load_generator

    G = load_generator(SAMPLE_MODELS / "stylegan2.pt", device)
    return load_interpreter(SAMPLE_MODELS / "datasetgan.pt", G, precision)


def check_interpreter_retrain(device: torch.device, n: dict, smoke: bool) -> list[dict]:
    """fit_interpreter on n['records'] generated images, masks = the sample interpreter's own votes."""
    from labelfactory.datasetgan.records import LatentRecord
    from labelfactory.datasetgan.taps import ws_from_seeds
    from labelfactory.datasetgan.train import DatasetGANConfig, fit_interpreter

    interp = sample_interpreter(device)
    seeds = list(range(10_000, 10_000 + n["records"]))
    ws = ws_from_seeds(interp.G, seeds, 0.7)
    masks = interp.label(ws).mask.cpu().numpy().astype("uint8")
    records = [LatentRecord(ws[i, 0].cpu(), masks[i], f"seed{s}", s, 0.7) for i, s in enumerate(seeds)]
    cfg = DatasetGANConfig(max_epochs=1, members=2) if smoke else DatasetGANConfig()
    fit = {}
    seconds = timed(device, lambda: fit.update(f=fit_interpreter(interp.G, records, interp.label_names, cfg)))
    epochs = len(fit["f"].history["epoch_loss"])
    return [row("interpreter retrain", f"{len(records)} images, {epochs} epochs", seconds, "s", "<= 30", seconds <= 30)]


def synthesis_rate(interp, device: torch.device, seeds: int, block: int) -> float:
    from labelfactory.datasetgan.synthesis import block_seeds
    from labelfactory.datasetgan.taps import ws_from_seeds

    def run():
        for first in range(0, seeds, block):
            interp.label(ws_from_seeds(interp.G, block_seeds(first, block), 0.7))

    interp.label(ws_from_seeds(interp.G, block_seeds(0, block), 0.7))  # warm-up (kernels, allocator)
    return seeds / timed(device, run)


def check_synthesis(device: torch.device, n: dict, smoke: bool) -> list[dict]:
    """Pairs/s at 64^2 per seed and in blocks (auto precision: bf16 on CUDA), in blocks at fp32 and the votes
    of the two agreeing; at 256^2 (paper256 networks, random weights) in blocks."""
    from labelfactory.datasetgan.ensemble import EnsembleConfig, PixelEnsemble
    from labelfactory.datasetgan.labeller import Interpreter
    from labelfactory.datasetgan.taps import TapLayout
    from labelfactory.stylegan2.config import PRESETS
    from labelfactory.stylegan2.networks import Generator

    interp = sample_interpreter(device, "bf16" if smoke else "auto")  # the smoke takes the bf16 path on the CPU
    one = synthesis_rate(interp, device, n["seeds_per_seed"], 1)
    many = synthesis_rate(interp, device, n["seeds"], n["block"])
    rows = [
        row("synthesis 64^2", "per seed", one, "pairs/s"),
        row(
            "synthesis 64^2",
            f"blocks of {n['block']}",
            many,
            "pairs/s",
            f">= 5x per seed ({5 * one:.1f})",
            many >= 5 * one,
        ),
    ]
    if interp.precision != "fp32":
        from labelfactory.datasetgan.taps import ws_from_seeds

        fp32 = sample_interpreter(device, "fp32")
        rows.append(
            row(
                "synthesis 64^2 fp32",
                f"blocks of {n['block']}",
                synthesis_rate(fp32, device, n["seeds"], n["block"]),
                "pairs/s",
            )
        )
        ws = ws_from_seeds(interp.G, list(range(n["seeds"])), 0.7)
        agree = float((interp.label(ws).mask == fp32.label(ws).mask).float().mean())
        what = f"votes equal, {n['seeds']} slices of 64^2"
        rows.append(row(f"interpreter {interp.precision} vs fp32", what, agree, "", ">= 0.999", agree >= 0.999))
    cfg = PRESETS["demo" if smoke else "paper256"].with_overrides(resolution=n["res256"])
    torch.manual_seed(0)
    G = Generator(**cfg.generator_kwargs).to(device).eval().requires_grad_(False)
    layout = TapLayout.of(G)
    ens = PixelEnsemble(EnsembleConfig(layout.channels, layout.resolutions, layout.image_resolution, 8))
    big = Interpreter(G, ens.to(device), {f"c{i}": i for i in range(8)})
    rate = synthesis_rate(big, device, n["seeds"], n["block"])
    rows.append(row(f"synthesis {n['res256']}^2", f"blocks of {n['block']}", rate, "pairs/s", ">= 50", rate >= 50))
    return rows


def check_segmentation(device: torch.device, n: dict, smoke: bool) -> list[dict]:
    """The sample segmenter's network on a volume of n['volume'] slices (generated CT), fp32 and bf16."""
    import torch.nn.functional as F

    from labelfactory.datasetgan.taps import ws_from_seeds
    from labelfactory.segmentation.infer import load_segmenter, predict_slices

    seg = load_segmenter(SAMPLE_MODELS / "segmentation.pt", device)
    interp = sample_interpreter(device)
    images = []
    for first in range(0, n["volume"], 32):
        ws = ws_from_seeds(interp.G, list(range(first, min(first + 32, n["volume"]))), 0.7)
        images.append(interp.G.synthesis(ws, noise_mode="const").float().clamp(-1, 1).cpu())
    x = F.interpolate(torch.cat(images), size=seg.size, mode="bilinear", align_corners=False)
    out, rows = {}, []
    for precision in ("fp32", "bf16"):
        predict_slices(seg.network, x[:16], 16, precision)  # warm-up: cuDNN autotuning
        seconds = timed(device, lambda p=precision: out.update({p: predict_slices(seg.network, x, 16, p)}))
        goal = "<= 2 (a 3D CT volume)" if precision == "bf16" else ""
        rows.append(
            row(f"segmentation {precision}", f"{len(x)} slices of {seg.size}^2", seconds, "s", goal, seconds <= 2)
        )
    dice = mean_dice(out["fp32"], out["bf16"], max(seg.label_names.values()) + 1)
    rows.append(row("segmentation bf16 vs fp32", "mean Dice over classes present", dice, "", ">= 0.995", dice >= 0.995))
    return rows


def mean_dice(a: torch.Tensor, b: torch.Tensor, classes: int) -> float:
    """Mean Dice of masks a and b over the classes 1.. present in either (1.0 when none is)."""
    scores = []
    for c in range(1, classes):
        x, y = a == c, b == c
        total = int(x.sum() + y.sum())
        if total:
            scores.append(2 * int((x & y).sum()) / total)
    return sum(scores) / len(scores) if scores else 1.0


def check_clamnet(device: torch.device, n: dict, smoke: bool) -> list[dict]:
    """fit_clamnet on random organ crops (the cost does not depend on the pixels), then its infer on n['crops']."""
    from labelfactory.clamnet.data import WeakSlices
    from labelfactory.clamnet.infer import predict_crops
    from labelfactory.clamnet.train import ClamNetConfig, fit_clamnet

    cfg = ClamNetConfig(steps=n["clamnet_steps"], near_negatives=0)
    if smoke:
        cfg = ClamNetConfig(size=32, features=(4, 4, 8, 8, 16, 4), steps=n["clamnet_steps"], batch=2, near_negatives=0)
    N, S = 64, cfg.size
    gen = torch.Generator().manual_seed(0)
    abnormal = torch.arange(N) % 2 == 1
    slices = WeakSlices(
        x=torch.rand(N, 1, S, S, generator=gen) * 2 - 1,
        organ=torch.ones(N, 1, S, S),
        truth=torch.zeros(N, 1, S, S),
        has_truth=torch.zeros(N, dtype=torch.bool),
        abnormal=abnormal,
        eta=torch.full((N,), 0.5),
        study=[f"s{i // 8}" for i in range(N)],
        file_slice=torch.arange(N),
    )
    fit = {}
    seconds = timed(device, lambda: fit.update(f=fit_clamnet(slices, cfg, device=device)))
    pair = fit["f"].pair
    crops, organ = slices.x[:1].expand(n["crops"], -1, -1, -1), slices.organ[:1].expand(n["crops"], -1, -1, -1)
    predict_crops(pair, crops[:8], organ[:8])  # warm-up
    infer = timed(device, lambda: predict_crops(pair, crops, organ))
    return [
        row("clamnet train", f"{cfg.steps} steps, batch {cfg.batch}, {S}^2", seconds / cfg.steps, "s/step"),
        row("clamnet infer", f"{n['crops']} crops of {S}^2", infer, "s"),
    ]


def check_gan_step(device: torch.device, n: dict, smoke: bool) -> list[dict]:
    """Our StyleGAN2-ADA training step (every phase at its lazy interval), fp32 and bf16 mixed precision."""
    import tempfile

    from labelfactory.stylegan2.config import PRESETS
    from labelfactory.stylegan2.training import Trainer

    base = PRESETS["demo"].with_overrides(batch_size=4) if smoke else PRESETS["paper256"].with_overrides(batch_size=32)
    rows = []
    for mixed in (False, True):
        cfg = base.with_overrides(fid_kimg=0.0, mixed_precision=mixed)
        images = torch.rand(64, 1, cfg.resolution, cfg.resolution) * 2 - 1
        with tempfile.TemporaryDirectory() as run_dir:
            t = Trainer(cfg, images, run_dir, progress=False, device=device)
            t.step()  # warm-up: builds, autotunes
            steps = n["gan_steps"]  # full: two lazy cycles, every phase at its interval
            seconds = timed(device, lambda t=t, k=steps: [t.step() for _ in range(k)])
        name = "bf16" if mixed else "fp32"
        what = f"{cfg.resolution}^2, batch {cfg.batch_size}, {steps} steps"
        rows.append(row(f"gan step {name}", what, seconds / steps, "s/step"))
    rows.append(row("gan step reference", "not run: NVlabs stylegan2-ada-pytorch is not built here", None, ""))
    return rows


CHECKS = {
    "interpreter": check_interpreter_retrain,
    "synthesis": check_synthesis,
    "segmentation": check_segmentation,
    "clamnet": check_clamnet,
    "gan": check_gan_step,
}


def row(check: str, what: str, value: float | None, unit: str, goal: str = "", ok: bool | None = None) -> dict:
    return {"check": check, "what": what, "value": value, "unit": unit, "goal": goal, "ok": ok if goal else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--cpu-smoke", action="store_true", help="tiny sizes on the CPU: proves the script, measures nothing"
    )
    p.add_argument("--device", default=None, help="default: cuda (cpu with --cpu-smoke)")
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    p.add_argument("--budget-s", type=float, default=420.0, help="no row starts after this many seconds (default 420)")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma list of {', '.join(CHECKS)}")
    args = p.parse_args(argv)
    start = time.perf_counter()
    from labelfactory.devices import resolve_device

    device = resolve_device(args.device or ("cpu" if args.cpu_smoke else "cuda"))
    if args.cpu_smoke:
        torch.set_num_threads(1)  # a shared CPU: spinning OpenMP threads make tiny work many times slower
    sizes = SMOKE if args.cpu_smoke else FULL
    rows: list[dict] = []
    for name in args.only.split(","):
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            rows.append(row(name, f"skipped: {elapsed:.0f} s of the {args.budget_s:.0f} s budget used", None, ""))
            continue
        try:
            rows += CHECKS[name](device, sizes, args.cpu_smoke)
        except Exception as e:  # one row's failure (a missing module on a bare machine) must not end the others
            rows.append(row(name, f"failed: {type(e).__name__}: {e}"[:200], None, ""))
        print(f"[{time.perf_counter() - start:6.1f} s] {name} done", file=sys.stderr, flush=True)
    result = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "smoke": args.cpu_smoke,
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    print(f"\n{result['gpu'] or device} (torch {torch.__version__}){'  [CPU smoke: sizes are tiny]' * args.cpu_smoke}")
    print(f"{'check':<26} {'what':<44} {'value':>10} {'unit':<8} {'goal':<24} ok")
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.4g}"
        ok = {True: "yes", False: "NO", None: ""}[r["ok"]]
        print(f"{r['check']:<26} {r['what'][:44]:<44} {value:>10} {r['unit']:<8} {r['goal']:<24} {ok}")
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out} ({result['seconds']} s)")
    return 1 if any(r["what"].startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
