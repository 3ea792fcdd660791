"""The simulated annotator of the scripted loop finds the lungs on real CT slices."""

from __future__ import annotations

import numpy as np
import pytest

from labelfactory.annotator import hu_rule_annotator
from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image, read_image
from labelfactory.io.slices import reorient
from labelfactory.labels import LABEL_NAMES
from labelfactory.stylegan2.identity import parse_seeds


def _dice(a, b):
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def test_hu_rule_annotator_finds_each_lung_on_its_side(sample):
    image, _ = reorient(read_image(sample / "datastore" / "torso_3mm.nii.gz"))
    label, _ = reorient(read_image(sample / "datastore" / "labels" / "final" / "torso_3mm.nii.gz"))
    lung_slices = [z for z in range(label.array.shape[0]) if (label.array[z] == LABEL_NAMES["right lung"]).sum() > 400]
    assert lung_slices, "the torso study has lung slices"
    for z in lung_slices:
        sl = Image(image.array[z], image.spacing[:2], image.origin[:2], (1.0, 0.0, 0.0, 1.0))
        mask = hu_rule_annotator(sl)
        for name in ("left lung", "right lung"):
            v = LABEL_NAMES[name]
            assert _dice(mask == v, label.array[z] == v) > 0.8, (z, name)
        assert set(np.unique(mask)) <= {0, LABEL_NAMES["left lung"], LABEL_NAMES["right lung"]}


def test_hu_rule_annotator_on_air_and_on_volumes():
    air = Image(np.full((32, 32), -1000, np.int16), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    assert not hu_rule_annotator(air).any()
    with pytest.raises(LabelFactoryError, match="2D slice"):
        hu_rule_annotator(Image(np.zeros((2, 8, 8), np.int16), (1.0,) * 3, (0.0,) * 3, tuple(np.eye(3).ravel())))


def test_parse_seeds():
    assert parse_seeds("0-3,7,2") == [0, 1, 2, 3, 7]
    with pytest.raises(LabelFactoryError, match="seeds must look like"):
        parse_seeds("a-b")
