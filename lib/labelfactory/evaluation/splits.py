"""Patient-wise K-fold splits: items are grouped (a real slice by its study, a synthetic pair by its seed)
and whole groups go to a fold, so no patient is ever in both training and test."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from labelfactory.errors import LabelFactoryError


def group_folds(groups: Sequence[str], n_folds: int, seed: int = 0) -> list[list[int]]:
    """Item indices of each of `n_folds` folds; groups shuffled by `seed` and dealt round-robin, largest first,
    so folds hold near-equal numbers of items. LabelFactoryError if there are fewer groups than folds."""
    unique = sorted(set(groups))
    if len(unique) < n_folds:
        raise LabelFactoryError(
            f"{len(unique)} patient(s) cannot make {n_folds} patient-wise folds; "
            f"pass fewer folds (at most {len(unique)}) or add labelled studies"
        )
    rng = np.random.default_rng(seed)
    order = [unique[i] for i in rng.permutation(len(unique))]
    members: dict[str, list[int]] = {g: [] for g in unique}
    for i, g in enumerate(groups):
        members[g].append(i)
    order.sort(key=lambda g: -len(members[g]))  # stable: ties keep the shuffled order
    folds: list[list[int]] = [[] for _ in range(n_folds)]
    for g in order:
        min(folds, key=len).extend(members[g])
    return [sorted(f) for f in folds]


def train_test(folds: list[list[int]], test_fold: int) -> tuple[list[int], list[int]]:
    """(training indices, test indices) with fold `test_fold` held out."""
    train = sorted(i for k, f in enumerate(folds) if k != test_fold for i in f)
    return train, list(folds[test_fold])


def check_disjoint(groups: Sequence[str], *index_sets: Sequence[int]) -> None:
    """Raise if any group has items in more than one of `index_sets` (a patient leaking across splits)."""
    seen: dict[str, int] = {}
    for k, idx in enumerate(index_sets):
        for i in idx:
            if seen.setdefault(groups[i], k) != k:
                raise LabelFactoryError(f"group {groups[i]!r} is in two splits")
