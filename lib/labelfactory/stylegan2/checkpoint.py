"""The published generator file (`<model_dir>/stylegan2.pt`): EMA generator weights, its config and kimg.

Training state (G, D, optimisers, ADA p, counters) lives in a separate, larger file the
training loop writes (see `labelfactory.stylegan2.training`). A file published with its discriminator
(and ADA p) also lets a new run continue from it, as NVlabs' `--resume` does from a network
snapshot: weights kept, optimisers restarted (`read_warm_start`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from labelfactory.checkpoints import load_checkpoint, save_checkpoint
from labelfactory.devices import resolve_device
from labelfactory.errors import LabelFactoryError, ModelMissing
from labelfactory.stylegan2.networks import GENERATOR_LAYOUT, Generator

KIND = "stylegan2"
MODEL_FILE = f"{KIND}.pt"  # in a model folder


def publish_generator(
    G_ema: Generator,
    generator_kwargs: dict[str, Any],
    path: str | os.PathLike,
    config: dict[str, Any],
    data: dict[str, Any],
    kimg: float,
    discriminator: tuple[torch.nn.Module, dict[str, Any], float] | None = None,
) -> Path:
    """Atomically write the EMA generator (weights on CPU) with the training config, data summary and kimg.

    `discriminator` = (D, its kwargs, ADA p) also stores what a later run needs to continue from this file.
    """
    payload = {
        "kind": KIND,
        "config": config,
        "data": data,
        "kimg": float(kimg),
        "generator": {"kwargs": dict(generator_kwargs), "layout": GENERATOR_LAYOUT, "state_dict": _cpu(G_ema)},
    }
    if discriminator is not None:
        D, kwargs, augment_p = discriminator
        payload["discriminator"] = {"kwargs": dict(kwargs), "state_dict": _cpu(D), "augment_p": float(augment_p)}
    return save_checkpoint(payload, path)


def _cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def read_warm_start(path: str | os.PathLike) -> dict[str, Any]:
    """What a new run continues from: {kimg, generator: state, discriminator: state | None, augment_p, config}.

    Raises LabelFactoryError for a file of an earlier generator layout (its weights would not fit).
    """
    payload = load_checkpoint(path, KIND)
    layout = payload["generator"].get("layout", 1)
    if layout != GENERATOR_LAYOUT:
        raise LabelFactoryError(
            f"{Path(path).name} holds generator layout {layout}; this version reads {GENERATOR_LAYOUT}"
        )
    disc = payload.get("discriminator")
    return {
        "kimg": float(payload["kimg"]),
        "config": payload["config"],
        "generator": payload["generator"]["state_dict"],
        "discriminator": disc["state_dict"] if disc else None,
        "augment_p": disc["augment_p"] if disc else 0.0,
    }


def load_generator(path: str | os.PathLike, device: str | torch.device = "auto") -> Generator:
    """The published EMA generator in eval mode, frozen, on `device` (`labelfactory.devices`), with
    `.checkpoint_info` = {config, provenance, kimg, data}.

    Raises ModelMissing(model="stylegan2") (409, "train stylegan2 first") when the file is missing or unusable.
    """
    try:
        payload = load_checkpoint(path, KIND)
    except ModelMissing:
        raise
    except LabelFactoryError as e:  # corrupt, changed or another kind of file
        raise ModelMissing(f"{e}: train stylegan2 first", model=KIND) from None
    layout = payload.get("generator", {}).get("layout", 1)
    if layout != GENERATOR_LAYOUT:
        raise ModelMissing(
            f"{Path(path).name} was trained with an earlier generator layout ({layout}, this version reads "
            f"{GENERATOR_LAYOUT}): import or retrain stylegan2",
            model=KIND,
        )
    try:
        G = Generator(**payload["generator"]["kwargs"])
        G.load_state_dict(payload["generator"]["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ModelMissing(
            f"{Path(path).name} does not hold a usable generator ({type(e).__name__}): train stylegan2 first",
            model=KIND,
        ) from None
    G = G.to(resolve_device(device)).eval().requires_grad_(False)
    G.checkpoint_info = {
        "config": payload["config"],
        "provenance": payload["provenance"],
        "kimg": payload["kimg"],
        "data": payload["data"],
    }
    return G
