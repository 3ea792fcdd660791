"""One device rule for the whole project: `auto` | `cpu` | `cuda` | `cuda:N`, resolved by `resolve_device` only.

`auto` is the GPU when one is present, else the CPU. Under `torchrun` (LOCAL_RANK set) `auto` and `cuda`
take the rank's own GPU, `cuda:LOCAL_RANK`. Every trainer and infer takes its device from here (the app's
`--conf device`, a command's `--device`, a library `device=` argument); model files stay device-independent
(saved from CPU tensors, loaded with `map_location`).

Precision on a GPU (`precision`: `auto` | `fp32` | `bf16`): `auto` is bf16 autocast on CUDA and fp32 on the
CPU; `cuda_speedups` turns on TF32 matmuls / convolutions and cuDNN autotuning.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re

import torch

from labelfactory.errors import LabelFactoryError

DEVICE_HELP = "auto (the GPU when one is present) | cpu | cuda | cuda:N"
PRECISIONS = ("auto", "fp32", "bf16")
_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """`spec` -> torch.device; LabelFactoryError (400) for an unknown spec, CUDA without a GPU or a bad index.

    local_rank: the process's GPU under torchrun (default: the LOCAL_RANK environment variable, if set);
    used by `auto` and `cuda` without an index."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    m = _SPEC.match(text)
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise LabelFactoryError(f"device {spec!r}: expected {DEVICE_HELP}")
    kind, index = m.group(1), m.group(2)
    if local_rank is None and os.environ.get("LOCAL_RANK", "").isdigit():
        local_rank = int(os.environ["LOCAL_RANK"])
    available = torch.cuda.is_available()
    if kind == "cpu" or (kind == "auto" and not available):
        return torch.device("cpu")
    if not available:
        raise LabelFactoryError(f"device {spec!r}: this machine has no usable CUDA GPU; use cpu or auto")
    n = torch.cuda.device_count()
    i = int(index) if index is not None else (local_rank or 0)
    if i >= n:
        raise LabelFactoryError(f"device {spec!r}: GPU {i} does not exist, this machine has {n} (cuda:0..{n - 1})")
    return torch.device("cuda", i)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """`--device` (default auto) on a command; resolve it with `resolve_device(args.device)`."""
    parser.add_argument("--device", default="auto", help=f"where to run: {DEVICE_HELP} (default: auto)")


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether `precision` means bf16 autocast on `device` (auto: on CUDA only)."""
    if precision not in PRECISIONS:
        raise LabelFactoryError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `use_bf16`, else a no-op context."""
    if use_bf16(device, precision):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cuda_speedups(device: torch.device) -> None:
    """On CUDA: TF32 for fp32 matmuls and convolutions, cuDNN autotuning (our infers and trainers repeat a few
    shapes); process-wide. A no-op on the CPU."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def module_device(module: torch.nn.Module) -> torch.device:
    """The device a module's parameters (or buffers) live on; CPU for a module with neither."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")
