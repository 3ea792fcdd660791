"""Per-organ coverage of the OpenKBP body crops: the share of each organ's voxels that some crop holds.

Reads every patient of a split (default train) of the converted data set, boxes it with
`openkbp.body_boxes` at the segmenters' threshold (`min_body=1`) and at the GAN's
(MIN_BODY_PIXELS), and writes both per organ to benchmarks/results/openkbp_crop_coverage.json.

    PYTHONPATH=lib .venv/bin/python scripts/openkbp_crop_coverage.py --data ../shared/datasets/openkbp
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import numpy as np

from labelfactory.datasets import openkbp
from labelfactory.jsonio import write_json_atomic

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "openkbp_crop_coverage.json"


def split_coverage(root: Path, split: str, size: int, thresholds: list[int]) -> dict[str, dict]:
    """min_body -> organ name -> {covered, total, coverage} summed over the split's patients."""
    sums = {t: {v: [0, 0] for v in openkbp.ORGANS} for t in thresholds}
    for case in openkbp.read_cases(root, split):
        ct, label = openkbp.read_array(case.ct).astype(np.float32), openkbp.read_array(case.label)
        for t in thresholds:
            for v, (covered, total) in openkbp.crop_coverage(label, openkbp.body_boxes(ct, size, t), sums[t]).items():
                sums[t][v][0] += covered
                sums[t][v][1] += total
    return {
        str(t): {
            openkbp.ORGANS[v]: {"covered": c, "total": n, "coverage": round(c / n, 5) if n else None}
            for v, (c, n) in per.items()
        }
        for t, per in sums.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/datasets/openkbp"))
    p.add_argument("--split", default="train")
    p.add_argument("--size", type=int, default=64, help="crop side in pixels (the experiment's 64)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    thresholds = [1, openkbp.MIN_BODY_PIXELS]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {
        "data": str(args.data),
        "split": args.split,
        "patients": len(openkbp.read_cases(args.data, args.split)),
        "size": args.size,
        "commit": commit or "unknown",
        "min_body": split_coverage(args.data, args.split, args.size, thresholds),
        "note": "min_body 1: every slice with body (the segmenters' crops); "
        f"{openkbp.MIN_BODY_PIXELS}: the GAN's crops and every crop before the fix",
    }
    write_json_atomic(record, args.out)
    for t, organs in record["min_body"].items():
        print(f"min_body {t}: " + ", ".join(f"{o} {s['coverage']:.4f}" for o, s in organs.items()))


if __name__ == "__main__":
    main()
