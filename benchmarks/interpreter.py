"""Style interpreter at 256^2 with the default generator (random weights), 10 members, hidden 256 -> 128.

(a) train: fit the ensemble on 30 annotated generated images (masks: 4 intensity bands of each
    image, so there is something to learn); wall time, epochs, peak RSS.
(b) synth-*: one pair (generator + taps + ensemble + vote + uncertainty), factorized vs the naive
    DatasetGAN form (upsample every tap, concatenate, per-member MLP with unfolded BN), same
    weights; seconds (median of --repeats after a warm-up), peak RSS, logits and vote agreement.
    The factorized pair is timed as Interpreter.label runs it (FactorizedEnsemble.vote_and_uncertainty);
    its logits for the agreement check come from an untimed forward() on the same taps.
    Coarse-to-fine is measured as well, with its agreement against the exact form.
Each part runs in its own process so peak RSS is its own.
Usage: python benchmarks/interpreter.py [--parts train,synth] [--max-epochs 30] [--repeats 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from labelfactory.datasetgan import (
    DatasetGANConfig,
    EnsembleConfig,
    LatentRecord,
    PixelEnsemble,
    TapLayout,
    generate_with_taps,
    train_ensemble,
    ws_from_seeds,
)
from labelfactory.datasetgan.ensemble import majority_vote
from labelfactory.datasetgan.uncertainty import image_score, js_divergence
from labelfactory.jsonio import write_json_atomic
from labelfactory.stylegan2.networks import Generator

K = 9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def default_generator() -> Generator:
    torch.manual_seed(0)
    return Generator().eval().requires_grad_(False)


def part_train(args) -> dict:
    G = default_generator()
    seeds = list(range(30))
    records = []
    for s in seeds:
        ws = ws_from_seeds(G, [s], 0.7)
        img, _ = generate_with_taps(G, ws)
        q = torch.quantile(img[0, 0].flatten(), torch.tensor([0.25, 0.5, 0.75]))
        records.append(
            LatentRecord(ws[0, 0], torch.bucketize(img[0, 0], q).numpy().astype(np.int64), f"seed{s}", s, 0.7)
        )
    cfg = DatasetGANConfig(max_epochs=args.max_epochs)
    t0 = time.perf_counter()
    _, history = train_ensemble(G, records, K, cfg, progress=False)
    secs = time.perf_counter() - t0
    return {
        "part": "train",
        "images": 30,
        "resolution": 256,
        "members": cfg.members,
        "hidden": list(cfg.hidden),
        "seconds": round(secs, 1),
        "epochs": len(history["epoch_loss"]),
        "seconds_per_epoch": round(secs / len(history["epoch_loss"]), 1),
        "first_loss": history["epoch_loss"][0],
        "best_loss": history["best_loss"],
        "stopped_early": history["stopped_early"],
        "peak_rss_gb": round(peak_rss_gb(), 2),
    }


def random_ensemble(G) -> PixelEnsemble:
    layout = TapLayout.of(G)
    ens = PixelEnsemble(EnsembleConfig(layout.channels, layout.resolutions, G.img_resolution, K))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial BN so folding matters
        for bn in (ens.bn1, ens.bn2):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return ens.eval()


@torch.no_grad()
def naive_logits(ens: PixelEnsemble, taps: list[torch.Tensor]) -> torch.Tensor:
    """Upsample every tap, concatenate (C_total, R*R), first layer for all members in one matmul, BN unfolded."""
    R = ens.config.image_resolution
    M, (H1, H2) = ens.config.members, ens.config.hidden
    x = torch.cat([F.interpolate(t, size=(R, R), mode="bilinear", align_corners=False) for t in taps], 1).reshape(
        -1, R * R
    )
    h = torch.relu(ens.w1.permute(0, 2, 1).reshape(M * H1, -1) @ x + ens.b1.reshape(-1, 1))
    del x
    h = F.batch_norm(
        h.T, ens.bn1.running_mean, ens.bn1.running_var, ens.bn1.weight, ens.bn1.bias, False, 0.0, ens.bn1.eps
    ).T.reshape(M, H1, -1)
    h = torch.relu(torch.bmm(ens.w2.transpose(1, 2), h) + ens.b2[:, :, None]).reshape(M * H2, -1)
    h = F.batch_norm(
        h.T, ens.bn2.running_mean, ens.bn2.running_var, ens.bn2.weight, ens.bn2.bias, False, 0.0, ens.bn2.eps
    ).T.reshape(M, H2, -1)
    return (torch.bmm(ens.w3.transpose(1, 2), h) + ens.b3[:, :, None]).reshape(1, M, K, R, R)


def part_synth(args, mode: str) -> dict:
    G, ens = default_generator(), None
    ens = random_ensemble(G)
    forms = {"factorized": ens.factorized(), "naive": lambda taps: naive_logits(ens, taps)}
    run = forms[mode]
    ws = ws_from_seeds(G, [123], 0.7)

    def pair():
        _, taps = generate_with_taps(G, ws)
        if mode == "factorized":  # what Interpreter.label runs: vote and uncertainty band by band, no full logits
            vote, js = run.vote_and_uncertainty(taps)
        else:
            logits = run(taps)
            del taps
            vote, js = majority_vote(logits), js_divergence(logits)
        return vote, image_score(js)

    with torch.no_grad():
        pair()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            vote, _ = pair()
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _, taps = generate_with_taps(G, ws)
        gen_s = time.perf_counter() - t0
        logits = run(taps)  # untimed, for the logit agreement check
    torch.save({"logits": logits, "vote": vote}, f"{args.tmp}/{mode}.pt")
    return {
        "part": f"synth-{mode}",
        "seconds": round(float(np.median(times)), 3),
        "generator_seconds": round(gen_s, 3),
        "peak_rss_gb": round(peak_rss_gb(), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="train,synth")
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="/tmp", help="where the synth parts leave their logits for the agreement check")
    args = p.parse_args()
    if args.child:
        res = part_train(args) if args.child == "train" else part_synth(args, args.child)
        print(json.dumps(res))
        return
    results = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
    }
    children = (["train"] if "train" in args.parts else []) + (["factorized", "naive"] if "synth" in args.parts else [])
    for child in children:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            child,
            "--max-epochs",
            str(args.max_epochs),
            "--repeats",
            str(args.repeats),
            "--tmp",
            args.tmp,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[child] = json.loads(out)
        print(json.dumps(results[child]), flush=True)
    if "synth" in args.parts:
        a, b = (torch.load(f"{args.tmp}/{m}.pt") for m in ("factorized", "naive"))
        results["agreement"] = {
            "factorized_vs_naive_max_abs_logit_diff": float((a["logits"].float() - b["logits"].float()).abs().max()),
            "logit_scale": float(b["logits"].float().abs().max()),
            "factorized_vs_naive_vote_agreement": float((a["vote"] == b["vote"]).float().mean()),
            "speedup_factorized": round(results["naive"]["seconds"] / results["factorized"]["seconds"], 2),
        }
        print(json.dumps(results["agreement"]))
    if args.out:
        write_json_atomic(results, args.out)


if __name__ == "__main__":
    main()
