"""Supervised training of a 2D segmenter on image-mask pairs with MONAI's ignite engines.

SupervisedTrainer (DiceCE loss; DeepSupervisionLoss around it for UNet++) runs `steps`
iterations in rounds of `val_interval`; after each round SupervisedEvaluator measures the mean
foreground Dice on the validation pairs (real labelled slices), and the best weights so far are
written with save_checkpoint (atomic, with config, data and code version). Without validation
pairs the last weights are kept. TensorBoard logs go to `log_dir`. Under torchrun every rank
trains on its share of the pairs (DDP); rank 0 writes.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Events
from monai.data import DistributedSampler
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import MeanDice, StatsHandler, TensorBoardStatsHandler, ValidationHandler, from_engine
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.transforms import AsDiscreted
from monai.utils import set_determinism
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from labelfactory import distributed
from labelfactory.checkpoints import save_checkpoint
from labelfactory.errors import LabelFactoryError
from labelfactory.labels import LABEL_NAMES, map_of
from labelfactory.options import SEED_RANGE, option
from labelfactory.segmentation.networks import NETWORKS, build_network

logger = logging.getLogger(__name__)
KIND = "segmentation"
MODEL_FILE = f"{KIND}.pt"  # in a model folder
SLICINGS = ("resize", "body-crop")  # SegmentationConfig.slicing


@dataclass
class SegmentationConfig:
    """How to train (the one home of these defaults: CLI flags and app options derive from it)."""

    network: str = option("unetpp", "segmentation network", choices=NETWORKS)
    size: int = option(256, "slice side in pixels", low=8)
    steps: int = option(2000, "training iterations, rounded up to whole validation rounds", low=1)
    batch_size: int = option(8, "slices per step over all processes", low=1)
    lr: float = option(1e-3, "Adam learning rate")
    val_interval: int = option(200, "iterations between validation Dice measurements", low=1)
    seed: int = option(0, "seed of the initial weights and of every random draw", high=SEED_RANGE[1])
    label_names: dict[str, int] = field(default_factory=lambda: dict(LABEL_NAMES))
    # how the training slices were made, which the infer repeats: "resize" (whole axial slices resized to size,
    # io.volume_to_slices) or "body-crop" (size x size body-centred crops at native spacing, datasets.openkbp)
    slicing: str = "resize"
    window: tuple[float, float] = (0.0, 2000.0)  # (level, width) in HU of the training images (io.Window)
    num_workers: int = 0  # DataLoader worker processes

    @property
    def n_classes(self) -> int:
        return max(self.label_names.values()) + 1


@dataclass
class TrainResult:
    """The trained network (best weights, eval mode, on CPU), its validation record, and where it was written."""

    network: nn.Module
    best_val_dice: float | None
    best_step: int
    steps: int
    history: list[dict[str, float]]
    path: Path | None


def train_segmenter(
    train_set: Dataset,
    val_set: Dataset | None,
    config: SegmentationConfig,
    out: str | os.PathLike | None = None,
    log_dir: str | os.PathLike | None = None,
    data: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> TrainResult:
    """Train `config.network` on `train_set` ({"image", "label"} items), keep the best on `val_set`, write to `out`."""
    if config.slicing not in SLICINGS:
        raise LabelFactoryError(f"slicing {config.slicing!r}: expected one of {', '.join(SLICINGS)}")
    if len(train_set) < 2:
        raise LabelFactoryError(
            f"only {len(train_set)} training pair(s): a segmenter needs at least 2; label or synthesize more"
        )
    _, world, auto_device = distributed.init_from_env()
    device = device or auto_device
    set_determinism(config.seed)
    network = build_network(config.network, config.n_classes).to(device)
    model = DistributedDataParallel(network) if world > 1 else network

    rounds_len = min(config.val_interval, config.steps)
    rounds = math.ceil(config.steps / rounds_len)
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=rounds,
        epoch_length=rounds_len,
        train_data_loader=_train_loader(train_set, config, world),
        network=model,
        optimizer=torch.optim.Adam(model.parameters(), config.lr),
        loss_function=_loss(config.network),
        amp=device.type == "cuda",
        decollate=False,
    )
    history: list[dict[str, float]] = []
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    best = {"state": None, "step": 0, "dice": None}
    label_map = map_of(config.label_names).record()  # names, values and colours (labelfactory.labels)
    payload = {"kind": KIND, "config": asdict(config), "data": data or {}, "label_map": label_map}

    def save(state: dict[str, torch.Tensor], step: int, dice: float | None) -> None:
        if out is not None and distributed.is_main():
            save_checkpoint({**payload, "state_dict": state, "metrics": {"val_dice": dice, "step": step}}, out)

    if val_set is not None and len(val_set):
        evaluator = _evaluator(val_set, model, config, device, world)
        ValidationHandler(interval=1, validator=evaluator, epoch_level=True).attach(trainer)

        @evaluator.on(Events.EPOCH_COMPLETED)
        def keep_best(engine) -> None:  # runs after MONAI updated best_metric
            if engine.state.best_metric_epoch == engine.state.epoch:
                best.update(
                    state=copy.deepcopy(network.state_dict()),
                    step=trainer.state.iteration,
                    dice=float(engine.state.best_metric),
                )
                save(best["state"], best["step"], best["dice"])

        if distributed.is_main() and log_dir is not None:
            TensorBoardStatsHandler(
                log_dir=str(log_dir), output_transform=lambda x: None, global_epoch_transform=lambda e: e * rounds_len
            ).attach(evaluator)
    else:
        evaluator = None

    @trainer.on(Events.EPOCH_COMPLETED)
    def record(engine) -> None:
        row = {"step": engine.state.iteration, "loss": sum(losses[-rounds_len:]) / rounds_len}
        if evaluator is not None:
            row["val_dice"] = float(evaluator.state.metrics["val_dice"])
        history.append(row)

    if distributed.is_main():
        StatsHandler(
            name=logger.name, tag_name="train_loss", output_transform=_loss_value, iteration_log=rounds_len
        ).attach(trainer)
        if log_dir is not None:
            TensorBoardStatsHandler(log_dir=str(log_dir), tag_name="train_loss", output_transform=_loss_value).attach(
                trainer
            )
    trainer.run()
    steps = trainer.state.iteration

    if best["state"] is None:
        best.update(state=copy.deepcopy(network.state_dict()), step=steps)
        save(best["state"], steps, None)
    distributed.barrier()
    network.load_state_dict(best["state"])
    return TrainResult(
        network.cpu().eval(), best["dice"], best["step"], steps, history, Path(out) if out is not None else None
    )


def _loss_value(output: dict[str, torch.Tensor]) -> float:
    return output["loss"].item()


def _loss(network: str) -> nn.Module:
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    return DeepSupervisionLoss(dice_ce) if network == "unetpp" else dice_ce


def _train_loader(train_set: Dataset, config: SegmentationConfig, world: int) -> DataLoader:
    """Shuffled batches; the last short batch is dropped (BatchNorm needs 2+ items) unless it is the only one."""
    drop_last = len(train_set) // world > config.batch_size
    if world > 1:
        sampler = DistributedSampler(train_set, shuffle=True, seed=config.seed)
        return DataLoader(
            train_set, config.batch_size, sampler=sampler, drop_last=drop_last, num_workers=config.num_workers
        )
    gen = torch.Generator().manual_seed(config.seed)
    return DataLoader(
        train_set, config.batch_size, shuffle=True, generator=gen, drop_last=drop_last, num_workers=config.num_workers
    )


def _evaluator(
    val_set: Dataset, model: nn.Module, config: SegmentationConfig, device: torch.device, world: int
) -> SupervisedEvaluator:
    """Mean foreground Dice (MONAI MeanDice, gathered over ranks) of the argmax prediction."""
    sampler = DistributedSampler(val_set, shuffle=False, even_divisible=False) if world > 1 else None
    loader = DataLoader(val_set, config.batch_size, shuffle=False, sampler=sampler, num_workers=config.num_workers)
    c = config.n_classes
    return SupervisedEvaluator(
        device=device,
        val_data_loader=loader,
        network=model,
        postprocessing=AsDiscreted(keys=("pred", "label"), argmax=(True, False), to_onehot=(c, c)),
        key_val_metric={
            "val_dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))
        },
        amp=device.type == "cuda",
    )
