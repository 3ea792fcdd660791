"""Label maps: each data set's organ names, values and colours; the registry of known maps.

The label map belongs to the data set. A model records the map it was trained with (its
checkpoint's `label_map`, `LabelMap.record()`); the app serves the map of the models it serves
and refuses a model trained under another (`require_same_map`, 409). Names follow 3D Slicer's
GenericAnatomyColors where the table has the structure, so Slicer colours segments by name;
colours are that table's RGB (0-255) so files we write look the same as what Slicer shows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labelfactory.errors import LabelFactoryError

logger = logging.getLogger(__name__)
RGB = tuple[int, int, int]
UNKNOWN_COLOR: RGB = (128, 128, 128)


@dataclass(frozen=True)
class LabelMap:
    """A data set's labels: `name` (its registry key), `organs` value -> (name, RGB 0-255); 0 is background."""

    name: str
    organs: dict[int, tuple[str, RGB]]

    @property
    def values(self) -> dict[str, int]:
        """name -> value, background (0) first: what /info `labels` and the models' `label_names` hold."""
        return {"background": 0, **{n: v for v, (n, _) in sorted(self.organs.items())}}

    @property
    def colors(self) -> dict[str, RGB]:
        """name -> RGB (0-255) of each organ."""
        return {n: rgb for n, rgb in self.organs.values()}

    def record(self) -> dict[str, Any]:
        """Plain data for a checkpoint (loadable with weights_only): name, labels (name -> value), colors."""
        return {"name": self.name, "labels": self.values, "colors": {n: list(c) for n, c in self.colors.items()}}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LabelMap:
        colors = record.get("colors") or {}
        organs = {int(v): (n, tuple(colors.get(n, UNKNOWN_COLOR))) for n, v in record["labels"].items() if int(v)}
        return cls(str(record.get("name") or "unnamed"), organs)

    def describe(self) -> str:
        """'name' (1=a, 2=b, ...), for messages."""
        return f"'{self.name}' ({', '.join(f'{v}={n}' for v, (n, _) in sorted(self.organs.items()))})"


# the TotalSegmentator sample (sample-data/datastore): value -> (name, RGB)
TOTALSEGMENTATOR = LabelMap(
    "totalsegmentator",
    {
        1: ("liver", (221, 130, 101)),
        2: ("spleen", (157, 108, 162)),
        3: ("left kidney", (185, 102, 83)),
        4: ("right kidney", (185, 102, 83)),
        5: ("stomach", (216, 132, 105)),
        6: ("aorta", (224, 97, 76)),
        7: ("left lung", (197, 165, 145)),
        8: ("right lung", (172, 138, 115)),
    },
)
# OpenKBP head and neck (sample-data/openkbp, labelfactory.datasets.openkbp.ORGANS). GenericAnatomyColors has no
# brainstem or parotid entry: brainstem takes its "midbrain" colour, the parotids its "salivary glands" colour
OPENKBP = LabelMap(
    "openkbp",
    {
        1: ("brainstem", (145, 92, 109)),
        2: ("spinal cord", (244, 214, 49)),
        3: ("right parotid gland", (70, 163, 117)),
        4: ("left parotid gland", (70, 163, 117)),
        5: ("esophagus", (211, 171, 143)),
        6: ("larynx", (150, 208, 243)),
        7: ("mandible", (222, 198, 101)),
    },
)
LABEL_MAPS: dict[str, LabelMap] = {m.name: m for m in (TOTALSEGMENTATOR, OPENKBP)}
DEFAULT = TOTALSEGMENTATOR
LABELLED_MODELS = ("segmentation.pt", "datasetgan.pt", "interpreter.pt")  # model files that record a map (last: legacy)

# the default map's tables, as most of the library takes them
ORGANS = TOTALSEGMENTATOR.organs
LABEL_NAMES: dict[str, int] = TOTALSEGMENTATOR.values
LABEL_COLORS: dict[str, RGB] = TOTALSEGMENTATOR.colors


def label_map(name: str) -> LabelMap:
    """The registered map `name`; LabelFactoryError naming the known ones otherwise."""
    if name not in LABEL_MAPS:
        raise LabelFactoryError(f"unknown label map {name!r}; known: {', '.join(sorted(LABEL_MAPS))}")
    return LABEL_MAPS[name]


def map_of(label_names: dict[str, int]) -> LabelMap:
    """The registered map with exactly these name -> value pairs, else an 'unnamed' one with grey colours."""
    for m in LABEL_MAPS.values():
        if m.values == dict(label_names):
            return m
    return LabelMap("unnamed", {int(v): (n, UNKNOWN_COLOR) for n, v in label_names.items() if int(v)})


def recorded_map(payload: dict[str, Any]) -> LabelMap:
    """The map a checkpoint payload records: its `label_map`, else (older files) its config's `label_names`."""
    if payload.get("label_map"):
        return LabelMap.from_record(payload["label_map"])
    return map_of(payload["config"]["label_names"])


def require_same_map(trained: dict[str, int], served: dict[str, int], model_file: str) -> None:
    """LabelFactoryError 409 when a model trained with the map `trained` (name -> value) would serve under `served`."""
    if dict(trained) == dict(served):
        return
    mine = map_of(trained)
    raise LabelFactoryError(
        f"{model_file} was trained with the label map {mine.describe()}, but this server serves "
        f"{map_of(served).describe()}: serve that model with its own data set (--conf labels {mine.name}, "
        "or its own --models folder), or train it again on this one",
        status=409,
    )


def served_map(
    configured: str | None, model_dir: str | os.PathLike, fallback: str | None = None
) -> tuple[LabelMap, str]:
    """The map a server on `model_dir` serves, and why: `configured` (a registered name) when given, else the
    map its labelled models record (the first of LABELLED_MODELS that loads), else `fallback` (the data set's
    own map, what `labelfactory serve` passes for a bundled sample), else DEFAULT; the last two with a warning,
    so a server whose labelled models are missing or damaged never silently serves another data set's map."""
    if configured:
        return label_map(configured), "configured"
    from labelfactory.checkpoints import load_checkpoint  # torch: only where a server starts

    unread = []
    for name in LABELLED_MODELS:
        path = Path(model_dir) / name
        if path.is_file():
            try:
                return recorded_map(load_checkpoint(path)), f"recorded by {name}"
            except (LabelFactoryError, KeyError) as e:
                logger.warning(f"{path}: no label map read ({e}); trying the next model")
                unread.append(f"{name} damaged")
        else:
            unread.append(f"{name} missing")
    state = ", ".join(unread)
    if fallback:
        chosen, why = label_map(fallback), f"the data set's own map, as no model records one ({state})"
    else:
        chosen = DEFAULT
        why = f"the default map, as no model records one ({state}); if the data set has another: --conf labels NAME"
    logger.warning(f"label map {chosen.describe()}: {why}")
    return chosen, why


# TotalSegmentator "total" class number -> our value (everything else becomes background)
TOTALSEG_TO_APP: dict[int, int] = {
    5: 1,
    1: 2,
    3: 3,
    2: 4,
    6: 5,
    52: 6,
    10: 7,
    11: 7,  # left lung lobes
    12: 8,
    13: 8,
    14: 8,  # right lung lobes
}


def map_totalsegmentator(labels: np.ndarray) -> np.ndarray:
    """Map a TotalSegmentator class-number array (any shape) onto the app's label values (uint8)."""
    lut = np.zeros(max(int(labels.max()), max(TOTALSEG_TO_APP)) + 1, dtype=np.uint8)
    for src, dst in TOTALSEG_TO_APP.items():
        lut[src] = dst
    return lut[labels.astype(np.int64)]


def check_label_values(labels: np.ndarray, label_names: dict[str, int] = LABEL_NAMES, what: str = "label") -> None:
    """Raise LabelFactoryError if `labels` holds a value outside `label_names` (name -> value)."""
    allowed = set(label_names.values())
    found = set(np.unique(labels).tolist())
    unknown = sorted(v for v in found if v not in allowed)
    if unknown:
        known = ", ".join(f"{v}={n}" for n, v in sorted(label_names.items(), key=lambda kv: kv[1]))
        raise LabelFactoryError(
            f"{what} holds values {unknown[:10]} that are not in the label map ({known}); "
            "relabel those voxels or add them to the label map"
        )


def foreground(label_names: dict[str, int]) -> dict[str, int]:
    """The label map without background (value 0): the segments Slicer shows."""
    return {k: v for k, v in label_names.items() if v}


# ---- partial labels: which organs a label contains (docs/DESIGN.md "Partial labels") ----

CONTOURED_KEY = "contoured"  # label info: the organ names the annotator contoured (absent: every organ of the map)


def check_contoured(names: Any, label_names: dict[str, int]) -> list[str]:
    """A label info's `contoured` value -> the organ names as the map spells them, in map order; 400 naming the
    valid organs when it is not a list of organ names of `label_names` (name -> value; background is no organ)."""
    organs = foreground(label_names)
    valid = ", ".join(organs)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise LabelFactoryError(
            f"'{CONTOURED_KEY}' must be a list of organ names (of: {valid}), got {names!r:.80}", status=400
        )
    lookup = {n.lower(): n for n in organs}
    unknown = [n for n in names if n.lower() not in lookup]
    if unknown:
        raise LabelFactoryError(
            f"'{CONTOURED_KEY}' names {', '.join(repr(n) for n in unknown)}, which the label map does not hold; "
            f"the organs are: {valid}",
            status=400,
        )
    chosen = {lookup[n.lower()] for n in names}
    return [n for n in organs if n in chosen]


def contoured_flags(names: list[str] | None, label_names: dict[str, int]) -> np.ndarray:
    """Organ names (None: every organ) -> (n_classes,) bool, n_classes = 1 + the largest value; index 0 (background)
    always True, index v True when the organ of value v is named."""
    flags = np.zeros(max(label_names.values()) + 1, bool)
    flags[0] = True
    chosen = (
        foreground(label_names) if names is None else {n: label_names[n] for n in check_contoured(names, label_names)}
    )
    flags[list(chosen.values())] = True
    return flags


def contoured_names(flags: Any, label_names: dict[str, int]) -> list[str]:
    """(n_classes,) bool flags -> the organ names flagged, in map order (the inverse of `contoured_flags`)."""
    flags = np.asarray(flags, bool)
    return [n for n, v in foreground(label_names).items() if v < len(flags) and flags[v]]
