"""What names a generator and its images: the generator's identity, a seed's name, a generated slice as a CT Image."""

from __future__ import annotations

import numpy as np
import torch

from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image, Window


def generator_identity(G) -> str | None:
    """The generator checkpoint's provenance time (what latent records and interpreters name), if loaded from one."""
    info = getattr(G, "checkpoint_info", None) or {}
    return (info.get("provenance") or {}).get("time")


def generator_window(G) -> Window:
    """The HU window a loaded generator's training images were made with (its data record), else the default."""
    low_high = ((getattr(G, "checkpoint_info", None) or {}).get("data") or {}).get("window_hu")
    if not low_high:
        return Window()
    low, high = (float(v) for v in low_high)
    return Window(level=(low + high) / 2, width=high - low)


def seed_name(seed: int) -> str:
    """The file stem of seed N's generated image: seed000042."""
    return f"seed{int(seed):06d}"


def generated_to_image(
    img: torch.Tensor, window: Window = Window(), spacing: tuple[float, float] = (1.0, 1.0)
) -> Image:
    """One generated image (1, 1, R, R) or (R, R) in [-1, 1] -> 2D Image in HU, int16, origin 0, identity direction."""
    arr = img.detach().float().cpu().numpy().reshape(img.shape[-2:])
    hu = np.rint(window.to_hu(arr)).astype(np.int16)
    return Image(hu, tuple(float(s) for s in spacing), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))


def parse_seeds(text: str) -> list[int]:
    """'0-29', '1,5,9' or '0-9,20' (inclusive ranges) -> the sorted unique seeds; LabelFactoryError otherwise."""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise LabelFactoryError(f"--seeds {text!r}: seeds must look like 0-29 or 1,5,9 (inclusive ranges)")
        out.update(range(int(lo), int(hi or lo) + 1))
    return sorted(out)
