"""The labelling factory: seeds -> generated CT slices with masks, the most uncertain dropped.

Output layout (read by the segmentation trainers):
  <out>/images/seed<NNNNNN>.nii.gz        2D CT slice in HU (int16)
  <out>/labels/seed<NNNNNN>.nii.gz        its mask (uint8), plus .seg.nrrd (and .png with png=True)
  <out>/uncertainty/seed<NNNNNN>.nii.gz   per-pixel ensemble JS divergence (float32, nats)
  <out>/manifest.csv                      kept pairs: seed, files, uncertainty score, pixels per class
  <out>/preview.png                       image / mask overlay / uncertainty for the first kept pairs
  <out>/dropped/...                       the same for the dropped fraction, with its own manifest.csv
Every finished seed is appended to <out>/records.jsonl, so a rerun skips it (resumable); the drop
is decided over all records at the end, so the result depends only on the seeds, not on restarts.

Seeds are generated in fixed blocks of `block` (B) consecutive seeds, block k = seeds [kB, (k+1)B), always
computed together as one batch on the interpreter's device, whichever of them a run asks for. Batching changes
float rounding, so a pair depends on its seed, psi, the models and B (recorded in every record; a folder holds
one B), never on how a run is split, resumed or sharded. A folder continues with its own B unless one is given;
B = 1 is the per-seed path of earlier folders (whose records lack the field).

Under torchrun (several processes, on one machine or several sharing <out>) the blocks to make are split over the
ranks (`shard_seeds`); each rank appends its records to <out>/records.rank<R>.jsonl, the records are gathered on
every rank, and rank 0 appends them to records.jsonl in the order one process would have written them, removes the
rank files, and decides the drop over all of them. The folder is byte for byte what one process makes of the same
seeds. A sharded run stopped before its merge leaves its rank files; the next run (any number of ranks) counts
their seeds as done and merges them.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from labelfactory import distributed
from labelfactory.datasetgan.labeller import Interpreter
from labelfactory.datasetgan.taps import ws_from_seeds
from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image, Window, write_image, write_seg_nrrd
from labelfactory.labels import UNKNOWN_COLOR, map_of
from labelfactory.latent_record import TRUNCATION_PSI
from labelfactory.options import SEED_RANGE
from labelfactory.stylegan2.identity import generated_to_image, generator_identity, seed_name

logger = logging.getLogger(__name__)

KINDS = ("images", "labels", "uncertainty")
RANK_RECORDS = "records.rank*.jsonl"  # a sharded run's records before rank 0 merges them
BLOCK = 16  # seeds generated together: a batch that keeps a GPU busy (no faster on the CPU: docs/RESULTS.md 12)


@dataclass
class SynthesisResult:
    """What a run produced: seeds generated now, kept and dropped seeds over the whole folder."""

    generated: list[int]
    kept: list[int]
    dropped: list[int]
    out: Path


def synthesize(
    interpreter: Interpreter,
    seeds: list[int],
    out: str | os.PathLike,
    truncation_psi: float = TRUNCATION_PSI,
    drop_fraction: float = 0.1,
    png: bool = False,
    window: Window = Window(),
    spacing: tuple[float, float] = (1.0, 1.0),
    preview_pairs: int = 8,
    progress: bool = True,
    block: int | None = None,
) -> SynthesisResult:
    """Generate pairs for `seeds` into `out` (skipping seeds already there), drop the most uncertain fraction,
    write manifest and preview.

    Seeds are generated in blocks of `block` consecutive seeds (see the module's docstring; default: the folder's
    own, BLOCK for a new folder), so a pair depends only on its seed, psi, the models and `block`, however runs are
    split or resumed.
    """
    if not 0 <= drop_fraction < 1:
        raise LabelFactoryError(f"drop fraction must be in [0, 1), got {drop_fraction}")
    out = Path(out)
    log_path = out / "records.jsonl"
    done = _read_records(log_path)
    leftover = {}  # records in rank files of a sharded run that stopped before merging them
    for part in sorted(out.glob(RANK_RECORDS)):
        leftover.update({s: r for s, r in _read_records(part).items() if s not in done})
    done.update(leftover)
    if block is None:
        block = next((rec.get("block", 1) for rec in done.values()), BLOCK)
    if not isinstance(block, int) or block < 1:
        raise LabelFactoryError(f"block must be a whole number >= 1, got {block!r}")
    origin = {
        "truncation_psi": float(truncation_psi),
        "generator": generator_identity(interpreter.G),
        "interpreter": interpreter.identity,
        "block": int(block),
        "precision": interpreter.precision,
    }
    before = {"block": 1, "precision": "fp32"}  # what records written before these fields were made with
    for rec in done.values():
        if any(rec.get(k, before.get(k)) != v for k, v in origin.items()):
            raise LabelFactoryError(
                f"{out} holds pairs made with other settings or models ({ {k: rec.get(k) for k in origin} }); "
                "write to a new folder"
            )
    todo = [s for s in dict.fromkeys(int(s) for s in seeds) if s not in done]
    rank, world = distributed.rank(), distributed.world_size()
    mine = shard_seeds(todo, rank, world, block)
    logger.info(f"synthesize: rank {rank} of {world} makes {len(mine)} of the {len(todo)} new seeds")
    names = sorted(interpreter.label_names, key=interpreter.label_names.get)
    for kind in KINDS:
        (out / kind).mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(mine), desc="synthesize", unit="pair", disable=not progress or rank > 0)
    with open(log_path if world == 1 else out / f"records.rank{rank}.jsonl", "a") as log:
        for first, wanted in seed_blocks(mine, block).items():
            lab = interpreter.label(ws_from_seeds(interpreter.G, block_seeds(first, block), truncation_psi))
            images, masks = lab.image.float().cpu(), lab.mask.cpu().numpy().astype(np.uint8)
            uncertainty, scores = lab.uncertainty.cpu().numpy().astype(np.float32), lab.score.cpu()
            for seed in wanted:
                i = seed - first
                image = generated_to_image(images[i], window, spacing)
                _write_pair(out, seed, image, masks[i], uncertainty[i], interpreter.label_names, png)
                counts = np.bincount(masks[i].reshape(-1), minlength=len(names))
                rec = {
                    "seed": seed,
                    "uncertainty": float(scores[i]),
                    "pixels": {n: int(counts[interpreter.label_names[n]]) for n in names},
                    **origin,
                }
                log.write(json.dumps(rec) + "\n")
                log.flush()
                done[seed] = rec
                bar.update(1)
    bar.close()
    if world > 1:  # every rank's new records on every rank: the drop is decided over all of them
        for part in distributed.all_gather_objects({s: done[s] for s in mine}):
            done.update(part)
    kept, dropped = _split(done, drop_fraction)
    if rank == 0:  # records in the order one process writes them: by block, seeds increasing
        new = [done[s] for s in sorted(todo)] if world > 1 else []
        _merge_records(log_path, [*leftover.values(), *new], out)
        _arrange(out, kept, dropped)
        _write_manifest(out / "manifest.csv", [done[s] for s in kept], names, "")
        if dropped or (out / "dropped").exists():
            _write_manifest(out / "dropped" / "manifest.csv", [done[s] for s in dropped], names, "dropped/")
        _write_preview(out / "preview.png", out, kept[:preview_pairs], interpreter.label_names, window)
        logger.info(f"synthesize: {len(todo)} new pairs, {len(kept)} kept, {len(dropped)} dropped in {out}")
    distributed.barrier()  # the folder is whole before any rank returns
    return SynthesisResult(todo, kept, dropped, out)


def shard_seeds(seeds: list[int], rank: int, world: int, block: int = 1) -> list[int]:
    """The seeds rank `rank` of `world` makes: every world-th of the seeds' blocks (block k: seeds [kB, (k+1)B)),
    blocks in increasing order, so the ranks' shares differ by at most one block. `seeds` order is kept."""
    blocks = sorted({s // block for s in seeds})
    taken = set(blocks[rank::world])
    return [s for s in seeds if s // block in taken]


def _merge_records(log_path: Path, records: list[dict], out: Path) -> None:
    """Append `records` to records.jsonl (fsynced), then remove the rank files they came from."""
    if records:
        with open(log_path, "a") as log:
            log.write("".join(json.dumps(rec) + "\n" for rec in records))
            log.flush()
            os.fsync(log.fileno())
    for part in out.glob(RANK_RECORDS):
        part.unlink()


def block_seeds(first: int, block: int) -> list[int]:
    """The seeds of the block starting at `first` (a multiple of `block`): `block` of them, fewer only where the
    block meets the last seed numpy takes."""
    return list(range(first, min(first + block, SEED_RANGE[1] + 1)))


def seed_blocks(seeds: list[int], block: int) -> dict[int, list[int]]:
    """`seeds` grouped by block: first seed of each block -> the given seeds in it, both in increasing order."""
    out: dict[int, list[int]] = {}
    for seed in sorted(seeds):
        out.setdefault(seed - seed % block, []).append(seed)
    return out


def _read_records(path: Path) -> dict[int, dict]:
    records = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                records[int(rec["seed"])] = rec
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interrupted run: that seed is redone
    return records


def _write_pair(
    out: Path,
    seed: int,
    image: Image,
    mask: np.ndarray,
    uncertainty: np.ndarray,
    label_names: dict[str, int],
    png: bool,
) -> None:
    name = seed_name(seed)
    label = image.with_array(mask)
    write_image(image, out / "images" / f"{name}.nii.gz")
    write_image(label, out / "labels" / f"{name}.nii.gz")
    write_seg_nrrd(label, out / "labels" / f"{name}.seg.nrrd", label_names, map_of(label_names).colors)
    write_image(image.with_array(uncertainty), out / "uncertainty" / f"{name}.nii.gz")
    if png:
        write_image(
            image.with_array(
                np.rint((image.array.astype(np.float32) + 1024) / 2048 * 255).clip(0, 255).astype(np.uint8)
            ),
            out / "images" / f"{name}.png",
        )
        write_image(label, out / "labels" / f"{name}.png")


def _split(records: dict[int, dict], drop_fraction: float) -> tuple[list[int], list[int]]:
    """Drop the round(fraction * n) highest uncertainty scores (ties: higher seed first); both lists sorted by seed."""
    order = sorted(records, key=lambda s: (records[s]["uncertainty"], s), reverse=True)
    n_drop = int(math.floor(drop_fraction * len(order) + 0.5))
    return sorted(order[n_drop:]), sorted(order[:n_drop])


def _files(seed: int) -> list[str]:
    n = seed_name(seed)
    return [
        f"images/{n}.nii.gz",
        f"images/{n}.png",
        f"labels/{n}.nii.gz",
        f"labels/{n}.seg.nrrd",
        f"labels/{n}.png",
        f"uncertainty/{n}.nii.gz",
    ]


def _arrange(out: Path, kept: list[int], dropped: list[int]) -> None:
    """Move each pair's files to where its kept/dropped status says (earlier runs may have placed them otherwise)."""
    for seeds, src, dst in ((kept, out / "dropped", out), (dropped, out, out / "dropped")):
        for seed in seeds:
            for rel in _files(seed):
                if (src / rel).exists():
                    (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src / rel, dst / rel)


def _write_manifest(path: Path, records: list[dict], names: list[str], prefix: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "image", "label", "uncertainty", *[f"pixels_{n.replace(' ', '_')}" for n in names]])
        for r in records:
            n = seed_name(r["seed"])
            w.writerow(
                [
                    r["seed"],
                    f"{prefix}images/{n}.nii.gz",
                    f"{prefix}labels/{n}.nii.gz",
                    f"{r['uncertainty']:.6g}",
                    *[r["pixels"][k] for k in names],
                ]
            )
    os.replace(tmp, path)


def _write_preview(path: Path, out: Path, seeds: list[int], label_names: dict[str, int], window: Window) -> None:
    """A grid: one column per pair; rows image, mask overlay (label colours), uncertainty map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labelfactory.io import read_image

    if not seeds:
        return
    lut = np.zeros((max(label_names.values()) + 1, 4))
    colors = map_of(label_names).colors  # the data set's (Slicer's) colours; others from tab10
    for name, v in label_names.items():
        if v and colors.get(name, UNKNOWN_COLOR) != UNKNOWN_COLOR:
            lut[v] = [*(c / 255 for c in colors[name]), 0.5]
        elif v:
            lut[v] = [*plt.cm.tab10(v % 10)[:3], 0.5]
    fig, axes = plt.subplots(3, len(seeds), figsize=(2 * len(seeds), 6), squeeze=False)
    for j, seed in enumerate(seeds):
        n = seed_name(seed)
        img = read_image(out / "images" / f"{n}.nii.gz").array
        mask = read_image(out / "labels" / f"{n}.nii.gz").array.astype(int)
        unc = read_image(out / "uncertainty" / f"{n}.nii.gz").array
        for i, (a, title) in enumerate(zip(axes[:, j], (n, "mask", "uncertainty"), strict=True)):
            a.imshow(img, cmap="gray", vmin=window.low, vmax=window.high) if i < 2 else a.imshow(
                unc, cmap="magma", vmin=0
            )
            if i == 1:
                a.imshow(lut[mask.clip(0, len(lut) - 1)])
            a.set_title(title, fontsize=7)
            a.axis("off")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
