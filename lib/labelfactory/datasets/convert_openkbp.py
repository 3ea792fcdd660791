"""`labelfactory openkbp-download`: OpenKBP's `provided-data` -> the `labelfactory.datasets.openkbp` layout.

Two steps: download (the public repository ababier/open-kbp at a pinned commit, as one archive of
which only `provided-data/` is unpacked) and convert (`--from DIR`, a local `provided-data` folder).
The source format: per patient `<split>-pats/pt_<N>/` holds sparse CSV files with a header line
`,data` and rows `flat_index,value` (masks: `flat_index,`), `flat_index` C-order over a
(128, 128, 128) array indexed (row, column, slice) with slice 0 the most cranial; CT stored as
HU + 1000; `voxel_dimensions.csv` holds the row, column and slice spacing in mm, one a line.
Converted: dense (z, y, x) volumes, slices reversed so z grows superiorly, rows = y (posterior),
columns = x (patient left), CT in int16 HU (absent rows are air, -1000), LPS with identity
direction; organs 1-7 (`openkbp.CSV_ORGANS`, the lower value wins where two overlap) and PTVs
1-3 (PTV56, PTV63, PTV70; the higher dose wins). Patients without a CT file are skipped (logged).
Hand-written: the format is OpenKBP's own, no library reads it.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from labelfactory.datasets.openkbp import CSV_ORGANS
from labelfactory.errors import LabelFactoryError

logger = logging.getLogger(__name__)
COMMIT = "ce625e62f3b04203f22bd9d1634f3e8fb0245e46"  # the commit the shared copy was made from
ARCHIVE_URL = f"https://github.com/ababier/open-kbp/archive/{COMMIT}.tar.gz"
SHAPE = (128, 128, 128)  # (row, column, slice)
PTVS = {"PTV56": 1, "PTV63": 2, "PTV70": 3}
FIELDS = [
    "case",
    "split",
    "spacing_x_mm",
    "spacing_y_mm",
    "spacing_z_mm",
    "slices_with_body",
    "slices_with_ptv70",
    "organs_present",
]
_PATIENT = re.compile(r"^pt_(\d+)$")


def read_sparse(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A sparse OpenKBP CSV -> (flat indices int64, values float32 or None for a mask)."""
    rows = np.loadtxt(path, delimiter=",", skiprows=1, dtype=str, ndmin=2)
    if rows.size == 0:
        return np.zeros(0, np.int64), None
    index = rows[:, 0].astype(np.int64)
    if index.min() < 0 or index.max() >= np.prod(SHAPE):
        raise LabelFactoryError(f"{path}: flat indices outside a {SHAPE} volume")
    has_values = rows.shape[1] > 1 and rows[0, 1] != ""
    return index, rows[:, 1].astype(np.float32) if has_values else None


def to_volume(flat: np.ndarray) -> np.ndarray:
    """A C-order flat (row, column, slice) array, slice 0 cranial -> (z, y, x) with z growing superiorly."""
    return np.ascontiguousarray(flat.reshape(SHAPE).transpose(2, 0, 1)[::-1])


def convert_patient(folder: Path) -> dict[str, np.ndarray | tuple[float, float, float] | list[str]] | None:
    """One patient folder -> {ct (int16 HU), label, ptv (uint8), spacing (x, y, z) mm, organs}; None without ct.csv."""
    if not (folder / "ct.csv").is_file():
        return None
    index, values = read_sparse(folder / "ct.csv")
    flat = np.zeros(np.prod(SHAPE), np.float32)
    if values is not None:
        flat[index] = values
    ct = (to_volume(np.clip(flat, 0, 4095)) - 1000).astype(np.int16)
    label, organs = np.zeros(ct.shape, np.uint8), []
    for name, value in sorted(CSV_ORGANS.items(), key=lambda kv: -kv[1]):  # lower values written last: they win
        if (folder / f"{name}.csv").is_file():
            label[_mask(folder / f"{name}.csv")] = value
            organs.append(name)
    ptv = np.zeros(ct.shape, np.uint8)
    for name, value in sorted(PTVS.items(), key=lambda kv: kv[1]):  # higher doses written last: they win
        if (folder / f"{name}.csv").is_file():
            ptv[_mask(folder / f"{name}.csv")] = value
    row, col, sl = np.loadtxt(folder / "voxel_dimensions.csv", delimiter=",").reshape(-1)[:3]
    organs = sorted(organs, key=CSV_ORGANS.get)
    return {"ct": ct, "label": label, "ptv": ptv, "spacing": (float(col), float(row), float(sl)), "organs": organs}


def _mask(path: Path) -> np.ndarray:
    index, _ = read_sparse(path)
    flat = np.zeros(np.prod(SHAPE), bool)
    flat[index] = True
    return to_volume(flat)


def _write(array: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    sitk.WriteImage(img, str(tmp), useCompression=True)
    os.replace(tmp, path)


def convert(
    source: str | os.PathLike, out: str | os.PathLike, splits: tuple[str, ...] = ("train", "validation")
) -> int:
    """`source` (provided-data, or a folder holding it) -> `out` (volumes/, cases.csv); returns the cases written."""
    source, out = Path(source), Path(out)
    if (source / "provided-data").is_dir():
        source = source / "provided-data"
    folders = [
        (s, p)
        for s in splits
        if (source / f"{s}-pats").is_dir()
        for p in sorted((source / f"{s}-pats").iterdir(), key=_patient_number)
        if _PATIENT.match(p.name)
    ]
    if not folders:
        raise LabelFactoryError(f"{source}: no {'/'.join(f'{s}-pats' for s in splits)} folders of OpenKBP patients")
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, folder in folders:
        patient = convert_patient(folder)
        if patient is None:
            logger.warning(f"{folder}: no ct.csv, skipped")
            continue
        case = f"{split}_{folder.name}"
        for kind in ("ct", "label", "ptv"):
            _write(patient[kind], patient["spacing"], out / "volumes" / f"{case}_{kind}.nii.gz")
        sx, sy, sz = patient["spacing"]
        rows.append(
            {
                "case": case,
                "split": split,
                "spacing_x_mm": f"{sx:g}",
                "spacing_y_mm": f"{sy:g}",
                "spacing_z_mm": f"{sz:g}",
                "slices_with_body": int((patient["ct"] > -1000).any((1, 2)).sum()),
                "slices_with_ptv70": int((patient["ptv"] == PTVS["PTV70"]).any((1, 2)).sum()),
                "organs_present": ";".join(patient["organs"]),
            }
        )
        logger.info(f"{case}: converted")
    if (source.parent / "LICENSE").is_file():  # the repository's MIT licence travels with the data
        shutil.copyfile(source.parent / "LICENSE", out / "LICENSE")
    with open(out / "cases.csv", "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def _patient_number(p: Path) -> int:
    m = _PATIENT.match(p.name)
    return int(m.group(1)) if m else -1


def download(dest: str | os.PathLike, url: str = ARCHIVE_URL) -> Path:
    """Fetch the repository archive, unpack its `provided-data/` and LICENSE into `dest`; returns dest/provided-data."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        with urllib.request.urlopen(url, timeout=60) as r, tarfile.open(fileobj=r, mode="r|gz") as tar:
            for member in tar:
                parts = Path(member.name).parts
                wanted = parts[1:2] == ("provided-data",) or parts[1:] == ("LICENSE",)
                if len(parts) > 1 and wanted and (member.isfile() or member.isdir()):
                    member.name = str(Path(*parts[1:]))
                    tar.extract(member, tmp, filter="data")
        if not Path(tmp, "provided-data").is_dir():
            raise LabelFactoryError(f"{url}: the archive holds no provided-data folder")
        shutil.rmtree(dest / "provided-data", ignore_errors=True)
        os.replace(Path(tmp, "provided-data"), dest / "provided-data")
        if Path(tmp, "LICENSE").is_file():
            os.replace(Path(tmp, "LICENSE"), dest / "LICENSE")
    return dest / "provided-data"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="the converted data set (cases.csv, volumes/)")
    p.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=None,
        help="convert a local provided-data folder instead of downloading (e.g. from an earlier --download-to)",
    )
    p.add_argument(
        "--download-to",
        type=Path,
        default=None,
        help="where the downloaded provided-data folder is kept (default: <out>/source)",
    )
    p.add_argument("--splits", default="train,validation", help="comma list of train, validation, test")


def run(args: argparse.Namespace) -> int:
    source = args.source
    if source is None:
        where = args.download_to or args.out / "source"
        print(f"labelfactory: downloading OpenKBP (ababier/open-kbp at {COMMIT[:12]}) into {where}", flush=True)
        source = download(where)
    n = convert(source, args.out, tuple(s.strip() for s in args.splits.split(",") if s.strip()))
    print(f"labelfactory: {n} patients converted into {args.out} (cite Babier et al., Med. Phys. 48:5549-5561, 2021)")
    return 0
