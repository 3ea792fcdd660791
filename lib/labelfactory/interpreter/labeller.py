"""The trained interpreter beside its generator: latents -> (image, mask, uncertainty); its model file.

Model file `<model_dir>/interpreter.pt` (kind "interpreter"): the ensemble's weights and config,
the label names, the training config and data, and which generator it was trained on (the
generator checkpoint's provenance time). Loading it beside another generator is refused:
its features mean something else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from labelfactory.checkpoints import load_checkpoint, save_checkpoint
from labelfactory.errors import LabelFactoryError
from labelfactory.interpreter.ensemble import EnsembleConfig, PixelEnsemble
from labelfactory.interpreter.taps import TapLayout, generate_with_taps
from labelfactory.interpreter.uncertainty import image_score

KIND = "interpreter"
MODEL_FILE = "interpreter.pt"


def generator_identity(G) -> str | None:
    """The generator checkpoint's provenance time (what latent records and interpreters name), if loaded from one."""
    info = getattr(G, "checkpoint_info", None) or {}
    return (info.get("provenance") or {}).get("time")


@dataclass
class Labelled:
    """A batch of generated pairs: image (B, 1, R, R) in [-1, 1], mask (B, R, R) int64,
    uncertainty (B, R, R) JS divergence in nats, score (B,) mean of the top 10% uncertainty."""

    image: torch.Tensor
    mask: torch.Tensor
    uncertainty: torch.Tensor
    score: torch.Tensor


class Interpreter:
    """Generator + factorized ensemble. `label(ws)` regenerates the taps and labels every pixel."""

    def __init__(self, G, ensemble: PixelEnsemble, label_names: dict[str, int], coarse_to_fine: bool = False, identity: str | None = None):
        if TapLayout.of(G) != ensemble.config.layout:
            raise LabelFactoryError("the interpreter was trained on a generator with other feature taps: train interpreter again", status=409)
        self.G, self.label_names, self.identity = G, dict(label_names), identity  # identity: the model file's provenance time
        device = next(G.parameters()).device
        self.ensemble = ensemble.eval()
        self.factorized = ensemble.factorized(coarse_to_fine).to(device)

    @torch.no_grad()
    def label(self, ws: torch.Tensor, top_fraction: float = 0.1) -> Labelled:
        """ws (B, num_ws, w_dim) -> Labelled; deterministic (constant noise)."""
        img, taps = generate_with_taps(self.G, ws)
        mask, js = self.factorized.vote_and_uncertainty(taps)
        return Labelled(img, mask, js, image_score(js, top_fraction))


def save_interpreter(path: str | os.PathLike, ensemble: PixelEnsemble, label_names: dict[str, int], train_config: dict, data: dict, G) -> Path:
    """Atomically publish the ensemble with its config, data summary and the generator it belongs to."""
    payload = {
        "kind": KIND,
        "config": {"ensemble": ensemble.config.to_dict(), "train": train_config, "label_names": dict(label_names)},
        "data": data,
        "generator": generator_identity(G),
        "state_dict": {k: v.detach().cpu() for k, v in ensemble.state_dict().items()},
    }
    return save_checkpoint(payload, path)


def load_interpreter(path: str | os.PathLike, G, coarse_to_fine: bool = False) -> Interpreter:
    """Load `interpreter.pt` for generator G; LabelFactoryError(409) if missing, corrupt or made for another generator."""
    payload = load_checkpoint(path, KIND)
    trained_on, current = payload.get("generator"), generator_identity(G)
    if trained_on != current:
        raise LabelFactoryError(
            f"{Path(path).name} was trained on the generator of {trained_on}, the current one is from {current}: train interpreter again",
            status=409,
        )
    try:
        ens = PixelEnsemble(EnsembleConfig.from_dict(payload["config"]["ensemble"]))
        ens.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise LabelFactoryError(f"{Path(path).name} does not hold a usable interpreter ({type(e).__name__}): train interpreter again", status=409) from None
    return Interpreter(G, ens, payload["config"]["label_names"], coarse_to_fine, identity=payload["provenance"].get("time"))
