"""ADA: p control, augmentation as a distribution; R1 through the augmentation; losses train both nets."""

import torch

from labelfactory.stylegan2.augment import AdaController, AugmentPipe
from labelfactory.stylegan2.loss import StyleGAN2Loss
from labelfactory.stylegan2.networks import Discriminator, Generator

SMALL_G = dict(z_dim=16, w_dim=16, img_resolution=16, channel_base=256, channel_max=16, mapping_layers=2)
SMALL_D = dict(img_resolution=16, channel_base=256, channel_max=16)


def _run_ada(logit_value: float, steps: int = 40, batch: int = 64) -> float:
    pipe = AugmentPipe(p=0.5)
    ada = AdaController(pipe, target=0.6, interval=4, ada_kimg=1.0)
    for _ in range(steps):
        ada.accumulate(torch.full((batch, 1), logit_value))
        ada.step(batch)
    return float(pipe.p)


def test_ada_p_rises_when_d_overfits_and_falls_otherwise():
    assert _run_ada(+3.0) == 1.0  # always confident on reals: r_t = 1 > 0.6, p climbs to its cap
    assert _run_ada(-3.0) == 0.0  # never confident: r_t = -1 < 0.6, p falls to 0
    # speed: with ada_kimg images, p can move by exactly 1
    pipe = AugmentPipe(p=0.0)
    ada = AdaController(pipe, interval=4, ada_kimg=1.0)
    for _ in range(8):
        ada.accumulate(torch.ones(100, 1))
        ada.step(100)
    assert abs(float(pipe.p) - 0.8) < 1e-6 and ada.rt == 1.0


def test_augment_identity_at_p0_and_changes_images_at_p1():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    assert torch.equal(AugmentPipe(p=0.0)(x), x)
    y = AugmentPipe(p=1.0)(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert (y - x).abs().mean() > 0.1
    x = torch.nn.functional.interpolate(
        torch.rand(8, 1, 4, 4) * 2 - 1, size=16, mode="bicubic", align_corners=False
    )  # smooth images
    flips = AugmentPipe(p=1.0, brightness=0, contrast=0, scale=0, rotate=0, aniso=0, xfrac=0, xint=0, rotate90=0)(x)
    # x-flip only: every sample is (up to the FIR resampling blur) itself or its mirror image
    err = torch.minimum((flips - x).abs().mean(dim=[1, 2, 3]), (flips - x.flip(-1)).abs().mean(dim=[1, 2, 3]))
    assert err.max() < 0.1 * (x - x.flip(-1)).abs().mean()


def test_r1_double_backward_through_augmentation():
    torch.manual_seed(0)
    G, D = Generator(**SMALL_G), Discriminator(**SMALL_D)
    loss = StyleGAN2Loss(G, D, AugmentPipe(p=1.0), r1_gamma=1.0, style_mixing_prob=0.0)
    G.requires_grad_(False)
    real = torch.rand(4, 1, 16, 16) * 2 - 1
    out = loss.accumulate_gradients("Dreg", real, torch.randn(4, 16), gain=16)
    grads = [p.grad for p in D.parameters() if p.grad is not None]
    assert out["Loss/r1_penalty"] > 0
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert D.blocks[0].fromrgb.weight.grad.abs().sum() > 0


def test_phases_touch_only_their_network_and_pl_runs():
    torch.manual_seed(0)
    G, D = Generator(**SMALL_G), Discriminator(**SMALL_D)
    loss = StyleGAN2Loss(G, D, AugmentPipe(p=0.3), style_mixing_prob=0.9, pl_weight=2.0)
    real, z = torch.rand(4, 1, 16, 16) * 2 - 1, torch.randn(4, 16)
    for phase, train, frozen in (("Gmain", G, D), ("Greg", G, D), ("Dmain", D, G)):
        train.requires_grad_(True).zero_grad(set_to_none=True)
        frozen.requires_grad_(False).zero_grad(set_to_none=True)
        out = loss.accumulate_gradients(phase, real, z)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in train.parameters()), phase
        assert all(p.grad is None for p in frozen.parameters()), phase
    assert out["real_logits"].shape == (4, 1)
    assert float(loss.pl_mean) > 0
