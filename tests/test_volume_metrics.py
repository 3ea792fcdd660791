"""Per-patient 3D scores (labelfactory.evaluation.volume): only contoured organs count; HD95 in mm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from labelfactory.evaluation.volume import mean_dice, organ_scores, patient_scores


def _two_organs():
    """Truth: organ 1 a 2x2x2 cube (8 voxels), organ 2 a bar (4 voxels); prediction: 4 voxels of organ 1, and organ 2
    drawn where the truth has nothing."""
    truth = np.zeros((4, 6, 6), np.int64)
    truth[0:2, 0:2, 0:2] = 1
    truth[3, 4, 0:4] = 2
    pred = np.zeros_like(truth)
    pred[0, 0:2, 0:2] = 1
    pred[2, 5, 0:3] = 2
    return pred, truth


def test_dice_is_scored_only_for_contoured_organs():
    pred, truth = _two_organs()
    every = organ_scores(pred, truth, [True, True, True], (1.0, 1.0, 1.0))
    assert every[1]["dice"] == pytest.approx(2 * 4 / (4 + 8)) and every[2]["dice"] == 0.0
    partial = organ_scores(pred, truth, [True, True, False], (1.0, 1.0, 1.0))  # organ 2 not contoured
    assert list(partial) == [1]
    assert mean_dice(every) == pytest.approx((2 / 3 + 0) / 2) and mean_dice(partial) == pytest.approx(2 / 3)
    assert math.isnan(mean_dice(organ_scores(pred, truth, [True, False, False], (1.0, 1.0, 1.0))))


def test_an_organ_missing_from_both_scores_dice_one_and_no_hd95():
    empty = np.zeros((2, 3, 3), np.int64)
    [s] = organ_scores(empty, empty, [True, True], (1.0, 1.0, 1.0)).values()
    assert s["dice"] == 1.0 and math.isnan(s["hd95"])


@pytest.mark.parametrize(
    ("axis", "spacing", "mm"), [(0, (2.0, 1.0, 1.0), 10.0), (2, (2.0, 1.0, 0.5), 2.5), (1, (1.0, 3.0, 1.0), 15.0)]
)
def test_hd95_of_a_shifted_cube_is_the_shift_in_mm(axis, spacing, mm):
    """A 3x3x3 cube moved 5 voxels along one axis: the far face lies 5 voxels from the other cube's nearest face,
    and over 26 surface voxels (9 at 3, 8 at 4, 9 at 5 voxels) the 95th percentile is 5 voxels, times that axis's
    spacing."""
    truth = np.zeros((10, 10, 10), np.int64)
    truth[1:4, 1:4, 1:4] = 1
    pred = np.roll(truth, 5, axis=axis)
    [s] = organ_scores(torch.from_numpy(pred), torch.from_numpy(truth), torch.tensor([True, True]), spacing).values()
    assert s["dice"] == 0.0 and s["hd95"] == pytest.approx(mm)


def test_patient_scores_name_the_organs_and_average_over_the_contoured_ones():
    pred, truth = _two_organs()
    record = patient_scores(pred, truth, np.array([True, True, False]), (1.0, 1.0, 1.0), {1: "liver", 2: "spleen"})
    assert record["contoured"] == ["liver"] and record["mean_dice"] == pytest.approx(2 / 3)
    # the predicted face z=0 lies on the truth's surface; the truth's face z=1 is 1 mm from the prediction
    assert record["organs"]["liver"]["hd95"] == pytest.approx(1.0) and record["mean_hd95"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        organ_scores(pred[:2], truth, [True, True], (1.0, 1.0, 1.0))
