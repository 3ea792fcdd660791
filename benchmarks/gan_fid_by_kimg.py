"""FID of OpenKBP generator snapshots by kimg, at psi 1 and at the synthesis psi (issue 23 item 4).

The reference is the label-efficiency protocol's: evenly spaced 64^2 body-crop slices of its dev patients
(`benchmarks/label_efficiency/dev_split.json`), so the figure that picks a snapshot never saw a test patient. The
Inception features of the reals are computed once; each snapshot's fakes come from one fixed seed. Prints a table,
writes a JSON (per snapshot: file, SHA-256, kimg, FID at each psi) and a PNG of FID against kimg.

    .venv/bin/python benchmarks/gan_fid_by_kimg.py --openkbp ../shared/datasets/openkbp \\
        --snapshots sample-data/openkbp/models/stylegan2.pt /work/runs/openkbp-gan64/snapshots/*.pt \\
        --out benchmarks/results/gan_fid_by_kimg.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from labelfactory.checkpoints import sha256_of
from labelfactory.datasets import openkbp
from labelfactory.evaluation.fid import FIDEvaluator
from labelfactory.jsonio import read_json, write_json_atomic
from labelfactory.latent_record import TRUNCATION_PSI
from labelfactory.segmentation.data import evenly_spaced
from labelfactory.stylegan2.checkpoint import load_generator

REPO = Path(__file__).resolve().parents[1]


def dev_slices(data: Path, dev_split: Path, size: int) -> torch.Tensor:
    """(N, 1, size, size) body crops in [-1, 1] of every slice of the dev split's patients."""
    dev = set(json.loads(dev_split.read_text())["dev"])
    cases = [c for c in openkbp.read_cases(data, "train") if c.name in dev]
    if len(cases) != len(dev):
        raise SystemExit(f"{data} lacks {len(dev) - len(cases)} of the dev split's patients")
    return torch.cat([openkbp.load_case(c, size).images for c in cases])


def plot(rows: list[dict], psis: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for psi in psis:
        pts = sorted((r["kimg"], r["fid"][psi]) for r in rows if r["fid"][psi] is not None)
        ax.plot([k for k, _ in pts], [f for _, f in pts], "o-", label=f"psi {psi}")
    ax.set_xlabel("kimg")
    ax.set_ylabel("FID vs dev slices (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--openkbp", type=Path, required=True, help="OpenKBP folder (cases.csv + volumes)")
    p.add_argument("--snapshots", type=Path, nargs="+", required=True, help="generator files (stylegan2.pt)")
    p.add_argument("--dev-split", type=Path, default=REPO / "benchmarks" / "label_efficiency" / "dev_split.json")
    p.add_argument("--images", type=int, default=2000, help="reals and fakes per FID (default 2000)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", type=Path, required=True, help="JSON; the PNG goes beside it")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    reals = dev_slices(args.openkbp, args.dev_split, args.size)
    evaluator = FIDEvaluator.create(reals[evenly_spaced(len(reals), args.images)], args.images)
    if evaluator is None:
        raise SystemExit("no Inception weights: run `python -m labelfactory.evaluation.fid_weights` first")
    psis = ["1.0", str(TRUNCATION_PSI)]
    done = {r["sha256"]: r for r in (read_json(args.out) or {}).get("snapshots", [])}  # resumable, by content
    rows = []
    for f in args.snapshots:
        digest = sha256_of(f)
        if digest not in done:
            G = load_generator(f)
            fid = {psi: evaluator(G, truncation_psi=float(psi)) for psi in psis}
            done[digest] = {"file": str(f), "sha256": digest, "kimg": float(G.checkpoint_info["kimg"]), "fid": fid}
        rows.append(done[digest])
        r = done[digest]
        print(f"{r['kimg']:8.1f} kimg  " + "  ".join(f"FID psi {k}: {v:6.2f}" for k, v in r["fid"].items()), flush=True)
        result = {"reference": f"{len(reals)} dev slices, {args.images} evenly spaced", "snapshots": rows}
        write_json_atomic(result | {"command": " ".join(sys.argv)}, args.out)
    plot(rows, psis, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
