"""Training loop: files written, exact resume, EMA/ADA moving; DDP with 2 gloo processes agrees across ranks."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from labelfactory.errors import LabelFactoryError
from labelfactory.stylegan2.checkpoint import load_generator
from labelfactory.stylegan2.config import StyleGAN2Config
from labelfactory.stylegan2.training import Trainer, train
from tests.conftest import TINY_GAN

TINY = StyleGAN2Config(
    **TINY_GAN,
    G_reg_interval=2,
    D_reg_interval=2,
    pl_weight=2.0,
    ada_interval=1,
    ada_kimg=0.1,
    ada_target=-1.0,
    total_kimg=0.024,
    snapshot_kimg=0.012,
    fid_kimg=0.0,
    preview_seeds=4,
    seed=3,
)


def _images(n=12, res=16):
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.interpolate(
        torch.rand(n, 1, 4, 4, generator=g) * 2 - 1, size=res, mode="bilinear", align_corners=False
    )


def test_train_writes_files_and_resume_is_exact(tmp_path):
    images = _images()
    stats = train(TINY, images, tmp_path / "full", publish_path=tmp_path / "full" / "stylegan2.pt", progress=False)
    assert (
        stats["kimg"] == 0.024
        and len(stats and json.loads((tmp_path / "full" / "train_stats.json").read_text())["history"]) == 2
    )
    assert (tmp_path / "full" / "preview.png").stat().st_size > 0
    assert any((tmp_path / "full" / "tensorboard").iterdir())
    assert stats["augment_p"] > 0  # target -1: r_t is always above it, ADA raises p

    half = TINY.with_overrides(total_kimg=0.012)
    train(half, images, tmp_path / "resumed", progress=False)  # a run "killed" after its first snapshot
    resumed = Trainer(
        TINY, images, tmp_path / "resumed", publish_path=tmp_path / "resumed" / "stylegan2.pt", progress=False
    )
    assert resumed.cur_nimg == 12
    resumed.run()

    a, b = load_generator(tmp_path / "full" / "stylegan2.pt"), load_generator(tmp_path / "resumed" / "stylegan2.pt")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    full = torch.load(tmp_path / "full" / "training-state.pt", weights_only=False)["state"]
    res = torch.load(tmp_path / "resumed" / "training-state.pt", weights_only=False)["state"]
    assert all(torch.equal(full["D"][k], res["D"][k]) for k in full["D"])
    assert full["augment_p"] == res["augment_p"] and full["batch_idx"] == res["batch_idx"] == 6
    ema_differs = any(not torch.equal(full["G"][k], full["G_ema"][k]) for k in full["G"] if k.endswith("weight"))
    assert ema_differs


DDP_SCRIPT = r"""
import sys, torch
from labelfactory.distributed import init_from_env, process_group_cleanup
from labelfactory.stylegan2.config import StyleGAN2Config
from labelfactory.stylegan2.training import Trainer
cfg = StyleGAN2Config(resolution=16, z_dim=16, w_dim=16, mapping_layers=2, channel_base=256, channel_max=16,
                     batch_size=4, G_reg_interval=2, D_reg_interval=2, pl_weight=0.0, ada_interval=1, ada_kimg=0.1,
                     total_kimg=0.012, snapshot_kimg=0.0, fid_kimg=0.0, preview_seeds=4)
with process_group_cleanup():
    rank, world, dev = init_from_env()
    g = torch.Generator().manual_seed(0)
    imgs = torch.nn.functional.interpolate(torch.rand(12, 1, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
    t = Trainer(cfg, imgs, sys.argv[1], progress=False)
    d0 = {k: v.clone() for k, v in t.D.state_dict().items()}
    t.run()
    out = {"G": t.G.state_dict(), "D": t.D.state_dict(), "D0": d0, "p": float(t.augment_pipe.p)}
    torch.save(out, f"{sys.argv[1]}/rank{rank}.pt")
"""


def test_ddp_two_gloo_ranks_end_identical(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=0",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=localhost:0",
        str(script),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for net in ("G", "D"):
        for k in r0[net]:
            assert torch.equal(r0[net][k], r1[net][k]), (net, k)
    assert r0["p"] == r1["p"]
    assert any(not torch.equal(r0["D"][k], r0["D0"][k]) for k in r0["D"])  # they trained
    assert (tmp_path / "training-state.pt").exists()


def test_batch_must_split_into_minibatch_std_groups(tmp_path):
    with pytest.raises(ValueError, match="6 images per process do not split into minibatch-std groups of 4"):
        Trainer(TINY.with_overrides(batch_size=6), _images(), tmp_path, progress=False)


def test_a_float32_run_continues_in_bf16(tmp_path):
    """Precision is not architecture: a float32 state resumes with mixed precision (bf16 blocks, clamp 256)."""
    images = _images()
    train(TINY.with_overrides(total_kimg=0.012), images, tmp_path, progress=False)
    t = Trainer(
        TINY.with_overrides(mixed_precision=True), images, tmp_path, publish_path=tmp_path / "g.pt", progress=False
    )
    assert t.cur_nimg == 12 and all(b.use_bf16 for b in t.D.blocks) and t.G.synthesis.blocks[-1].use_bf16
    stats = t.run()
    assert stats["kimg"] == 0.024 and math.isfinite(stats["Loss_G_loss"]) and math.isfinite(stats["Loss_D_loss"])
    G = load_generator(tmp_path / "g.pt")
    assert G.synthesis.blocks[-1].convs[0].conv_clamp == 256.0
    assert torch.isfinite(G(torch.randn(2, 16))).all()


def test_a_run_continues_from_a_published_file_with_its_discriminator(tmp_path):
    """--resume-from: a new run folder starts at the file's kimg with its G_ema, D and ADA p; without D, a fresh D."""
    images = _images()
    first = Trainer(
        TINY, images, tmp_path / "a", publish_path=tmp_path / "g.pt", progress=False, publish_discriminator=True
    )
    first.run()
    cont = Trainer(
        TINY.with_overrides(total_kimg=0.036), images, tmp_path / "b", progress=False, resume_from=tmp_path / "g.pt"
    )
    assert cont.cur_nimg == 24 and float(cont.augment_pipe.p) == pytest.approx(float(first.augment_pipe.p))
    for name, mine, theirs in (("G", cont.G, first.G_ema), ("G_ema", cont.G_ema, first.G_ema), ("D", cont.D, first.D)):
        assert all(
            torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values(), strict=True)
        ), name
    assert cont.run()["kimg"] == 0.036
    assert load_generator(tmp_path / "g.pt").checkpoint_info["kimg"] == 0.024  # the file still serves as a generator

    train(TINY, images, tmp_path / "c", publish_path=tmp_path / "g_only.pt", progress=False)
    fresh = Trainer(TINY, images, tmp_path / "d", progress=False, resume_from=tmp_path / "g_only.pt")
    assert fresh.cur_nimg == 24 and not torch.equal(fresh.D.out.weight, first.D.out.weight)
    with pytest.raises(LabelFactoryError, match="another architecture"):
        Trainer(
            TINY.with_overrides(channel_max=8), images, tmp_path / "e", progress=False, resume_from=tmp_path / "g.pt"
        )
