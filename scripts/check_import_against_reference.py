"""Prove `labelfactory import-stylegan2` exact against NVlabs stylegan2-ada-pytorch itself (not part of the test suite).

The reference's licence keeps its code out of this repository, so this script takes a path to a
clone of it. For each configuration it builds the reference's own Generator (random weights, every
bias, noise strength, w_avg and const perturbed so that each mapped tensor matters), pickles it the
way its training loop writes snapshots (a dict with G, D, G_ema, augment_pipe, training_set_kwargs),
imports that file with our command, and compares, for the same z and truncation, the reference's
image (pure-PyTorch fallbacks on CPU, noise_mode='const', force_fp32=True; mean of R, G, B for
3 channels) with ours, plus every synthesis layer's output and the mapping's ws.

    .venv/bin/python scripts/check_import_against_reference.py --reference /tmp/stylegan2-ada-pytorch
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [  # (resolution, channels, num_fp16_res, conv_clamp, pickle protocol); train.py's defaults are 4 and 256
    (32, 1, 0, None, 4),
    (32, 3, 4, 256, 3),
    (64, 1, 4, 256, 3),
    (64, 3, 0, None, 4),
    (256, 3, 4, 256, 3),
]
PSIS = [(1.0, None), (0.7, None), (0.5, 4)]  # (truncation_psi, truncation_cutoff)


def reference_networks(res: int, channels: int, num_fp16_res: int, conv_clamp: float | None, seed: int):
    """The reference's G, D and AugmentPipe, G with perturbed random weights."""
    import dnnlib
    from training.augment import AugmentPipe
    from training.networks import Discriminator, Generator

    torch.manual_seed(seed)
    syn = dnnlib.EasyDict(channel_base=1024, channel_max=64, num_fp16_res=num_fp16_res, conv_clamp=conv_clamp)
    G = Generator(
        z_dim=48,
        c_dim=0,
        w_dim=40,
        img_resolution=res,
        img_channels=channels,
        mapping_kwargs=dnnlib.EasyDict(num_layers=3),
        synthesis_kwargs=syn,
    )
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith(("bias", "noise_strength")):
                p.add_(torch.randn_like(p) * 0.2)
        G.mapping.w_avg.copy_(torch.randn_like(G.mapping.w_avg))
    D = Discriminator(
        c_dim=0,
        img_resolution=res,
        img_channels=channels,
        channel_base=1024,
        channel_max=64,
        num_fp16_res=num_fp16_res,
        conv_clamp=conv_clamp,
    )
    return G, D, AugmentPipe(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1)


def write_snapshot(G, D, aug, path: Path, protocol: int) -> None:
    """As training/training_loop.py writes network-snapshot-*.pkl."""
    data = dict(
        training_set_kwargs=dict(
            class_name="training.dataset.ImageFolderDataset", path="ct.zip", resolution=G.img_resolution
        )
    )
    for name, module in [("G", G), ("D", D), ("G_ema", G), ("augment_pipe", aug)]:
        data[name] = copy.deepcopy(module).eval().requires_grad_(False).cpu()
    with path.open("wb") as f:
        pickle.dump(data, f, protocol=protocol)


def reference_forward(G, z, psi, cutoff):
    """-> (ws, image, synthesis layer outputs in order) from the reference in float32."""
    outs = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: outs.append(o.float()))
        for res in G.synthesis.block_resolutions
        for name, m in getattr(G.synthesis, f"b{res}").named_children()
        if name in ("conv0", "conv1")
    ]
    ws = G.mapping(z, None, truncation_psi=psi, truncation_cutoff=cutoff)
    img = G.synthesis(ws, noise_mode="const", force_fp32=True)
    for h in hooks:
        h.remove()
    return ws, img.mean(dim=1, keepdim=True), outs


def check(config, tmp: Path) -> dict:
    from labelfactory.cli import main
    from labelfactory.stylegan2.checkpoint import load_generator

    res, channels, fp16, clamp, protocol = config
    G_ref, D, aug = reference_networks(res, channels, fp16, clamp, seed=res + channels)
    G_ref = G_ref.eval().requires_grad_(False)
    pkl, pt = tmp / f"network-snapshot-{res}x{channels}.pkl", tmp / f"stylegan2-{res}x{channels}.pt"
    write_snapshot(G_ref, D, aug, pkl, protocol)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        status = main(["import-stylegan2", str(pkl), "--out", str(pt)])
    if status != 0:
        raise SystemExit(f"import-stylegan2 failed on {pkl}")
    import_s = time.perf_counter() - t0
    G = load_generator(pt)
    z = torch.randn(4, G.z_dim, generator=torch.Generator().manual_seed(7))
    row = dict(
        resolution=res,
        img_channels=channels,
        num_fp16_res=fp16,
        conv_clamp=clamp,
        pickle_protocol=protocol,
        import_s=round(import_s, 3),
        truncation=[],
    )
    with torch.no_grad():
        for psi, cutoff in PSIS:
            ws_ref, img_ref, layers_ref = reference_forward(G_ref, z, psi, cutoff)
            ws = G.mapping(z, psi, cutoff)
            img, layers = G.synthesis(ws, noise_mode="const", return_features=True)
            row["truncation"].append(
                dict(
                    psi=psi,
                    cutoff=cutoff,
                    ws_max_abs_diff=(ws - ws_ref).abs().max().item(),
                    image_max_abs_diff=(img - img_ref).abs().max().item(),
                    image_max_abs=img_ref.abs().max().item(),
                    layer_max_abs_diff=[
                        round((a - b).abs().max().item(), 9) for a, b in zip(layers, layers_ref, strict=True)
                    ],
                )
            )
    return row


def main_(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="a clone of NVlabs/stylegan2-ada-pytorch")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "import_reference.json")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs image difference to pass")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.reference.resolve()))
    torch.set_num_threads(1)
    commit = subprocess.run(
        ["git", "-C", str(args.reference), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [check(c, Path(tmp)) for c in CONFIGS]
    worst = max(t["image_max_abs_diff"] for r in rows for t in r["truncation"])
    result = dict(
        reference="NVlabs/stylegan2-ada-pytorch",
        reference_commit=commit,
        torch=torch.__version__,
        machine=platform.processor() or platform.machine(),
        threads=1,
        tolerance=args.tolerance,
        max_image_abs_diff=worst,
        passed=worst <= args.tolerance,
        configs=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        diffs = ", ".join(f"psi {t['psi']}: {t['image_max_abs_diff']:.2e}" for t in r["truncation"])
        print(
            f"{r['resolution']}^2 x{r['img_channels']} fp16_res={r['num_fp16_res']} clamp={r['conv_clamp']}: "
            f"max |ours - ref| {diffs}"
        )
    print(
        f"max abs diff {worst:.3e} ({'pass' if result['passed'] else 'FAIL'} at {args.tolerance:g}); wrote {args.out}"
    )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main_())
