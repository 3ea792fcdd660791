"""A stand-in annotator backed by a trained segmentation model (`--annotator-model PATH`).

Where no radiologist is at hand (experiments, benchmarks), a segmenter trained on real contours
labels the generated slices that the protocol picks, through the same `segmentation` infer path
the server runs (so its slicing and window are the model's own), and submits them with the
model's own label names, as a person in 3D Slicer would.
"""

from __future__ import annotations

import os

import numpy as np

from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image


class ModelAnnotator:
    """Callable (image, prediction) -> (H, W) uint8 label of a 2D CT slice in HU; `label_names` name -> value."""

    def __init__(self, path: str | os.PathLike, device: str = "auto"):
        from labelfactory.segmentation.infer import load_segmenter

        self.path = str(path)
        self.segmenter = load_segmenter(path, device)
        self.label_names = dict(self.segmenter.label_names)

    def __call__(self, image: Image, prediction: Image | None = None) -> np.ndarray:
        from labelfactory.segmentation.infer import segment_image

        if image.ndim != 2:
            raise LabelFactoryError(f"the model annotator labels 2D slices, got shape {image.array.shape}")
        return segment_image(self.segmenter, image).array.astype(np.uint8)
