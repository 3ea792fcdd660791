"""A simulated annotator for generated CT slices, and `labelfactory annotate` to apply it offline.

It stands in for the radiologist in tests, the scripted loop and the demo models: a rule on HU
ranges that labels the lungs (the one structure such a rule gets right). A person correcting the
interpreter's masks in 3D Slicer is the real annotator.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from labelfactory.devices import add_device_argument
from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image, write_image
from labelfactory.labels import LABEL_NAMES
from labelfactory.latent_record import TRUNCATION_PSI
from labelfactory.stylegan2.identity import generated_to_image, generator_window, parse_seeds, seed_name


def hu_rule_annotator(image: Image, prediction: Image | None = None) -> np.ndarray:
    """Simulated annotator for an axial CT slice in HU (H, W) -> label (H, W) uint8.

    Lungs are the air regions (< -400 HU) enclosed by the body (> -500 HU, holes filled), not
    touching the image border; left/right by the body's midline (the image's left half is the
    patient's right, radiological view). Everything else stays background.
    """
    hu = image.array.astype(np.float32)
    if hu.ndim != 2:
        raise LabelFactoryError(f"the simulated annotator takes a 2D slice, got shape {hu.shape}")
    body, n = ndimage.label(hu > -500)
    if n == 0:
        return np.zeros(hu.shape, np.uint8)
    largest = 1 + int(np.argmax(ndimage.sum(np.ones_like(hu), body, range(1, n + 1))))
    inside = ndimage.binary_fill_holes(body == largest)
    air, m = ndimage.label((hu < -400) & inside)
    touching = set(np.unique(np.concatenate([air[0], air[-1], air[:, 0], air[:, -1]]))) - {0}
    lungs = (air > 0) & ~np.isin(air, list(touching))
    lungs = ndimage.binary_opening(lungs, iterations=1)
    cols = np.nonzero(inside.any(axis=0))[0]
    mid = (cols[0] + cols[-1]) / 2
    out = np.zeros(hu.shape, np.uint8)
    xs = np.arange(hu.shape[1])[None, :]
    out[lungs & (xs < mid)] = LABEL_NAMES["right lung"]
    out[lungs & (xs >= mid)] = LABEL_NAMES["left lung"]
    return out


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generator", required=True, help="generator file (stylegan2.pt)")
    p.add_argument("--seeds", default="0-29", help="seeds to generate and annotate, e.g. 0-29")
    p.add_argument("--truncation-psi", type=float, default=TRUNCATION_PSI, help=f"(default: {TRUNCATION_PSI})")
    p.add_argument(
        "--out",
        required=True,
        help="folder for seed<N>.nii.gz masks (what train-datasetgan --labels reads) and the images",
    )
    p.add_argument(
        "--annotator-model",
        default=None,
        help="segmentation model file that labels the images (labelfactory.annotator_model); default: the HU rule",
    )
    add_device_argument(p)


def run(args: argparse.Namespace) -> int:
    from labelfactory.annotator_model import ModelAnnotator
    from labelfactory.datasetgan.taps import ws_from_seeds
    from labelfactory.stylegan2.checkpoint import load_generator

    G = load_generator(args.generator, args.device)
    annotate = ModelAnnotator(args.annotator_model, args.device) if args.annotator_model else hu_rule_annotator
    label_names = getattr(annotate, "label_names", LABEL_NAMES)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts = {}
    for seed in parse_seeds(args.seeds):
        img = G.synthesis(ws_from_seeds(G, [seed], args.truncation_psi), noise_mode="const")
        image = generated_to_image(img[0], generator_window(G))
        mask = annotate(image)
        write_image(image, out / "images" / f"{seed_name(seed)}.nii.gz")
        write_image(image.with_array(mask), out / f"{seed_name(seed)}.nii.gz")
        counts[seed] = {n: int((mask == v).sum()) for n, v in label_names.items() if v and (mask == v).any()}
    print(json.dumps({"out": str(out), "annotated": counts}, indent=1))
    return 0
