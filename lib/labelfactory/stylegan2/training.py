"""StyleGAN2-ADA training loop: kimg schedule, lazy regularization, EMA, ADA, snapshots, exact resume, torchrun.

One call, `train(config, images, run_dir)`, serves the CLI and the MONAI Label trainer. Every
`snapshot_kimg` (and at the end) rank 0 atomically writes `<run_dir>/training-state.pt` (G, D,
G_ema, optimisers, ADA state, counters, config), a preview grid PNG from fixed seeds, and, when
`publish_path` is given, the EMA generator file the other tasks load. A run restarted on the same
run_dir continues from the last state and ends bit-identical to an uninterrupted run: every
step's randomness (batch indices, latents, noise, augmentation) is seeded from (seed, rank, step).
Distributed: gradients are averaged over ranks after each phase (the same maths as DDP, also
for R1's double backward, which DDP's hooks do not support); ranks keep identical weights.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from labelfactory.checkpoints import load_checkpoint, save_checkpoint
from labelfactory.distributed import all_reduce_mean, is_main, world_size
from labelfactory.errors import LabelFactoryError
from labelfactory.jsonio import write_json_atomic
from labelfactory.stylegan2.augment import AdaController, AugmentPipe
from labelfactory.stylegan2.checkpoint import publish_generator, read_warm_start
from labelfactory.stylegan2.config import StyleGAN2Config
from labelfactory.stylegan2.latents import z_from_seeds
from labelfactory.stylegan2.loss import StyleGAN2Loss
from labelfactory.stylegan2.networks import GENERATOR_LAYOUT, Discriminator, Generator

logger = logging.getLogger(__name__)

STATE_FILE = "training-state.pt"
STATE_KIND = "stylegan2-training"


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dev = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
        t = t.to(dev)
        dist.all_reduce(t)
    return t.cpu()


def _sync_gradients(module: torch.nn.Module) -> None:
    """Average grads over ranks (one flat all-reduce) and zero out non-finite values, as stylegan2-ada."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.flatten() for p in params])
    all_reduce_mean(flat)
    torch.nan_to_num(flat, nan=0, posinf=1e5, neginf=-1e5, out=flat)
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad.copy_(g.view_as(p))


def _crossed(prev_nimg: int, nimg: int, kimg: float) -> bool:
    """Whether going from prev_nimg to nimg images passed a multiple of `kimg` (never for kimg <= 0)."""
    return kimg > 0 and prev_nimg // int(kimg * 1000) != nimg // int(kimg * 1000)


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63 - 1)


def save_preview(G: Generator, path: Path, num_seeds: int) -> Path:
    """Grid PNG of G(z_from_seed(s)) for s in 0..num_seeds-1 (psi 1, const noise), rows of sqrt(n)."""
    from torchvision.utils import save_image

    device = next(G.parameters()).device
    with torch.no_grad():
        imgs = torch.cat(
            [
                G(z.to(device), noise_mode="const").float().cpu()
                for z in z_from_seeds(list(range(num_seeds)), G.z_dim).split(8)
            ]
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    save_image((imgs.clamp(-1, 1) + 1) / 2, tmp, nrow=max(1, int(math.ceil(math.sqrt(num_seeds)))), padding=2)
    os.replace(tmp, path)
    return path


class Trainer:
    """Holds the networks, optimisers and counters for one run; `run()` trains to `config.total_kimg`."""

    def __init__(
        self,
        config: StyleGAN2Config,
        images: torch.Tensor,
        run_dir: str | os.PathLike,
        publish_path: str | os.PathLike | None = None,
        data_info: dict[str, Any] | None = None,
        fid_weights: str | os.PathLike | None = None,
        progress: bool = True,
        device: torch.device | None = None,
        on_snapshot: Callable[[dict[str, Any]], None] | None = None,
        resume_from: str | os.PathLike | None = None,
        publish_discriminator: bool = False,
    ):
        if (
            images.ndim != 4
            or images.shape[1] != 1
            or images.shape[-1] != config.resolution
            or images.shape[-2] != config.resolution
        ):
            raise ValueError(
                f"images must be (N, 1, {config.resolution}, {config.resolution}), got {tuple(images.shape)}"
            )
        self.config, self.images = config, images
        self.run_dir = Path(run_dir)
        self.publish_path = Path(publish_path) if publish_path else None
        self.data_info = data_info or {"slices": len(images)}
        self.fid_weights, self.progress, self.on_snapshot = fid_weights, progress, on_snapshot
        self.publish_discriminator = publish_discriminator
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = world_size()
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} must divide evenly over {self.world} processes")
        per_rank = config.batch_size // self.world
        if per_rank % min(config.mbstd_group, per_rank):
            raise ValueError(
                f"{per_rank} images per process do not split into minibatch-std groups of {config.mbstd_group}"
            )
        self.device = device or (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        self._build()
        self.cur_nimg, self.batch_idx = 0, 0
        self.history: list[dict[str, Any]] = []
        if not self._resume_if_possible() and resume_from is not None:
            self._warm_start(Path(resume_from))

    def _build(self) -> None:
        c = self.config
        torch.manual_seed(c.seed)  # identical initial weights on every rank
        self.G = Generator(**c.generator_kwargs).to(self.device).train().requires_grad_(False)
        self.D = Discriminator(**c.discriminator_kwargs).to(self.device).train().requires_grad_(False)
        if c.channels_last:
            self.G, self.D = self.G.to(memory_format=torch.channels_last), self.D.to(memory_format=torch.channels_last)
        self.G_ema = copy.deepcopy(self.G).eval()
        self.augment_pipe = AugmentPipe(p=0.0).to(self.device) if c.augment else None
        self.ada = AdaController(self.augment_pipe, c.ada_target, c.ada_interval, c.ada_kimg) if c.augment else None
        self.loss = StyleGAN2Loss(
            self.G,
            self.D,
            self.augment_pipe,
            c.r1_gamma,
            c.style_mixing_prob,
            c.pl_weight,
            mixed_precision=c.mixed_precision,
        )
        self.opts = {}
        for name, module, interval in (("G", self.G, c.G_reg_interval), ("D", self.D, c.D_reg_interval)):
            ratio = interval / (interval + 1)  # lazy regularization: the paper's lr / beta correction
            betas = (float(c.betas[0]) ** ratio, float(c.betas[1]) ** ratio)
            self.opts[name] = torch.optim.Adam(
                module.parameters(), lr=c.lr * ratio, betas=betas, eps=1e-8, fused=c.fused_adam
            )

    # --- state ------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    def state_dict(self) -> dict[str, Any]:
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opts["G"].state_dict(),
            "opt_D": self.opts["D"].state_dict(),
            "augment_p": float(self.augment_pipe.p) if self.augment_pipe is not None else 0.0,
            "ada": {"sign_sum": self.ada.sign_sum, "count": self.ada.count, "steps": self.ada.steps, "rt": self.ada.rt}
            if self.ada
            else None,
            "layout": GENERATOR_LAYOUT,
            "pl_mean": float(self.loss.pl_mean),
            "cur_nimg": self.cur_nimg,
            "batch_idx": self.batch_idx,
            "history": self.history,
        }

    def _resume_if_possible(self) -> bool:
        """Exact resume from <run_dir>/training-state.pt; False when there is none (or it does not fit)."""
        if not self.state_path.exists():
            return False
        payload = load_checkpoint(self.state_path, STATE_KIND, map_location=self.device)
        saved = StyleGAN2Config.from_dict(payload["config"])
        if saved.architecture() != self.config.architecture():
            logger.warning(
                "%s was trained with another architecture (%s); starting a new run over it",
                self.state_path,
                saved.architecture(),
            )
            return False
        s = payload["state"]
        if s.get("layout", 1) != GENERATOR_LAYOUT:
            logger.warning(
                "%s holds an earlier generator layout (%s); starting a new run over it",
                self.state_path,
                s.get("layout", 1),
            )
            return False
        self.G.load_state_dict(s["G"])
        self.D.load_state_dict(s["D"])
        self.G_ema.load_state_dict(s["G_ema"])
        self.opts["G"].load_state_dict(s["opt_G"])
        self.opts["D"].load_state_dict(s["opt_D"])
        if self.augment_pipe is not None:
            self.augment_pipe.p.fill_(s["augment_p"])
        if self.ada and s["ada"]:
            self.ada.sign_sum, self.ada.count, self.ada.steps, self.ada.rt = (
                s["ada"]["sign_sum"],
                s["ada"]["count"],
                s["ada"]["steps"],
                s["ada"]["rt"],
            )
        self.loss.pl_mean = torch.tensor(s["pl_mean"])
        self.cur_nimg, self.batch_idx, self.history = s["cur_nimg"], s["batch_idx"], list(s["history"])
        logger.info("resumed %s at %.3f kimg", self.state_path, self.cur_nimg / 1000)
        return True

    def _warm_start(self, path: Path) -> None:
        """Continue from a published generator file: G and G_ema from its EMA weights, D and ADA p when it holds
        them (else a fresh D), kimg counted on; optimisers and the EMA/ADA statistics restart (NVlabs' --resume)."""
        w = read_warm_start(path)
        saved = StyleGAN2Config.from_dict(w["config"])
        if saved.architecture() != self.config.architecture():
            raise LabelFactoryError(
                f"{path.name} was trained with another architecture ({saved.architecture()}): it cannot be continued "
                "with this preset"
            )
        self.G.load_state_dict(w["generator"])
        self.G_ema.load_state_dict(w["generator"])
        if w["discriminator"] is not None:
            self.D.load_state_dict(w["discriminator"])
        else:
            logger.warning("%s holds no discriminator: continuing its generator against a new one", path)
        if self.augment_pipe is not None:
            self.augment_pipe.p.fill_(w["augment_p"])
        self.cur_nimg = int(round(w["kimg"] * 1000))
        logger.info("continuing %s from %.3f kimg", path, w["kimg"])

    def save_state(self) -> None:
        save_checkpoint(
            {"kind": STATE_KIND, "config": self.config.to_dict(), "data": self.data_info, "state": self.state_dict()},
            self.state_path,
        )

    # --- one step ---------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One minibatch of every due phase; returns the logged scalars."""
        c = self.config
        torch.manual_seed(_step_seed(c.seed, self.rank, self.batch_idx))
        per_rank = c.batch_size // self.world
        gen = torch.Generator().manual_seed(_step_seed(c.seed, 0, self.batch_idx))
        idx = torch.randint(len(self.images), (c.batch_size,), generator=gen)[
            self.rank * per_rank : (self.rank + 1) * per_rank
        ]
        real = self.images[idx].to(self.device)
        if c.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        scalars: dict[str, float] = {}
        phases = (
            ("Gmain", "G", 1),
            ("Greg", "G", c.G_reg_interval),
            ("Dmain", "D", 1),
            ("Dreg", "D", c.D_reg_interval),
        )
        for phase, net, interval in phases:
            if self.batch_idx % interval or (phase == "Greg" and c.pl_weight == 0):
                continue
            module, other = (self.G, self.D) if net == "G" else (self.D, self.G)
            module.requires_grad_(True)
            other.requires_grad_(False)
            self.opts[net].zero_grad(set_to_none=True)
            out = self.loss.accumulate_gradients(
                phase, real, torch.randn(per_rank, c.z_dim, device=self.device), gain=interval
            )
            module.requires_grad_(False)
            _sync_gradients(module)
            self.opts[net].step()
            if "real_logits" in out and self.ada:
                self.ada.accumulate(out.pop("real_logits"))
            out.pop("real_logits", None)
            scalars.update(out)
        if self.world > 1:  # mean of the ranks' lerps = the lerp of the global batch mean
            all_reduce_mean(self.G.mapping.w_avg)
        self._update_ema()
        self.cur_nimg += c.batch_size
        self.batch_idx += 1
        if self.ada:
            self.ada.step(c.batch_size, reduce=_all_reduce_sum if self.world > 1 else None)
            scalars["Progress/augment"] = float(self.augment_pipe.p)
            if not math.isnan(self.ada.rt):
                scalars["Progress/rt"] = self.ada.rt
        return scalars

    @torch.no_grad()
    def _update_ema(self) -> None:
        c = self.config
        ema_nimg = (c.ema_kimg if c.ema_kimg is not None else c.batch_size * 10 / 32) * 1000
        if c.ema_rampup is not None:
            ema_nimg = min(ema_nimg, self.cur_nimg * c.ema_rampup)
        beta = 0.5 ** (c.batch_size / max(ema_nimg, 1e-8))
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters(), strict=True):
            p_ema.copy_(p.detach().lerp(p_ema, beta))
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers(), strict=True):
            b_ema.copy_(b)

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train until `total_kimg`; returns the final stats (also written to <run_dir>/train_stats.json)."""
        c = self.config
        total = int(c.total_kimg * 1000)
        writer = bar = fid = None
        if is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.cur_nimg)
            if c.fid_kimg > 0:
                from labelfactory.evaluation.fid import FIDEvaluator

                fid = FIDEvaluator.create(
                    self.images, min(c.fid_images, len(self.images)), self.fid_weights, self.device
                )
            if self.progress:
                from tqdm import tqdm

                bar = tqdm(
                    total=total, initial=min(self.cur_nimg, total), unit="img", desc="stylegan2", dynamic_ncols=True
                )
        start, start_nimg = time.time(), self.cur_nimg
        last_fid = next((h["fid"] for h in reversed(self.history) if h.get("fid") is not None), None)
        scalars: dict[str, float] = {}
        try:
            while self.cur_nimg < total:
                prev = self.cur_nimg
                scalars = self.step()
                done = self.cur_nimg >= total
                if writer is not None:
                    for k, v in scalars.items():
                        writer.add_scalar(k, v, self.cur_nimg)
                if bar is not None:
                    bar.update(self.cur_nimg - prev)
                    bar.set_postfix(
                        {
                            k.split("/")[-1]: f"{v:.3g}"
                            for k, v in scalars.items()
                            if k in ("Loss/G/loss", "Loss/D/loss", "Progress/augment")
                        }
                    )
                if not (done or _crossed(prev, self.cur_nimg, c.snapshot_kimg)):
                    continue
                if fid is not None and (done or _crossed(prev, self.cur_nimg, c.fid_kimg)):
                    last_fid = fid(self.G_ema)
                    writer.add_scalar("Metrics/fid", last_fid, self.cur_nimg)
                self._snapshot(scalars, last_fid, (time.time() - start) / max(self.cur_nimg - start_nimg, 1) * 1000)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        return self.history[-1] if self.history else {}

    def _snapshot(self, scalars: dict[str, float], fid: float | None, sec_per_kimg: float) -> None:
        entry = {
            "kimg": self.cur_nimg / 1000,
            "augment_p": float(self.augment_pipe.p) if self.augment_pipe is not None else 0.0,
            "rt": (self.ada.rt if self.ada and not math.isnan(self.ada.rt) else None),
            "fid": fid,
            "sec_per_kimg": sec_per_kimg,
            **{k.replace("/", "_"): v for k, v in scalars.items()},
        }
        self.history.append(entry)
        if not is_main():
            return
        self.save_state()
        save_preview(self.G_ema, self.run_dir / "preview.png", self.config.preview_seeds)
        if self.publish_path is not None:
            publish_generator(
                self.G_ema,
                self.config.generator_kwargs,
                self.publish_path,
                self.config.to_dict(),
                self.data_info,
                self.cur_nimg / 1000,
                discriminator=(
                    (self.D, self.config.discriminator_kwargs, entry["augment_p"])
                    if self.publish_discriminator
                    else None
                ),
            )
        stats = {**entry, "total_kimg": self.config.total_kimg, "history": self.history}
        write_json_atomic(stats, self.run_dir / "train_stats.json")
        if self.on_snapshot is not None:
            self.on_snapshot(stats)


def train(config: StyleGAN2Config, images: torch.Tensor, run_dir: str | os.PathLike, **kwargs) -> dict[str, Any]:
    """Build (or resume) a Trainer on `images` (N, 1, R, R) in [-1, 1] and train to config.total_kimg."""
    return Trainer(config, images, run_dir, **kwargs).run()
