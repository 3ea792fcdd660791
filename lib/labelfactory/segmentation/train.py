"""Supervised training of a 2D segmenter on image-mask pairs with partial labels: the one training path.

The app's `segmentation` trainer, `labelfactory train-segmentation` and the label-efficiency experiment all call
`train_segmenter`. A step draws a batch that is a pure function of (seed, step) (`BatchPlan`), augments it with a
seed of its own (`segmentation.augment`), and minimises the marginal Dice + cross-entropy over the organs each
slice's label contoured (`segmentation.losses`) with Adam on a warm-up + cosine (or constant) learning rate. Every
`val_interval` steps the per-patient Dice of the validation pairs (a dev split of real patients) is measured and the
best weights so far written with save_checkpoint (atomic, with config, data and code version); without validation
pairs the last weights are kept. With `state_file` the run writes its state at the same rounds and a rerun
resumes from it, drawing the same batches as an uninterrupted run. TensorBoard logs go to `log_dir`. Under torchrun
each rank trains on its share of every batch (DDP); rank 0 writes. Hand-written rather than MONAI's
SupervisedTrainer because the loss needs each slice's contoured flags and a resumed run its exact batches.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from monai.optimizers import WarmupCosineSchedule
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, Dataset, default_collate

from labelfactory import distributed
from labelfactory.checkpoints import hash_path, load_checkpoint, previous_path, save_checkpoint
from labelfactory.errors import LabelFactoryError
from labelfactory.labels import LABEL_NAMES, map_of
from labelfactory.options import SEED_RANGE, option
from labelfactory.segmentation.augment import AUGMENTATIONS, augmentation
from labelfactory.segmentation.losses import PartialDiceCELoss, segmentation_loss
from labelfactory.segmentation.mean_teacher import MeanTeacher
from labelfactory.segmentation.networks import NETWORKS, build_network

logger = logging.getLogger(__name__)
KIND = "segmentation"
STATE_KIND = "segmentation-state"  # a run's resumable state (`state_file`), not a model
MODEL_FILE = f"{KIND}.pt"  # in a model folder
SLICINGS = ("resize", "body-crop")  # SegmentationConfig.slicing
SCHEDULES = ("cosine", "constant")  # SegmentationConfig.schedule


@dataclass
class SegmentationConfig:
    """How to train (the one home of these defaults: CLI flags and app options derive from it)."""

    network: str = option("unetpp", "segmentation network", choices=NETWORKS)
    size: int = option(256, "slice side in pixels", low=8)
    steps: int = option(2000, "training iterations", low=1)
    batch_size: int = option(8, "slices per step over all processes", low=2)
    lr: float = option(1e-3, "Adam learning rate (peak, after the warm-up)")
    schedule: str = option("cosine", "learning rate over the steps: cosine decay to 0, or constant", choices=SCHEDULES)
    warmup: int = option(0, "steps of linear learning-rate warm-up from 0")
    batch_dice: bool = option(True, "Dice pooled over the batch (most organs are absent from most slices)")
    augment: str = option(
        "nnunet2d", "training augmentation: nnU-Net's 2D recipe without mirroring, or none", choices=AUGMENTATIONS
    )
    real_share: float = option(
        0.0, "share of every batch drawn from the real slices when synthetic pairs train too (0: pooled)", high=0.95
    )
    init_from: str = option("", "a segmentation model file whose weights start the training", where=("cli",))
    consistency: float = option(0.0, "Mean Teacher: weight of the consistency on unlabelled slices (0: off)")
    ema_decay: float = option(0.99, "Mean Teacher: the teacher's weight average decay", high=0.9999)
    val_interval: int = option(200, "iterations between validation Dice measurements (and state saves)", low=1)
    seed: int = option(0, "seed of the initial weights and of every random draw", high=SEED_RANGE[1])
    label_names: dict[str, int] = field(default_factory=lambda: dict(LABEL_NAMES))
    # how the training slices were made, which the infer repeats: "resize" (whole axial slices resized to size,
    # io.volume_to_slices) or "body-crop" (size x size body-centred crops at native spacing, datasets.openkbp)
    slicing: str = "resize"
    window: tuple[float, float] = (0.0, 2000.0)  # (level, width) in HU of the training images (io.Window)

    @property
    def n_classes(self) -> int:
        return max(self.label_names.values()) + 1


def recorded_config(path: str | os.PathLike) -> SegmentationConfig | None:
    """The config a segmentation model file records (its recipe; fields this version lacks are left out), or None
    when there is no such file. A trainer that starts from it retrains the model as it was made."""
    if not Path(path).is_file():
        return None
    recorded = load_checkpoint(Path(path), KIND)["config"]
    known = {f.name for f in fields(SegmentationConfig)}
    values = {k: (tuple(v) if k == "window" else v) for k, v in recorded.items() if k in known}
    return SegmentationConfig(**values)


@dataclass
class TrainResult:
    """The trained network (best weights, eval mode, on CPU), its validation record, and where it was written."""

    network: nn.Module
    best_val_dice: float | None
    best_step: int
    steps: int
    history: list[dict[str, float]]
    path: Path | None


class BatchPlan:
    """Which items form the batch of each step, a pure function of (seed, step): items are read in per-epoch
    permutations seeded by (seed, epoch), so a resumed run draws what an uninterrupted one would. With `n_real`
    real items beside `n_train` and a `real_share`, every batch holds round(share x batch) real ones (at least 1);
    otherwise the two are pooled. Indices >= n_train are real items (index - n_train)."""

    def __init__(self, n_train: int, n_real: int, batch: int, real_share: float, seed: int):
        self.n_train, self.n_real, self.seed = n_train, n_real, seed
        pooled = n_train + n_real
        if n_real and n_train and real_share > 0:
            self.k_real = min(batch - 1, max(1, round(real_share * batch)))
            self.k_train = batch - self.k_real
        else:
            self.k_real, self.k_train = 0, min(batch, pooled)

    def at(self, step: int) -> list[int]:
        if not self.k_real:
            return self._stream(self.n_train + self.n_real, 0, step * self.k_train, self.k_train)
        train = self._stream(self.n_train, 0, step * self.k_train, self.k_train)
        return train + [self.n_train + i for i in self._stream(self.n_real, 1, step * self.k_real, self.k_real)]

    def _stream(self, n: int, which: int, start: int, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            epoch, offset = divmod(start + len(out), n)
            out += self._permutation(n, which, epoch)[offset : offset + count - len(out)]
        return out

    @functools.lru_cache(maxsize=4)  # noqa: B019 (a plan lives as long as its run)
    def _permutation(self, n: int, which: int, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 2 + which)
        return torch.randperm(n, generator=g).tolist()


def train_segmenter(
    train_set: Dataset,
    val_set: Dataset | None,
    config: SegmentationConfig,
    out: str | os.PathLike | None = None,
    log_dir: str | os.PathLike | None = None,
    data: dict[str, Any] | None = None,
    device: torch.device | None = None,
    real_set: Dataset | None = None,
    state_file: str | os.PathLike | None = None,
    unlabelled_set: Dataset | None = None,
) -> TrainResult:
    """Train `config.network` on `train_set` (and `real_set`, shared per batch as `config.real_share` says), keep
    the best on `val_set`, write to `out`. Items: {"image": (1, S, S) float, "label": (1, S, S) int64, "contoured":
    (C,) bool (optional: all)}; a validation set's `groups` (patient ids) make its Dice per patient. With
    `config.consistency` > 0, `unlabelled_set` ({"image"} items) trains a Mean Teacher, whose teacher is kept."""
    if config.slicing not in SLICINGS:
        raise LabelFactoryError(f"slicing {config.slicing!r}: expected one of {', '.join(SLICINGS)}")
    n_train, n_real = len(train_set), len(real_set) if real_set is not None else 0
    if n_train + n_real < 2:
        raise LabelFactoryError(
            f"only {n_train + n_real} training pair(s): a segmenter needs at least 2; label or synthesize more"
        )
    if config.consistency > 0 and not unlabelled_set:
        raise LabelFactoryError("consistency > 0 (Mean Teacher) needs unlabelled slices: add images without labels")
    rank, world, auto_device = distributed.init_from_env()
    device = device or auto_device
    torch.manual_seed(config.seed)
    network = build_network(config.network, config.n_classes)
    if config.init_from:
        network.load_state_dict(_initial_weights(config))
    network.to(device)
    model = DistributedDataParallel(network) if world > 1 else network
    optimizer = torch.optim.Adam(model.parameters(), config.lr)
    scheduler = _scheduler(optimizer, config)
    loss_fn = PartialDiceCELoss(batch=config.batch_dice)
    items = ConcatDataset([train_set, real_set]) if real_set is not None else train_set
    plan = BatchPlan(n_train, n_real, config.batch_size, config.real_share, config.seed)
    augment = augmentation(config.augment)
    teacher = unlabelled = None
    if config.consistency > 0:
        teacher = MeanTeacher(network, config.consistency, config.ema_decay, config.steps)
        unlabelled = BatchPlan(len(unlabelled_set), 0, config.batch_size, 0.0, config.seed + 1)
    kept = teacher.model if teacher is not None else network  # the model validated and written
    payload = {
        "kind": KIND,
        "config": asdict(config),
        "data": data or {},
        "label_map": map_of(config.label_names).record(),
    }
    run = {"step": 0, "best_state": None, "best_step": 0, "best_dice": None, "history": []}
    state_path = Path(state_file) if state_file is not None else None
    if state_path is not None and state_path.is_file():
        _resume(state_path, config, network, optimizer, scheduler, run, teacher)
    writer = _writer(log_dir)
    rounds_len = min(config.val_interval, config.steps)
    losses: list[float] = []
    while run["step"] < config.steps:
        step = run["step"]
        batch = _batch(items, plan.at(step)[rank::world], augment, config.n_classes, config.seed, step, rank, device)
        network.train()
        x, n_labelled = batch["image"], len(batch["image"])
        if teacher is not None:  # one forward for both (DDP): labelled, then the unlabelled student view
            u = torch.stack([unlabelled_set[i]["image"] for i in unlabelled.at(step)[rank::world]]).to(device)
            student_view, teacher_view = teacher.views(u, (config.seed * 1_000_003 + step) * 8 + rank)
            x = torch.cat([x, student_view])
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            output = model(x)
        heads = list(output) if isinstance(output, (list, tuple)) else [output]
        loss = segmentation_loss([h[:n_labelled] for h in heads], batch["label"], batch["contoured"], loss_fn)
        if teacher is not None:
            loss = loss + teacher.consistency(heads[0][n_labelled:], teacher_view, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if teacher is not None:
            teacher.update(network, step)
        losses.append(float(distributed.all_reduce_mean(loss.detach().clone())))
        run["step"] = step = step + 1
        if step % rounds_len and step != config.steps:
            continue
        row = {"step": step, "loss": sum(losses) / len(losses), "lr": optimizer.param_groups[0]["lr"]}
        losses = []
        if val_set is not None and len(val_set):
            row["val_dice"] = validation_dice(kept, val_set, config.batch_size, device)
            if not math.isnan(row["val_dice"]) and (run["best_dice"] is None or row["val_dice"] > run["best_dice"]):
                run.update(best_state=_cpu_state(kept), best_step=step, best_dice=row["val_dice"])
                _save_model(payload, run, out)
        run["history"].append(row)
        logger.info(f"step {step}/{config.steps} " + " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step"))
        if writer is not None:
            for k, v in row.items():
                if k != "step":
                    writer.add_scalar(k, v, step)
        if state_path is not None and distributed.is_main():
            _save_state(state_path, payload, run, network, optimizer, scheduler, teacher)

    if run["best_state"] is None:
        run.update(best_state=_cpu_state(kept), best_step=run["step"])
        _save_model(payload, run, out)
    if writer is not None:
        writer.close()
    distributed.barrier()
    if state_path is not None and distributed.is_main():
        for f in (state_path, previous_path(state_path)):
            f.unlink(missing_ok=True)
            hash_path(f).unlink(missing_ok=True)
    network.load_state_dict(run["best_state"])
    return TrainResult(
        network.cpu().eval(),
        run["best_dice"],
        run["best_step"],
        run["step"],
        run["history"],
        Path(out) if out is not None else None,
    )


@torch.inference_mode()
def validation_dice(network: nn.Module, val_set: Dataset, batch_size: int, device: torch.device) -> float:
    """Mean over patients (the set's `groups`; one patient if it has none) of the mean Dice over the organs the
    patient contoured, each organ's Dice pooled over that patient's slices; an organ neither in the truth nor in
    the prediction of its slices is not scored. NaN when nothing is scored."""
    network.eval()
    groups = list(getattr(val_set, "groups", [""] * len(val_set)))
    sums: dict[str, torch.Tensor] = {}  # patient -> (3, C): true positive, predicted and truth pixels per class
    known: dict[str, torch.Tensor] = {}  # patient -> (C,) contoured
    for start in range(0, len(val_set), batch_size):
        chosen = [val_set[i] for i in range(start, min(start + batch_size, len(val_set)))]
        logits = network(torch.stack([item["image"] for item in chosen]).to(device))
        c = logits.shape[1]
        pred = logits.argmax(1).cpu()
        batch = default_collate([_with_contoured(item, c) for item in chosen])
        for i, group in enumerate(groups[start : start + len(pred)]):
            p = torch.nn.functional.one_hot(pred[i].flatten(), c)
            t = torch.nn.functional.one_hot(batch["label"][i, 0].flatten(), c)
            sums[group] = sums.get(group, 0) + torch.stack([(p * t).sum(0), p.sum(0), t.sum(0)])
            known[group] = known.get(group, True) & batch["contoured"][i]
    per_patient = []
    for group, (tp, npred, ntruth) in sums.items():
        scored = known[group][1:] & (npred[1:] + ntruth[1:] > 0)
        if scored.any():
            dice = 2 * tp[1:].double() / (npred[1:] + ntruth[1:]).double()
            per_patient.append(float(dice[scored].mean()))
    return sum(per_patient) / len(per_patient) if per_patient else float("nan")


def _with_contoured(item: dict[str, torch.Tensor], n_classes: int) -> dict[str, torch.Tensor]:
    """The item with (n_classes,) "contoured" flags: its own, cut or padded with False (a class its data set does
    not have says nothing), or every class when it has none (a complete label)."""
    flags = item.get("contoured")
    if flags is None:
        return {**item, "contoured": torch.ones(n_classes, dtype=torch.bool)}
    fitted = torch.zeros(n_classes, dtype=torch.bool)
    fitted[: min(n_classes, len(flags))] = flags[:n_classes]
    return {**item, "contoured": fitted}


def _batch(
    items: Dataset, indices: list[int], augment, n_classes: int, seed: int, step: int, rank: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """The step's items, augmented with a seed of (seed, step, rank) of their own, collated onto `device`."""
    chosen = [_with_contoured(items[i], n_classes) for i in indices]
    if augment is not None:
        augment.set_random_state(seed=(seed * 1_000_003 + step * 101 + rank) % 2**32)
        chosen = [{**item, **augment({"image": item["image"], "label": item["label"]})} for item in chosen]
    batch = default_collate(chosen)
    return {
        "image": batch["image"].to(device),
        "label": batch["label"].long().to(device),
        "contoured": batch["contoured"].to(device),
    }


def _scheduler(optimizer: torch.optim.Optimizer, config: SegmentationConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning rate: MONAI's linear warm-up + cosine decay to 0, or warm-up then constant."""
    if config.schedule == "cosine":
        return WarmupCosineSchedule(optimizer, warmup_steps=config.warmup, t_total=config.steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (config.warmup + 1)))


def _initial_weights(config: SegmentationConfig) -> dict[str, torch.Tensor]:
    """The weights of `config.init_from` (a segmentation model of the same network and label map)."""
    payload = load_checkpoint(Path(config.init_from), KIND)
    start = payload["config"]
    if start["network"] != config.network or dict(start["label_names"]) != config.label_names:
        raise LabelFactoryError(
            f"init_from {config.init_from}: a {start['network']} for labels {sorted(start['label_names'])}; "
            f"this training is a {config.network} for {sorted(config.label_names)}"
        )
    return payload["state_dict"]


def _cpu_state(network: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}


def _save_model(payload: dict[str, Any], run: dict[str, Any], out: str | os.PathLike | None) -> None:
    if out is not None and distributed.is_main():
        metrics = {"val_dice": run["best_dice"], "step": run["best_step"]}
        save_checkpoint({**payload, "state_dict": run["best_state"], "metrics": metrics}, out)


def _save_state(
    path: Path, payload: dict[str, Any], run: dict[str, Any], network, optimizer, scheduler, teacher
) -> None:
    """The run so far (weights, optimizer, schedule, best weights, history, Mean Teacher), atomically."""
    state = {"network": _cpu_state(network), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if teacher is not None:
        state["teacher"] = _cpu_state(teacher.model)
    save_checkpoint({**payload, "kind": STATE_KIND, "run": run, **state}, path)


def _resume(
    path: Path, config: SegmentationConfig, network, optimizer, scheduler, run: dict[str, Any], teacher
) -> None:
    """Continue from `path`'s state; a state of another config is refused (it would mix two recipes)."""
    state = load_checkpoint(path, STATE_KIND)
    if state["config"] != asdict(config):
        changed = sorted(k for k, v in asdict(config).items() if state["config"].get(k) != v)
        raise LabelFactoryError(f"{path} is a run with other settings ({', '.join(changed)}): remove it or match them")
    network.load_state_dict(state["network"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if teacher is not None:
        teacher.model.load_state_dict(state["teacher"])
    run.update(state["run"])
    logger.info(f"resumed {path} at step {run['step']}/{config.steps}")


def _writer(log_dir: str | os.PathLike | None):
    """A TensorBoard SummaryWriter on rank 0 when `log_dir` is given, else None."""
    if log_dir is None or not distributed.is_main():
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir))
