"""The trained interpreter beside its generator: latents -> (image, mask, uncertainty); its model file.

Model file `<model_dir>/datasetgan.pt` (kind "datasetgan"; files of before the rename, `interpreter.pt`
of kind "interpreter", are still read, see `model_file`): the ensemble's weights and config,
the label names, the training config and data, and which generator it was trained on (its
identity, `labelfactory.stylegan2.identity`). Loading it beside another generator is refused: its
features mean something else.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from labelfactory.checkpoints import load_checkpoint, save_checkpoint
from labelfactory.datasetgan.ensemble import EnsembleConfig, PixelEnsemble
from labelfactory.datasetgan.taps import TapLayout, generate_with_taps
from labelfactory.datasetgan.uncertainty import image_score
from labelfactory.devices import module_device, use_bf16
from labelfactory.errors import ModelMissing
from labelfactory.labels import map_of
from labelfactory.stylegan2.identity import generator_identity

logger = logging.getLogger(__name__)

KIND = "datasetgan"
MODEL_FILE = f"{KIND}.pt"  # in a model folder, beside the generator's
LEGACY_KIND = "interpreter"  # the family's name before it was DatasetGAN's everywhere
LEGACY_FILE = f"{LEGACY_KIND}.pt"


def model_file(model_dir: str | os.PathLike) -> Path:
    """The folder's DatasetGAN model file: `datasetgan.pt`, or a models folder's older `interpreter.pt` (logged)."""
    path, legacy = Path(model_dir) / MODEL_FILE, Path(model_dir) / LEGACY_FILE
    if not path.exists() and legacy.exists():
        logger.warning(
            "%s: reading %s, the file's name before 'datasetgan'; training writes %s",
            model_dir,
            LEGACY_FILE,
            MODEL_FILE,
        )
        return legacy
    return path


@dataclass
class Labelled:
    """A batch of generated pairs: image (B, 1, R, R) in [-1, 1], mask (B, R, R) int64,
    uncertainty (B, R, R) JS divergence in nats, score (B,) mean of the top 10% uncertainty."""

    image: torch.Tensor
    mask: torch.Tensor
    uncertainty: torch.Tensor
    score: torch.Tensor


class Interpreter:
    """Generator + factorized ensemble. `label(ws)` regenerates the taps and labels every pixel.

    identity: the interpreter model file's provenance time (what synthesized pairs record). precision: `auto` |
    `fp32` | `bf16` (`labelfactory.devices`; auto: bf16 on CUDA): the ensemble's weights and the taps it reads in
    that dtype (the generator stays fp32); `self.precision` is the one used, "fp32" or "bf16", which pairs record.
    """

    def __init__(
        self,
        G,
        ensemble: PixelEnsemble,
        label_names: dict[str, int],
        identity: str | None = None,
        precision: str = "auto",
    ):
        if TapLayout.of(G) != ensemble.config.layout:
            msg = "the interpreter was trained on a generator with other feature taps: train datasetgan again"
            raise ModelMissing(msg, model=KIND)
        self.G, self.label_names, self.identity = G, dict(label_names), identity
        self.device = module_device(G)
        self.ensemble = ensemble.eval()
        self.precision = "bf16" if use_bf16(self.device, precision) else "fp32"
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.factorized = ensemble.factorized().to(self.device, dtype)

    @torch.no_grad()
    def label(self, ws: torch.Tensor, top_fraction: float = 0.1) -> Labelled:
        """ws (B, num_ws, w_dim), any device -> Labelled, on the generator's device; deterministic (constant
        noise)."""
        img, taps = generate_with_taps(self.G, ws.to(self.device))
        mask, js = self.factorized.vote_and_uncertainty(taps)
        return Labelled(img, mask, js, image_score(js, top_fraction))


def save_interpreter(
    path: str | os.PathLike, ensemble: PixelEnsemble, label_names: dict[str, int], train_config: dict, data: dict, G
) -> Path:
    """Atomically publish the ensemble with its config, data summary and the generator it belongs to."""
    payload = {
        "kind": KIND,
        "config": {"ensemble": ensemble.config.to_dict(), "train": train_config, "label_names": dict(label_names)},
        "data": data,
        "generator": generator_identity(G),
        "label_map": map_of(label_names).record(),  # names, values and colours (labelfactory.labels)
        "state_dict": {k: v.detach().cpu() for k, v in ensemble.state_dict().items()},
    }
    return save_checkpoint(payload, path)


def load_interpreter(path: str | os.PathLike, G, precision: str = "auto") -> Interpreter:
    """Load `datasetgan.pt` for generator G, labelling at `precision` (`Interpreter`); ModelMissing (409) if
    missing, corrupt or made for another generator."""
    payload = load_checkpoint(path, (KIND, LEGACY_KIND))
    name, trained_on, current = Path(path).name, payload.get("generator"), generator_identity(G)
    if trained_on != current:
        msg = f"{name} was trained on the generator of {trained_on}, the current one is from {current}"
        raise ModelMissing(f"{msg}: train datasetgan again", model=KIND)
    try:
        ens = PixelEnsemble(EnsembleConfig.from_dict(payload["config"]["ensemble"]))
        ens.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:
        msg = f"{name} does not hold a usable interpreter ({type(e).__name__}): train datasetgan again"
        raise ModelMissing(msg, model=KIND) from None
    identity = payload["provenance"].get("time")
    return Interpreter(G, ens, payload["config"]["label_names"], identity=identity, precision=precision)
