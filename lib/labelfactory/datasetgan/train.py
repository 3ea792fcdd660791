"""Train the pixel-classifier ensemble on annotated generated images (DatasetGAN's interpreter).

Each step takes a few images; each member draws its own random labelled pixels from each of
them, and sees the features at those pixels exactly as the full-image forms compute them
(bilinear at pixel centres, `sample_taps`). Taps are regenerated from w and kept in memory at
their native resolution (fp16, ~20x smaller than the upsampled map) up to a budget; beyond it
they are regenerated every time. Pixels labelled `ignore_index` are never drawn. Cross-entropy
(optional class weights), Adam, early stopping on the epoch loss with the best weights kept. The ensemble
trains on the generator's device (`load_generator(path, device)`); pixels are drawn on the CPU, so the draws
do not depend on it. `fit_interpreter` is the one recipe the CLI and the app task share. Under torchrun the
members, not the pixels, are split over the ranks (`train_ensemble`); rank 0 writes the gathered ensemble.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from labelfactory import distributed
from labelfactory.datasetgan.ensemble import EnsembleConfig, PixelEnsemble, ensemble_of, member_states
from labelfactory.datasetgan.labeller import save_interpreter
from labelfactory.datasetgan.records import LatentRecord
from labelfactory.datasetgan.taps import TapLayout, generate_with_taps, sample_taps, ws_from_w
from labelfactory.devices import cuda_speedups, module_device
from labelfactory.errors import LabelFactoryError
from labelfactory.options import SEED_RANGE, option
from labelfactory.stylegan2.identity import generator_identity

logger = logging.getLogger(__name__)


@dataclass
class DatasetGANConfig:
    """How to train the ensemble (the one home of these defaults: CLI flags and app options derive from it)."""

    members: int = option(10, "pixel MLPs in the ensemble (majority vote)", low=1)
    hidden: tuple[int, int] = (256, 128)  # their hidden widths
    # at most this many epochs (an epoch: every image once, `images_per_step` per step); early stopping may end
    # sooner. 30 left 0.06 of Dice on the table (benchmarks/interpreter_budget.py: 4 / 30 / 100 epochs gave 0.50 /
    # 0.70 / 0.76 on OpenKBP generated images; 100 stopped at 65)
    max_epochs: int = option(100, "at most this many epochs (early stopping may end sooner)", low=1)
    patience: int = option(5, "epochs without progress before stopping")
    min_improvement: float = 0.01  # relative drop of the epoch loss that counts as progress
    lr: float = option(1e-3, "Adam learning rate")
    pixels_per_image: int = option(1024, "pixels each member draws from each image per step", low=1)
    images_per_step: int = 2
    ignore_index: int = 255  # mask value of unlabelled pixels (never drawn)
    class_weights: tuple[float, ...] | None = None  # one cross-entropy weight per class value
    cache_gb: float = 2.0  # taps kept in memory (fp16) up to this size
    seed: int = option(0, "seed of the initial weights and of every random draw", high=SEED_RANGE[1])

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


class TapCache:
    """Taps of each record's w, regenerated on demand; up to `budget_bytes` of them kept (fp16)."""

    def __init__(self, G, records: list[LatentRecord], budget_bytes: float):
        self.G, self.records, self.budget = G, records, budget_bytes
        self.kept: dict[int, list[torch.Tensor]] = {}
        self.used = 0

    def __call__(self, i: int) -> list[torch.Tensor]:
        if i in self.kept:
            return [t.float() for t in self.kept[i]]
        _, taps = generate_with_taps(self.G, ws_from_w(self.G, self.records[i].w).to(module_device(self.G)))
        size = sum(t.numel() for t in taps) * 2
        if self.used + size <= self.budget:
            self.kept[i] = [t.half() for t in taps]
            self.used += size
            return [t.half().float() for t in taps]  # the same numbers as later visits
        return taps


def _draw_pixels(valid: torch.Tensor, n: int, R: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    flat = valid[torch.randint(len(valid), (n,), generator=gen)]
    return flat // R, flat % R


def member_share(members: int, rank: int, world: int) -> list[int]:
    """The members rank `rank` of `world` trains: rank, rank + world, ...; LabelFactoryError when a rank has none."""
    if world > members:
        raise LabelFactoryError(
            f"{world} processes for an ensemble of {members} members: each process trains whole members; "
            "use at most as many processes (gpus) as members"
        )
    return list(range(rank, members, world))


def train_ensemble(
    G, records: list[LatentRecord], num_classes: int, config: DatasetGANConfig | None = None, progress: bool = True
) -> tuple[PixelEnsemble, dict]:
    """Fit `config.members` pixel MLPs (default: DatasetGANConfig()) on G's device. Returns (ensemble in eval mode,
    on that device; history).

    Under torchrun rank r trains members r, r + W, ... (`member_share`): every rank draws the whole ensemble's
    pixels from the one seeded stream and keeps its members' share, each member's loss term is divided by the
    whole ensemble's pixel weight, and the epoch loss (one number) is summed over ranks, so each member trains and
    stops exactly as in one process; the members' best weights are gathered in their order on every rank."""
    config = config or DatasetGANConfig()
    if not records:
        raise LabelFactoryError(
            "no annotated generated images to train on: label a few generated images first", status=409
        )
    layout = TapLayout.of(G)
    R, M, P = layout.image_resolution, config.members, config.pixels_per_image
    mine = member_share(M, distributed.rank(), distributed.world_size())
    valid = [torch.from_numpy(np.flatnonzero(r.mask.reshape(-1) != config.ignore_index)) for r in records]
    if all(len(v) == 0 for v in valid):
        raise LabelFactoryError("every label pixel is the ignore label: draw some classes first")
    masks = [torch.from_numpy(r.mask.reshape(-1)) for r in records]
    device = module_device(G)
    cuda_speedups(device)
    weight = torch.tensor(config.class_weights, dtype=torch.float32) if config.class_weights else None
    if weight is not None and len(weight) != num_classes:
        raise LabelFactoryError(f"class weights: {len(weight)} given, the label map has {num_classes} classes")

    torch.manual_seed(config.seed)
    whole = EnsembleConfig(layout.channels, layout.resolutions, R, num_classes, M, tuple(config.hidden), config.seed)
    ens = ensemble_of(whole, member_states(PixelEnsemble(whole), mine)).to(device)
    opt = torch.optim.Adam(ens.parameters(), lr=config.lr)
    taps_of = TapCache(G, records, config.cache_gb * 2**30)
    gen = torch.Generator().manual_seed(config.seed)
    usable = [i for i, v in enumerate(valid) if len(v)]
    steps = math.ceil(len(usable) / config.images_per_step)
    history: dict = {"epoch_loss": [], "best_epoch": 0, "stopped_early": False}
    best, best_state, stale = math.inf, None, 0
    bar = tqdm(
        range(config.max_epochs), desc="interpreter", unit="epoch", disable=not (progress and distributed.is_main())
    )
    for epoch in bar:
        ens.train()
        order = [usable[i] for i in torch.randperm(len(usable), generator=gen).tolist()]
        total = 0.0
        for s in range(steps):
            batch = order[s * config.images_per_step : (s + 1) * config.images_per_step]
            xs, ys, pixel_weight = [], [], 0.0
            for i in batch:
                rows, cols = _draw_pixels(valid[i], M * P, R, gen)  # the whole ensemble's draw, member-major
                y = masks[i][rows * R + cols]
                pixel_weight += float(weight[y].sum()) if weight is not None else len(y)
                rows, cols = rows.reshape(M, P)[mine].reshape(-1), cols.reshape(M, P)[mine].reshape(-1)
                xs.append(sample_taps(taps_of(i), rows, cols, R).reshape(len(mine), P, -1))
                ys.append(y.reshape(M, P)[mine])
            x, y = torch.cat(xs, 1), torch.cat(ys, 1).to(device)
            logits = ens(x)
            terms = F.cross_entropy(
                logits.reshape(-1, num_classes),
                y.reshape(-1),
                weight=None if weight is None else weight.to(device),
                reduction="none",
            )
            loss = terms.sum() / pixel_weight  # this rank's share of the whole ensemble's (weighted) mean
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        epoch_loss = float(distributed.all_reduce_sum(torch.tensor(total, dtype=torch.float64, device=device))) / steps
        history["epoch_loss"].append(epoch_loss)
        bar.set_postfix(loss=f"{epoch_loss:.4f}")
        if epoch_loss < best * (1 - config.min_improvement):
            best, best_state, stale = epoch_loss, copy.deepcopy(ens.state_dict()), 0
            history["best_epoch"] = epoch
        else:
            stale += 1
            if stale >= config.patience:
                history["stopped_early"] = True
                break
    ens.load_state_dict(best_state)
    ens = gathered_ensemble(whole, mine, ens).to(device)
    history["best_loss"] = best
    logger.info(
        f"interpreter: {len(history['epoch_loss'])} epochs, best loss {best:.4f} at epoch {history['best_epoch']}"
    )
    return ens.eval(), history


def gathered_ensemble(whole: EnsembleConfig, mine: list[int], ens: PixelEnsemble) -> PixelEnsemble:
    """The whole ensemble (on the CPU) from every rank's members `mine` held in `ens`, members in their order."""
    states: dict[int, dict[str, torch.Tensor]] = {}
    for members, part in distributed.all_gather_objects((mine, member_states(ens, range(len(mine))))):
        states.update(zip(members, part, strict=True))
    return ensemble_of(whole, [states[m] for m in range(whole.members)])


@dataclass
class InterpreterFit:
    """A fitted ensemble (eval mode, on the generator's device), its history, its data record and its file."""

    ensemble: PixelEnsemble
    history: dict
    data: dict
    path: Path | None


def fit_interpreter(
    G,
    records: list[LatentRecord],
    label_names: dict[str, int],
    config: DatasetGANConfig | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = False,
) -> InterpreterFit:
    """DatasetGAN's one recipe (the CLI and the app task call it; they differ only in where `records` come from):
    train the ensemble on G's device over the classes of `label_names`, record the images, write `out`."""
    config = config or DatasetGANConfig()
    ens, history = train_ensemble(G, records, max(label_names.values()) + 1, config, progress)
    data = {"images": [r.name for r in records], "count": len(records), "history": history}
    path = None
    if out is not None and distributed.is_main():  # under torchrun rank 0 writes the gathered ensemble
        path = save_interpreter(out, ens, label_names, config.to_dict(), data, G)
    return InterpreterFit(ens, history, data, path)


def fit_summary(fit: InterpreterFit, G, config: DatasetGANConfig) -> dict:
    """What a fit reports (the app's train stats, the CLI's --summary): images, epochs, losses, generator, config."""
    return {
        "images": fit.data["count"],
        "epochs": len(fit.history["epoch_loss"]),
        "best_loss": fit.history["best_loss"],
        "epoch_loss": fit.history["epoch_loss"],
        "generator": generator_identity(G),
        "config": config.to_dict(),
    }
