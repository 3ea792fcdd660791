"""The paper's experiments (DatasetGAN-medical, sections III-C, III-D and IV) on data sets already made.

Every experiment trains segmenters and scores them on two test sets per fold: test-G (held-out
synthetic pairs of the same synthetic set) and test-R (slices of held-out real patients), over
K patient-wise folds, and reports mIoU as mean +- std over folds.

Fold f: synthetic pairs are split into K folds by seed; real slices into K folds by patient.
test-G = synthetic fold f, test-R = real fold f (each at most `test_size` items, evenly spaced).
Of the other real patients, one is held out for validation Dice (best-checkpoint choice) when
there are two or more; the rest are the real training slices. No patient is in two of these.

Tables: I synthetic set size vs mIoU; II annotated (interpreter-training) images vs mIoU, one
synthetic set per annotation count; III-C synthetic vs real vs hybrid (synthetic + k real);
III segmenters compared on the synthetic set. Identical trainings (same network, training set
and fold) run once and are shared between tables.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from labelfactory.devices import resolve_device
from labelfactory.errors import LabelFactoryError
from labelfactory.evaluation.metrics import confusion_matrix, scores
from labelfactory.evaluation.splits import check_disjoint, group_folds, train_test
from labelfactory.evaluation.statistics import mean_sd
from labelfactory.segmentation.data import PairSubset, evenly_spaced, hybrid
from labelfactory.segmentation.infer import predict_slices
from labelfactory.segmentation.train import SegmentationConfig, train_segmenter

logger = logging.getLogger(__name__)
TEST_SETS = ("test_G", "test_R")


@dataclass
class Settings:
    """How the experiments run. `train` is the template every training copies (its `network` is replaced)."""

    folds: int = 5
    test_size: int = 100
    baseline: str = "deeplabv3"
    train: SegmentationConfig = field(default_factory=SegmentationConfig)
    log_dir: Path | None = None
    device: str = "auto"  # where every segmenter trains and is scored (labelfactory.devices)


@dataclass
class RealSplit:
    train: PairSubset
    val: PairSubset | None
    test: PairSubset


class Experiments:
    """Holds the real data set, its patient-wise folds, and every finished training's scores (shared across tables)."""

    def __init__(self, real: Dataset, settings: Settings):
        self.real, self.settings = real, settings
        self.real_folds = group_folds(real.groups, settings.folds, settings.train.seed)
        self._synthetic_folds: dict[int, list[list[int]]] = {}
        self._done: dict[tuple, dict[str, dict]] = {}
        self.runs: list[dict] = []

    def real_split(self, fold: int) -> RealSplit:
        rest, test = train_test(self.real_folds, fold)
        test = evenly_spaced_subset(self.real, test, self.settings.test_size)
        patients = sorted({self.real.groups[i] for i in rest})
        val_patient = patients[-1] if len(patients) >= 2 else None
        train = [i for i in rest if self.real.groups[i] != val_patient]
        val = [i for i in rest if self.real.groups[i] == val_patient]
        check_disjoint(self.real.groups, train, val, test.indices)
        return RealSplit(PairSubset(self.real, train), PairSubset(self.real, val) if val else None, test)

    def synthetic_split(self, synthetic: Dataset, fold: int) -> tuple[PairSubset, PairSubset]:
        """(training pool, test-G) of a synthetic set for `fold`."""
        if id(synthetic) not in self._synthetic_folds:
            self._synthetic_folds[id(synthetic)] = group_folds(
                synthetic.groups, self.settings.folds, self.settings.train.seed
            )
        pool, test = train_test(self._synthetic_folds[id(synthetic)], fold)
        check_disjoint(synthetic.groups, pool, test)
        return PairSubset(synthetic, pool), evenly_spaced_subset(synthetic, test, self.settings.test_size)

    def pool_size(self, synthetic: Dataset) -> int:
        """The smallest synthetic training pool over folds: the most pairs every fold can train on."""
        return min(len(self.synthetic_split(synthetic, f)[0]) for f in range(self.settings.folds))

    def score(
        self, key: tuple, network: str, fold: int, train: Dataset, val: Dataset | None, tests: dict[str, Dataset]
    ) -> dict[str, dict]:
        """Train `network` on `train` (once per key/network/fold) and score it on each test set."""
        cache_key = (network, key, fold)
        if cache_key not in self._done:
            cfg = replace(self.settings.train, network=network)
            log_dir = (
                self.settings.log_dir / f"{network}-{'-'.join(map(str, key))}-fold{fold}"
                if self.settings.log_dir
                else None
            )
            t0 = time.time()
            result = train_segmenter(train, val, cfg, log_dir=log_dir, device=resolve_device(self.settings.device))
            seconds = time.time() - t0
            self._done[cache_key] = {name: score_dataset(result.network, ds, cfg) for name, ds in tests.items()}
            self.runs.append(
                {
                    "network": network,
                    "training_set": list(map(str, key)),
                    "fold": fold,
                    "train_items": len(train),
                    "val_items": len(val) if val is not None else 0,
                    "best_val_dice": result.best_val_dice,
                    "best_step": result.best_step,
                    "steps": result.steps,
                    "seconds": round(seconds, 1),
                    **{f"{n}_miou": s["miou"] for n, s in self._done[cache_key].items()},
                }
            )
            logger.info(
                "fold %d %s on %s: %s",
                fold,
                network,
                key,
                {n: round(s["miou"], 3) for n, s in self._done[cache_key].items()},
            )
        return self._done[cache_key]

    def row(self, table: str, name: str, network: str, key: tuple, make_train, synthetic: Dataset) -> dict:
        """One table row: train per fold on `make_train(fold, synthetic_pool, real_split)`; test on test-G, test-R."""
        per_fold = []
        n_train = []
        for f in range(self.settings.folds):
            pool, test_g = self.synthetic_split(synthetic, f)
            real = self.real_split(f)
            train = make_train(f, pool, real)
            n_train.append(len(train))
            per_fold.append(self.score(key, network, f, train, real.val, {"test_G": test_g, "test_R": real.test}))
        return summarize(table, name, network, n_train, per_fold)


def evenly_spaced_subset(dataset: Dataset, indices: Sequence[int], k: int) -> PairSubset:
    return PairSubset(dataset, [indices[i] for i in evenly_spaced(len(indices), k)])


def score_dataset(network: torch.nn.Module, dataset: Dataset, config: SegmentationConfig) -> dict:
    """Per-class Dice/IoU and mIoU of `network` over every pixel of `dataset`."""
    cm = torch.zeros(config.n_classes, config.n_classes, dtype=torch.long)
    for batch in DataLoader(dataset, config.batch_size, shuffle=False, num_workers=0):
        cm += confusion_matrix(
            predict_slices(network, batch["image"], config.batch_size), batch["label"][:, 0], config.n_classes
        )
    return scores(cm, config.label_names)


def summarize(table: str, name: str, network: str, n_train: list[int], per_fold: list[dict[str, dict]]) -> dict:
    """Mean +- sample SD over folds of mIoU, mean Dice and per-class Dice, for test-G and test-R."""
    out = {"table": table, "row": name, "network": network, "train_items": n_train}
    for t in TEST_SETS:
        folds = [p[t] for p in per_fold]
        miou, miou_std = mean_sd([s["miou"] for s in folds])
        dice, dice_std = mean_sd([s["mean_dice"] for s in folds])
        classes = folds[0]["dice"].keys()
        out[t] = {
            "miou": miou,
            "miou_std": miou_std,
            "mean_dice": dice,
            "mean_dice_std": dice_std,
            "miou_folds": [s["miou"] for s in folds],
            "dice": {c: mean_sd([s["dice"][c] for s in folds])[0] for c in classes},
            "iou": {c: mean_sd([s["iou"][c] for s in folds])[0] for c in classes},
        }
    return out


def synthetic_size_vs_miou(ex: Experiments, synthetic: Dataset, sizes: Sequence[int]) -> list[dict]:
    """Table I: the baseline trained on the first n synthetic pairs of the pool, for each n in `sizes`."""
    pool = ex.pool_size(synthetic)
    too_big = [n for n in sizes if n > pool]
    if too_big:
        raise LabelFactoryError(
            f"synthetic set sizes {too_big} exceed the {pool} training pairs each fold has; "
            "synthesize more pairs or pass smaller sizes"
        )
    return [
        ex.row(
            "I",
            f"synthetic pairs={n}",
            ex.settings.baseline,
            ("synthetic", n),
            lambda f, p, r, n=n: PairSubset(p, range(n)),
            synthetic,
        )
        for n in sizes
    ]


def annotations_vs_miou(
    ex: Experiments, synthetic_by_annotations: dict[int, Dataset], n_train: int | None = None
) -> list[dict]:
    """Table II: one synthetic set per number of annotated images (interpreter training); the baseline on
    `n_train` pairs of each."""
    rows = []
    for k, synthetic in sorted(synthetic_by_annotations.items()):
        n = min(n_train or ex.pool_size(synthetic), ex.pool_size(synthetic))
        rows.append(
            ex.row(
                "II",
                f"annotated images={k}",
                ex.settings.baseline,
                ("annotated", k, n),
                lambda f, p, r, n=n: PairSubset(p, range(n)),
                synthetic,
            )
        )
    return rows


def synthetic_real_hybrid(ex: Experiments, synthetic: Dataset, k_real: int, n_train: int | None = None) -> list[dict]:
    """Section III-C: the baseline on synthetic pairs only, on real slices only, and on synthetic + `k_real` real."""
    n = min(n_train or ex.pool_size(synthetic), ex.pool_size(synthetic))
    b = ex.settings.baseline
    return [
        ex.row("III-C", f"synthetic ({n})", b, ("synthetic", n), lambda f, p, r: PairSubset(p, range(n)), synthetic),
        ex.row("III-C", "real (all training patients)", b, ("real",), lambda f, p, r: r.train, synthetic),
        ex.row(
            "III-C",
            f"hybrid ({n} synthetic + {k_real} real)",
            b,
            ("hybrid", n, k_real),
            lambda f, p, r: hybrid(PairSubset(p, range(n)), r.train, k_real),
            synthetic,
        ),
    ]


def segmenters_compared(
    ex: Experiments, synthetic: Dataset, networks: Sequence[str], n_train: int | None = None
) -> list[dict]:
    """Table III: each segmenter trained on the same synthetic pairs, scored on test-G and test-R."""
    n = min(n_train or ex.pool_size(synthetic), ex.pool_size(synthetic))
    return [
        ex.row("III", net, net, ("synthetic", n), lambda f, p, r: PairSubset(p, range(n)), synthetic)
        for net in networks
    ]


TABLES = ("I", "II", "III-C", "III")
PAPER_SEGMENTERS = ("deeplabv3", "fcn", "unet", "unetpp")


def run_experiments(
    real: Dataset,
    settings: Settings,
    synthetic: Dataset | None = None,
    synthetic_by_annotations: dict[int, Dataset] | None = None,
    tables: Sequence[str] = TABLES,
    sizes: Sequence[int] | None = None,
    k_real: int = 30,
    networks: Sequence[str] = PAPER_SEGMENTERS,
    n_train: int | None = None,
) -> dict:
    """Run the chosen tables; returns {"settings", "data", "tables": {name: rows}, "runs": every training}.

    Table I sizes default to a quarter, half and all of the synthetic training pool.
    """
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise LabelFactoryError(f"unknown tables {unknown}; choose from {', '.join(TABLES)}")
    if synthetic is None and any(t != "II" for t in tables):
        raise LabelFactoryError("tables I, III-C and III need a synthetic data set; pass one (or run only table II)")
    if "II" in tables and not synthetic_by_annotations:
        raise LabelFactoryError("table II needs one synthetic data set per number of annotated images")
    ex = Experiments(real, settings)
    out: dict[str, list[dict]] = {}
    if "I" in tables:
        pool = ex.pool_size(synthetic)
        out["I"] = synthetic_size_vs_miou(ex, synthetic, sizes or sorted({max(2, pool // 4), max(2, pool // 2), pool}))
    if "II" in tables:
        out["II"] = annotations_vs_miou(ex, synthetic_by_annotations, n_train)
    if "III-C" in tables:
        out["III-C"] = synthetic_real_hybrid(ex, synthetic, k_real, n_train)
    if "III" in tables:
        out["III"] = segmenters_compared(ex, synthetic, networks, n_train)
    t = settings.train
    return {
        "settings": {
            "folds": settings.folds,
            "test_size": settings.test_size,
            "baseline": settings.baseline,
            "size": t.size,
            "steps": t.steps,
            "batch_size": t.batch_size,
            "lr": t.lr,
            "val_interval": t.val_interval,
            "seed": t.seed,
            "k_real": k_real,
            "n_train": n_train,
            "label_names": t.label_names,
        },
        "data": {
            "real_slices": len(real),
            "real_patients": sorted(set(real.groups)),
            "synthetic_pairs": len(synthetic) if synthetic is not None else 0,
            "synthetic_by_annotations": {k: len(d) for k, d in (synthetic_by_annotations or {}).items()},
        },
        "tables": out,
        "runs": ex.runs,
    }


def synthetic_fid(synthetic: Dataset, real: Dataset, weights: str | None = None, n_images: int = 1000) -> float | None:
    """FID (pytorch-fid Inception) of up to `n_images` synthetic images against as many real slices; None unweighted."""
    from labelfactory.evaluation.fid import find_fid_weights, frechet_distance, inception_features, load_inception

    found = find_fid_weights(weights)
    if found is None:
        logger.warning(
            "FID skipped: no Inception weights (pass --fid-weights, set LABELFACTORY_FID_WEIGHTS, "
            "or run `python -m labelfactory.evaluation.fid_weights`)"
        )
        return None
    model = load_inception(found)

    def images(ds: Dataset) -> torch.Tensor:
        return torch.stack([ds[i]["image"] for i in evenly_spaced(len(ds), n_images)])

    return frechet_distance(inception_features(model, images(real)), inception_features(model, images(synthetic)))
