"""ClamNet benchmarks, two tasks.

`openkbp`: the weak task of OpenKBP head-and-neck CT (labelfactory.clamnet.openkbp): slices labelled
abnormal when they hold PTV70, pixel truth PTV70 (tumour plus margin, not a lesion outline) for
evaluation only. ClamNet vs Grad-CAM vs a fully supervised UNet++ (the ceiling) and ClamNet
ablations, same steps for all (labelfactory.clamnet.experiment); writes JSON, markdown and a PNG.

    .venv/bin/python benchmarks/clamnet.py openkbp [--root ../shared/datasets/openkbp --steps 600]

`sample`: speed on 256^2 slices, and Dice / IoU of ClamNet vs the Grad-CAM baseline on the
sample weak task (thorax CT with aortic dissection: false-lumen slices 'abnormal', truth = false-lumen
mask; the other studies' aorta slices 'normal'), on a slab split so train and test slices never touch.
Also reported: 'organ' = the whole aorta mask as the prediction, the floor any method must beat here
(the false lumen fills about half the aorta). Truth masks are TotalSegmentator output, not hand-drawn.

    .venv/bin/python benchmarks/clamnet.py sample [--size 64 --steps 150 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from labelfactory.checkpoints import code_version
from labelfactory.clamnet.cam import CamConfig, cam_maps, train_classifier
from labelfactory.clamnet.data import WeakSlices, load_weak_slices
from labelfactory.clamnet.evaluate import score_maps, split_by_slab
from labelfactory.clamnet.experiment import ABLATIONS, BASELINES, FLOOR, Budget, run_experiment
from labelfactory.clamnet.infer import predict_crops
from labelfactory.clamnet.loss import clamnet_loss
from labelfactory.clamnet.openkbp import WeakTask, load_weak_task
from labelfactory.clamnet.pairs import PairSampler
from labelfactory.clamnet.report import markdown, picture
from labelfactory.clamnet.train import ClamNetConfig, build_pair, train_clamnet
from labelfactory.datasets.openkbp import read_cases
from labelfactory.jsonio import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample-data"
SHARED_OPENKBP = REPO.parent / "shared" / "datasets" / "openkbp"
RESULTS = REPO / "benchmarks" / "results"
DOCS_RESULTS = REPO / "docs" / "results"


def speed(device: torch.device, steps: int = 3, batch: int = 4) -> dict[str, float]:
    """Training steps/s (pair batch of `batch` at 256^2, default widths) and inference ms per 256^2 slice."""
    cfg = ClamNetConfig()
    pair = build_pair(cfg).to(device)
    n = 8
    x = torch.randn(n, 1, 256, 256).clamp(-1, 1)
    organ = torch.ones(n, 1, 256, 256)
    sampler = PairSampler(x, torch.arange(n) % 2 == 0, torch.full((n,), 0.5), organ)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(pair.parameters(), lr=1e-3)
    pair.train()
    times = []
    for _ in range(steps + 1):
        b = sampler.sample(batch, gen)
        t = time.perf_counter()
        loss = clamnet_loss(pair.a(b.xa.to(device)), pair.b(b.xb.to(device)), _to(b, device), cfg.marker_fraction)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    pair.eval()
    predict_crops(pair, x[:1].to(device), organ[:1].to(device))
    t = time.perf_counter()
    predict_crops(pair, x.to(device), organ.to(device))
    return {
        "train_steps_per_s": 1 / (sum(times[1:]) / steps),
        "train_batch": batch,
        "infer_ms_per_slice": 1000 * (time.perf_counter() - t) / n,
    }


def _to(b, device):
    for k in ("xa", "xb", "organ_a", "organ_b", "abnormal_a", "abnormal_b", "eta_a", "eta_b", "valid"):
        setattr(b, k, getattr(b, k).to(device))
    return b


def quality(size: int, steps: int, features: tuple[int, ...], seed: int) -> dict:
    cfg = ClamNetConfig(size=size, features=features, steps=steps, batch=8, lr=3e-3, seed=seed)
    slices = load_weak_slices(
        SAMPLE / "datastore",
        SAMPLE / "datastore" / "image_labels.csv",
        cfg.organ,
        [SAMPLE / "datastore" / "reference"],
        "aorta_false_lumen",
        size,
        cfg.margin_mm,
        cfg.ct_window,
        cfg.eta,
    )
    train, test = split_by_slab(slices, slab=12, gap=4, test_every=3)
    t = time.time()
    pair, hist = train_clamnet(train, cfg)
    t_clam = time.time() - t
    t = time.time()
    clf, chist = train_classifier(train, CamConfig(steps=steps, batch=8, lr=1e-3, seed=seed))
    t_cam = time.time() - t
    maps = {
        "clamnet": predict_crops(pair, test.x, test.organ),
        "gradcam": cam_maps(clf, test.x, test.organ),
        "organ": test.organ[:, 0],
    }
    scores = {name: score_maps(m, test, cfg.threshold) | _where_it_looks(m, test) for name, m in maps.items()}
    return {
        "config": {
            "size": size,
            "steps": steps,
            "features": list(features),
            "seed": seed,
            "marker_fraction": cfg.marker_fraction,
            "eta": cfg.eta,
            "split": "slab 12, gap 4, every 3rd slab test",
        },
        "data": {
            "train_slices": len(train),
            "train_abnormal": int(train.abnormal.sum()),
            "test_slices": len(test),
            "test_abnormal": int(test.abnormal.sum()),
        },
        "scores": scores,
        "loss": {
            "clamnet_first10": sum(hist[:10]) / 10,
            "clamnet_last10": sum(hist[-10:]) / 10,
            "cam_last10": sum(chist[-10:]) / 10,
        },
        "train_s": {"clamnet": t_clam, "cam": t_cam},
    }


def _where_it_looks(maps: torch.Tensor, test) -> dict[str, float]:
    """Mean map value on the truth vs on the rest of the organ of abnormal test slices (threshold-free)."""
    ab = test.abnormal & test.has_truth
    truth, organ = test.truth[ab, 0] > 0.5, test.organ[ab, 0] > 0.5
    m = maps[ab]
    return {"mean_on_truth": m[truth].mean().item(), "mean_on_rest_of_organ": m[organ & ~truth].mean().item()}


def sample_task(args: argparse.Namespace) -> None:
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    out = {
        "machine": _machine(),
        "speed": {d.type: speed(d) for d in devices},
        "quality": quality(args.size, args.steps, tuple(args.features), args.seed),
    }
    q = out["quality"]["scores"]
    for name, s in out["speed"].items():
        print(
            f"{name}: {s['train_steps_per_s']:.3f} train steps/s (batch {s['train_batch']} pairs, 256^2), "
            f"{s['infer_ms_per_slice']:.0f} ms per 256^2 slice"
        )
    for name in ("clamnet", "gradcam", "organ"):
        print(
            f"{name:8s} Dice {q[name]['dice']:.3f}  IoU {q[name]['iou']:.3f}  ({q[name]['slices']} test slices, "
            f"{q[name]['abnormal_slices']} abnormal); mean map on truth {q[name]['mean_on_truth']:.3f} "
            f"vs rest of organ {q[name]['mean_on_rest_of_organ']:.3f}"
        )
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        write_json_atomic(out, args.json, 2)


def _machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _load(train_cases, val_cases, task: WeakTask, cache: Path | None) -> tuple[WeakSlices, WeakSlices]:
    """The train and validation slices, from `cache` when it holds these cases at this task (parallel runs share it)."""
    key = {"train": [c.name for c in train_cases], "validation": [c.name for c in val_cases], "task": asdict(task)}
    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved["key"] == key:
            return WeakSlices(**saved["train"]), WeakSlices(**saved["validation"])
    train, evaluation = load_weak_task(train_cases, task), load_weak_task(val_cases, task)
    if cache is not None:
        tmp = cache.with_suffix(".tmp")
        torch.save({"key": key, "train": vars(train), "validation": vars(evaluation)}, tmp)
        tmp.replace(cache)
    return train, evaluation


def openkbp_task(args: argparse.Namespace) -> None:
    task = WeakTask(size=args.size)
    train_cases = read_cases(args.root, "train")[: args.train_patients or None]
    val_cases = read_cases(args.root, "validation")[: args.val_patients or None]
    t = time.time()
    train, evaluation = _load(train_cases, val_cases, task, args.cache)
    names = {c.name for c in train_cases[: args.threshold_patients]}
    threshold_set = train.subset(np.nonzero([s in names for s in train.study])[0])
    print(f"loaded {len(train)} train and {len(evaluation)} validation slices in {time.time() - t:.0f} s")
    budget = Budget(
        steps=args.steps,
        batch=args.batch,
        seed=args.seed,
        features=tuple(args.features),
        cam_widths=tuple(args.cam_widths),
        marker_fraction=args.marker_fraction,
    )
    result = run_experiment(args.methods, train, threshold_set, evaluation, budget, args.work)
    result["machine"] = _machine()
    result["code"] = code_version()
    result["task"] = asdict(task) | {"root": str(args.root)}
    command = "benchmarks/clamnet.py openkbp " + " ".join(sys.argv[2:])
    write_json_atomic(result, args.out.with_suffix(".json"))
    args.out.with_suffix(".md").write_text(markdown(result, "ClamNet on OpenKBP PTV70 from slice labels", command))
    shown = [m for m in ("clamnet", "gradcam", "supervised") if m in result["methods"]]
    saved = {m: torch.load(Path(args.work) / f"{m}.pt", weights_only=True) for m in shown}
    if shown:
        picture(
            evaluation,
            saved[shown[0]]["indices"],
            {m: saved[m]["maps"] for m in shown},
            {m: result["methods"][m]["threshold"] for m in shown},
            args.png,
        )
    print(args.out.with_suffix(".md").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the CPU is shared; 1 avoids oversubscription)")
    sub = ap.add_subparsers(dest="task", required=True)
    sp = sub.add_parser("sample", help="speed, and the bundled aortic dissection case")
    sp.add_argument("--size", type=int, default=64)
    sp.add_argument("--steps", type=int, default=150)
    sp.add_argument("--features", type=int, nargs=6, default=[8, 8, 16, 32, 64, 8])
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--json", type=Path, default=None)
    op = sub.add_parser(
        "openkbp", help="OpenKBP PTV70 from slice labels: ClamNet vs Grad-CAM vs the supervised ceiling"
    )
    d = Budget()
    op.add_argument("--root", type=Path, default=SHARED_OPENKBP, help="OpenKBP layout (cases.csv, volumes/)")
    op.add_argument("--size", type=int, default=64)
    op.add_argument("--steps", type=int, default=d.steps)
    op.add_argument("--batch", type=int, default=d.batch)
    op.add_argument("--seed", type=int, default=d.seed)
    op.add_argument("--features", type=int, nargs=6, default=list(d.features))
    op.add_argument("--cam-widths", type=int, nargs=4, default=list(d.cam_widths))
    op.add_argument("--marker-fraction", type=float, default=d.marker_fraction)
    op.add_argument("--train-patients", type=int, default=0, help="first N train patients (0: all)")
    op.add_argument("--val-patients", type=int, default=0, help="first N validation patients (0: all)")
    op.add_argument("--threshold-patients", type=int, default=20, help="first N train patients choose the thresholds")
    op.add_argument("--methods", nargs="+", default=[*BASELINES, FLOOR] + [f"clamnet_{a}" for a in ABLATIONS])
    op.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "clamnet-openkbp",
        help="per-method records (a rerun resumes); delete it to start over",
    )
    op.add_argument("--cache", type=Path, default=None, help="file holding the loaded slices (written if absent)")
    op.add_argument("--out", type=Path, default=RESULTS / "clamnet_openkbp", help="writes <out>.json and <out>.md")
    op.add_argument("--png", type=Path, default=DOCS_RESULTS / "clamnet-openkbp.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sample_task(args) if args.task == "sample" else openkbp_task(args)


if __name__ == "__main__":
    main()
