"""StyleGAN2 losses: non-saturating logistic, R1 on (augmented) reals, path-length regularization, style mixing.

Phases follow stylegan2-ada-pytorch: 'Gmain', 'Greg' (path length), 'Dmain', 'Dreg' (R1); the
training loop runs the reg phases lazily (every G_reg_interval / D_reg_interval minibatches) and
passes the interval as `gain`, so the regularizer's weight per image is unchanged. With
`mixed_precision`, the main phases run G's and D's bf16 blocks in bfloat16 (`bf16=True`); the
regularizers and the mapping network stay float32, as the reference keeps its fp16 to the main work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from labelfactory.stylegan2.augment import AugmentPipe
from labelfactory.stylegan2.networks import Discriminator, Generator


class StyleGAN2Loss:
    def __init__(
        self,
        G: Generator,
        D: Discriminator,
        augment_pipe: AugmentPipe | None = None,  # ADA on every image D sees; None: no augmentation
        r1_gamma: float = 1.0,  # R1 weight (gamma / 2 times the squared gradient norm)
        style_mixing_prob: float = 0.9,  # probability of mixing two latents in a batch
        pl_weight: float = 0.0,  # path-length regularization weight; 0: no Greg phase
        pl_batch_shrink: int = 2,  # Greg runs on batch / pl_batch_shrink images
        pl_decay: float = 0.01,  # decay of the running mean path length
        mixed_precision: bool = False,  # main phases with G's and D's bf16 blocks in bfloat16
    ):
        self.G, self.D, self.augment_pipe = G, D, augment_pipe
        self.r1_gamma, self.style_mixing_prob = r1_gamma, style_mixing_prob
        self.pl_weight, self.pl_batch_shrink, self.pl_decay = pl_weight, pl_batch_shrink, pl_decay
        self.pl_mean = torch.zeros([])
        self.mixed_precision = mixed_precision

    def run_G(
        self, z: torch.Tensor, update_w_avg: bool = True, bf16: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z (N, z_dim) -> (images (N, C, R, R) float32, ws (N, num_ws, w_dim)); style mixing with its probability."""
        ws = self.G.mapping(z, update_w_avg=update_w_avg)
        if self.style_mixing_prob > 0:
            cutoff = torch.randint(1, ws.shape[1], (), device=ws.device)
            cutoff = torch.where(
                torch.rand((), device=ws.device) < self.style_mixing_prob, cutoff, torch.full_like(cutoff, ws.shape[1])
            )
            mixed = self.G.mapping(torch.randn_like(z))
            ws = torch.where(torch.arange(ws.shape[1], device=ws.device)[None, :, None] < cutoff, ws, mixed)
        return self.G.synthesis(ws, noise_mode="random", bf16=bf16), ws

    def run_D(self, img: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """Images -> logits (N, 1), float32; ADA augments every image D sees."""
        if self.augment_pipe is not None:
            img = self.augment_pipe(img)
        return self.D(img, bf16=bf16)

    def accumulate_gradients(
        self, phase: str, real_img: torch.Tensor, gen_z: torch.Tensor, gain: float = 1.0
    ) -> dict[str, float]:
        """Backward the phase's loss (times `gain`) into the parameters that require grad; returns scalars to log.

        The real logits of 'Dmain' are returned under 'real_logits' (a tensor) for ADA.
        """
        dev, bf16 = real_img.device, self.mixed_precision
        out: dict = {}
        if phase == "Gmain":
            gen_img, _ = self.run_G(gen_z, bf16=bf16)
            gen_logits = self.run_D(gen_img, bf16=bf16)
            loss = F.softplus(-gen_logits).mean()
            loss.mul(gain).backward()
            out["Loss/G/loss"] = loss.item()
        elif phase == "Greg":
            if self.pl_weight == 0:
                return out
            n = max(gen_z.shape[0] // self.pl_batch_shrink, 1)
            gen_img, ws = self.run_G(gen_z[:n], update_w_avg=False)
            pl_noise = torch.randn_like(gen_img) / math.sqrt(gen_img.shape[2] * gen_img.shape[3])
            (pl_grads,) = torch.autograd.grad((gen_img * pl_noise).sum(), ws, create_graph=True)
            pl_lengths = pl_grads.square().sum(2).mean(1).sqrt()
            self.pl_mean = self.pl_mean.to(dev).lerp(pl_lengths.mean().detach(), self.pl_decay)
            penalty = (pl_lengths - self.pl_mean).square()
            (gen_img[:, 0, 0, 0] * 0 + penalty * self.pl_weight).mean().mul(gain).backward()
            out["Loss/pl_penalty"] = penalty.mean().item()
        elif phase == "Dmain":
            with torch.no_grad():
                gen_img, _ = self.run_G(gen_z, bf16=bf16)
            gen_logits = self.run_D(gen_img, bf16=bf16)
            real_logits = self.run_D(real_img, bf16=bf16)
            loss_gen, loss_real = F.softplus(gen_logits).mean(), F.softplus(-real_logits).mean()
            (loss_gen + loss_real).mul(gain).backward()
            out.update(
                {
                    "Loss/D/loss": (loss_gen + loss_real).item(),
                    "Loss/scores/fake": gen_logits.mean().item(),
                    "Loss/scores/real": real_logits.mean().item(),
                    "real_logits": real_logits.detach(),
                }
            )
        elif phase == "Dreg":
            real = real_img.detach().requires_grad_(True)
            real_logits = self.run_D(real)
            (r1_grads,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
            penalty = r1_grads.square().sum(dim=[1, 2, 3])
            (real_logits * 0 + (penalty * (self.r1_gamma / 2))[:, None]).mean().mul(gain).backward()
            out["Loss/r1_penalty"] = penalty.mean().item()
        else:
            raise ValueError(f"unknown phase {phase!r}")
        return out
