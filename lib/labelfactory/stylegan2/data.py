"""Training data for the GAN: every axial slice of the real images, resampled to R x R and windowed to [-1, 1]."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from labelfactory.errors import LabelFactoryError
from labelfactory.io.dataset import find_studies, load_slices


def real_image_paths(folder: str | os.PathLike) -> list[Path]:
    """The images of a studies folder (a MONAI Label local datastore layout), sorted by id."""
    return [s.image for s in find_studies(folder)]


def load_training_slices(images: list[Path], resolution: int) -> torch.Tensor:
    """(N, 1, resolution, resolution) float32 in [-1, 1] from all slices of `images` (CT window of the foundation)."""
    if not images:
        raise LabelFactoryError("no real images to train the GAN on: add CT volumes to the datastore first")
    return load_slices(images, resolution)


def openkbp_training_slices(root: str | os.PathLike, split: str, resolution: int) -> tuple[torch.Tensor, dict]:
    """(N, 1, R, R) body-centred crops of an OpenKBP split at native spacing, and the data record for the checkpoint."""
    from labelfactory.datasets import openkbp

    cases = openkbp.load_slices(root, split, resolution, min_body=openkbp.MIN_BODY_PIXELS)  # mostly-air slices out
    images = torch.cat([c.images for c in cases])
    info = {
        "dataset": "openkbp",
        "split": split,
        "patients": [c.case.name for c in cases],
        "slices": len(images),
        "crop": f"{resolution} px body-centred, native spacing",
        "window_hu": [openkbp.WINDOW.low, openkbp.WINDOW.high],
    }
    return images, info
