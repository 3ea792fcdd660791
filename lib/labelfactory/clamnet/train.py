"""Train the ClamNet pair on organ-cropped slices with image-level labels; save / load its checkpoint."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from labelfactory import distributed
from labelfactory.checkpoints import load_checkpoint, save_checkpoint
from labelfactory.clamnet.cam import CamConfig
from labelfactory.clamnet.data import WeakSlices, slice_levels
from labelfactory.clamnet.loss import clamnet_loss
from labelfactory.clamnet.network import ClamNetPair
from labelfactory.clamnet.pairs import PAIRINGS, PairBatch, PairSampler, level_normals, near_normals
from labelfactory.clamnet.targets import NEIGHBOURS, TARGETS, evidence
from labelfactory.devices import cuda_speedups, resolve_device
from labelfactory.errors import LabelFactoryError
from labelfactory.io import Window
from labelfactory.options import SEED_RANGE, option

logger = logging.getLogger(__name__)
KIND = "clamnet"
MODEL_FILE = f"{KIND}.pt"  # in a model folder


@dataclass
class ClamNetConfig:
    """size: crop side (px); features: BasicUNetPlusPlus's six widths; head: UNet++ depth used at
    inference (1-4, <4 needs deep_supervision); eta: loss weight of abnormal slices without one in
    the CSV; marker_fraction: share of an abnormal slice's organ pixels taken to hold the marker (see
    loss.py); dice_term: keep equation (1)'s Dice-like term (False: cross-entropy only); mix: relative
    frequency of SAME / NORMAL / NEGATIVE pairs; near_negatives: k > 0 pairs an abnormal slice with one
    of the k nearest normal slices of its own study (pairs.near_normals), 0 with any normal slice;
    window: CT (level, width) in HU; margin_mm: organ crop margin; threshold: marker probability at
    which a pixel is in the mask; target: what an abnormal slice's target is taken from (targets.py: the network's
    own marker `self`, a CAM seed `cam`, the difference from its study's nearest normal slices `difference`); pairing:
    where NORMAL / NEGATIVE partners and the `difference` target's normal slices come from: `patient` (NORMAL: any
    normal slice; NEGATIVE: per near_negatives; difference: the study's own nearest normal slices) or `level` (the
    most similar normal slices of OTHER studies within level_window of the slice's level, `pairs.level_normals`, for
    all three); marker: the name of what the map marks."""

    size: int = option(256, "crop side in pixels", low=8)
    features: tuple[int, ...] = (32, 32, 64, 128, 256, 32)
    deep_supervision: bool = option(False, "train every UNet++ head (needed for head < 4)")
    head: int = option(4, "UNet++ depth used at inference (1-4; < 4 needs deep_supervision)", low=1, high=4)
    steps: int = option(300, "training steps", low=1)
    batch: int = option(8, "pairs per step", low=1)
    lr: float = option(1e-3, "Adam learning rate")
    eta: float = option(0.5, "loss weight of abnormal slices without a slice label")
    marker_fraction: float = option(0.25, "share of an abnormal slice's organ pixels taken to hold the marker", high=1)
    dice_term: bool = option(True, "keep equation (1)'s Dice-like term")
    mix: tuple[float, float, float] = (1.0, 1.0, 1.0)
    near_negatives: int = option(0, "k > 0: pair an abnormal slice with one of its study's k nearest normal slices")
    seed: int = option(0, "seed of the initial weights and of every random draw", high=SEED_RANGE[1])
    organ: str = option("aorta", "organ to crop to (mask name / label name)")
    margin_mm: float = option(10.0, "organ crop margin in mm")
    window: tuple[float, float] = (100.0, 600.0)
    threshold: float = option(0.5, "marker probability at which a pixel is in the mask", high=1)
    target: str = option("self", "what an abnormal slice's target is taken from (targets.py)", choices=TARGETS)
    pairing: str = option("patient", "normal slices of pairs / difference: same patient or level", choices=PAIRINGS)
    level_window: float = option(10.0, "pairing level: largest level difference of a match (mm on OpenKBP)", low=0)
    marker: str = option("marker", "what the map marks (the infer's label name, e.g. parotid)")

    @property
    def ct_window(self) -> Window:
        return Window(*self.window)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClamNetConfig:
        d = dict(d)
        for k in ("features", "mix", "window"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def recorded_config(path: str | os.PathLike) -> ClamNetConfig | None:
    """The config a ClamNet model file records (its recipe; fields this version lacks are left out), or None when
    there is no such file. A trainer that starts from it retrains the model as it was made."""
    if not Path(path).is_file():
        return None
    known = {f.name for f in fields(ClamNetConfig)}
    return ClamNetConfig.from_dict({k: v for k, v in load_checkpoint(path, KIND)["config"].items() if k in known})


def build_pair(config: ClamNetConfig) -> ClamNetPair:
    return ClamNetPair(config.features, config.deep_supervision, config.head)


def train_clamnet(
    slices: WeakSlices,
    config: ClamNetConfig,
    on_step: Callable[[int, float], None] | None = None,
    device: str | torch.device = "auto",
) -> tuple[ClamNetPair, list[float]]:
    """Adam on both UNet++ for `config.steps` pair batches on `device` (`labelfactory.devices`; pairs are drawn on
    the CPU, so the draws do not depend on it), against `config.target`'s targets (a `cam` seed's classifier trains
    first, `config.steps` of its own). Returns the pair (eval mode, on `device`) and the loss per step (mean over
    ranks).

    Under torchrun (as the segmentation trainer): every rank draws the step's whole batch from the one seeded
    stream and trains on its pairs rank, rank + W, ...; each network is wrapped in DDP, so the gradients are
    averaged and the weights stay equal on every rank. A `cam` seed's classifier trains on every rank alike."""
    _, world, _ = distributed.init_from_env()
    device = resolve_device(device)
    if world > config.batch:
        raise LabelFactoryError(
            f"{world} processes for batches of {config.batch} pairs: each process needs a pair of every batch; "
            f"use at most {config.batch} processes"
        )
    cuda_speedups(device)
    seed_cam = CamConfig(steps=config.steps, batch=config.batch, lr=config.lr, seed=config.seed)
    seeds = evidence(slices, config.target, seed_cam, device, config.pairing, config.level_window)
    torch.manual_seed(config.seed)
    pair = build_pair(config).to(device)
    net_a, net_b = pair.a, pair.b
    if world > 1:
        net_a, net_b = _synced(pair.a, config), _synced(pair.b, config)
    gen = torch.Generator().manual_seed(config.seed)
    partners, normal_partners = None, None
    if config.pairing == "level":
        partners, normal_partners = level_partners(slices, max(config.near_negatives, NEIGHBOURS), config.level_window)
    elif config.near_negatives > 0:
        partners = near_normals(slices.abnormal, slices.study, slices.file_slice, config.near_negatives)
    sampler = PairSampler(
        slices.x, slices.abnormal, slices.eta, slices.organ, config.mix, partners, seeds, normal_partners
    )
    opt = torch.optim.Adam(pair.parameters(), lr=config.lr)
    pair.train()
    history = []
    t0 = time.time()
    for step in range(config.steps):
        batch = _on(_share(sampler.sample(config.batch, gen), distributed.rank(), world), device)
        loss = clamnet_loss(net_a(batch.xa), net_b(batch.xb), batch, config.marker_fraction, config.dice_term)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(distributed.all_reduce_mean(loss.detach().clone())))
        if on_step is not None:
            on_step(step, history[-1])
        if step % 25 == 0 or step == config.steps - 1:
            logger.info(f"clamnet step {step + 1}/{config.steps} loss {history[-1]:.4f} ({time.time() - t0:.0f} s)")
    return pair.eval(), history


def _synced(net: torch.nn.Module, config: ClamNetConfig) -> DistributedDataParallel:
    """`net` under DDP; without deep supervision UNet++'s shallower heads are unused, which DDP must be told."""
    return DistributedDataParallel(net, find_unused_parameters=not config.deep_supervision)


def _share(batch: PairBatch, rank: int, world: int) -> PairBatch:
    """Pairs rank, rank + world, ... of `batch` (all of them in one process)."""
    if world == 1:
        return batch
    moved = {f.name: getattr(batch, f.name) for f in fields(batch)}
    return replace(batch, **{k: v[rank::world] for k, v in moved.items() if v is not None})


def level_partners(
    slices: WeakSlices, k: int, window: float
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """pairing `level`: (abnormal slice -> its k level-matched normal slices of other studies, normal slice -> the
    same), the NEGATIVE and NORMAL partners (`pairs.level_normals`)."""
    level = slice_levels(slices)
    found = level_normals(
        torch.arange(len(slices)), slices.abnormal, slices.study, level, slices.x, slices.organ, k, window
    )
    ab = slices.abnormal
    return {i: m[0] for i, m in found.items() if ab[i]}, {i: m[0] for i, m in found.items() if not ab[i]}


def _on(batch: PairBatch, device: torch.device) -> PairBatch:
    """The batch with its tensors on `device` (a no-op on the CPU)."""
    if device.type == "cpu":
        return batch
    moved = {f.name: getattr(batch, f.name) for f in fields(batch)}
    return replace(batch, **{k: v.to(device) for k, v in moved.items() if isinstance(v, torch.Tensor)})


@dataclass
class ClamNetFit:
    """A trained pair (eval mode, on the device it trained on), its loss per step, its data record, its file."""

    pair: ClamNetPair
    history: list[float]
    data: dict[str, Any]
    path: Path | None


def fit_clamnet(
    slices: WeakSlices,
    config: ClamNetConfig,
    out: str | os.PathLike | None = None,
    data: dict[str, Any] | None = None,
    device: str | torch.device = "auto",
    on_step: Callable[[int, float], None] | None = None,
) -> ClamNetFit:
    """ClamNet's one recipe (the CLI and the app task call it; they differ only in where `slices` come from):
    train on `device`, record the data (`data`, default: studies, slice and abnormal counts), write `out`."""
    pair, history = train_clamnet(slices, config, on_step, device)
    data = data if data is not None else weak_slices_record(slices)
    if out is not None and distributed.is_main():  # under torchrun rank 0 writes
        save_clamnet(pair, config, data, out, history)
    return ClamNetFit(pair, history, data, Path(out) if out is not None else None)


def weak_slices_record(slices: WeakSlices) -> dict[str, Any]:
    """What a model file records of its training slices: studies, slice count, abnormal slice count."""
    return {"studies": sorted(set(slices.study)), "slices": len(slices), "abnormal": int(slices.abnormal.sum())}


def save_clamnet(
    pair: ClamNetPair,
    config: ClamNetConfig,
    data: dict[str, Any],
    path: str | os.PathLike,
    history: list[float] | None = None,
) -> None:
    """Atomic checkpoint: kind 'clamnet', config, data description, both networks' weights (from CPU copies, so
    the file loads on any device), loss history."""
    state = {k: v.detach().cpu() for k, v in pair.state_dict().items()}
    save_checkpoint(
        {"kind": KIND, "config": asdict(config), "data": data, "state": state, "history": history or []},
        path,
    )


def load_clamnet(path: str | os.PathLike, device: str | torch.device = "auto") -> tuple[ClamNetPair, ClamNetConfig]:
    """(pair in eval mode on `device`, config); LabelFactoryError 409 'train clamnet first' when the file is
    missing."""
    payload = load_checkpoint(path, KIND)
    config = ClamNetConfig.from_dict(payload["config"])
    pair = build_pair(config)
    pair.load_state_dict(payload["state"])
    return pair.to(resolve_device(device)).eval(), config
