"""Build sample-data/openkbp/ from the converted OpenKBP data set (../shared/datasets/openkbp; run once).

Choice (deterministic, no randomness): the patients with all seven organs contoured, by patient
number; the first `VALIDATION` of the validation split and the first `TRAIN` of the train split.
Files are copied byte for byte, so a rebuild gives the same files.

Writes:
- `cases/`: the `labelfactory.datasets.openkbp` layout (`cases.csv` + `volumes/`) for the train
  and validation patients (the reduced experiment and the ClamNet tests read it);
- `datastore/`: the validation patients' CT as a MONAI Label local datastore (`<case>.nii.gz`),
  their organ maps in `datastore/organs/` and PTV maps in `datastore/ptv/` (sub-folders the
  datastore does not list, so the images stay unlabelled for Slicer's next sample), and
  `datastore/cases.csv` (their rows: spacing, organs contoured);
- `LICENSE` (the OpenKBP repository's MIT licence).

Usage: python scripts/make_openkbp_sample.py [SRC] [DST]
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

from labelfactory.datasets.openkbp import CSV_ORGANS

SRC = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets/openkbp")
DST = Path(sys.argv[2] if len(sys.argv) > 2 else "sample-data/openkbp")
VALIDATION, TRAIN = 4, 6


def chosen(rows: list[dict[str, str]], split: str, n: int) -> list[dict[str, str]]:
    """The first `n` patients of `split` (by number) with every organ contoured."""
    full = [r for r in rows if r["split"] == split and set(r["organs_present"].split(";")) == set(CSV_ORGANS)]
    return sorted(full, key=lambda r: int(r["case"].rsplit("_", 1)[1]))[:n]


def write_csv(rows: list[dict[str, str]], path: Path, fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    with open(SRC / "cases.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = list(reader.fieldnames or []), list(reader)
    val, train = chosen(rows, "validation", VALIDATION), chosen(rows, "train", TRAIN)
    for sub in ("cases", "datastore"):
        shutil.rmtree(DST / sub, ignore_errors=True)
    volumes = DST / "cases" / "volumes"
    volumes.mkdir(parents=True)
    for r in train + val:
        for kind in ("ct", "label", "ptv"):
            shutil.copyfile(SRC / "volumes" / f"{r['case']}_{kind}.nii.gz", volumes / f"{r['case']}_{kind}.nii.gz")
    write_csv(train + val, DST / "cases" / "cases.csv", fields)
    store = DST / "datastore"
    for sub in ("organs", "ptv"):
        (store / sub).mkdir(parents=True)
    for r in val:
        shutil.copyfile(SRC / "volumes" / f"{r['case']}_ct.nii.gz", store / f"{r['case']}.nii.gz")
        shutil.copyfile(SRC / "volumes" / f"{r['case']}_label.nii.gz", store / "organs" / f"{r['case']}.nii.gz")
        shutil.copyfile(SRC / "volumes" / f"{r['case']}_ptv.nii.gz", store / "ptv" / f"{r['case']}.nii.gz")
    write_csv(val, store / "cases.csv", fields)
    shutil.copyfile(SRC / "LICENSE", DST / "LICENSE")
    print(f"{DST}: validation {[r['case'] for r in val]}, train {[r['case'] for r in train]}")


if __name__ == "__main__":
    main()
