"""2x up/down resampling with StyleGAN2's separable [1, 3, 3, 1] FIR filter (depthwise convs).

Kept tiny and here because these exact padding conventions (the upfirdn2d ones of
stylegan2-ada-pytorch) are what the network's shapes and the paper's antialiasing rely on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_TAPS = torch.tensor([1.0, 3.0, 3.0, 1.0])
_FILTER = torch.outer(_TAPS, _TAPS) / _TAPS.sum() ** 2  # (4, 4), sums to 1


def _kernel(x: torch.Tensor, gain: float) -> torch.Tensor:
    return (_FILTER * gain).to(device=x.device, dtype=x.dtype).expand(x.shape[1], 1, 4, 4)


def upsample2d(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W): zero-insertion then the FIR filter (gain 4), as one transposed conv."""
    return F.conv_transpose2d(x, _kernel(x, 4.0), stride=2, padding=1, groups=x.shape[1])


def filter2d(x: torch.Tensor, pad: int, gain: float = 1.0) -> torch.Tensor:
    """The FIR filter (times `gain`) with `pad` zeros each side: (N, C, H, W) -> (N, C, H + 2pad - 3, W + 2pad - 3)."""
    return F.conv2d(F.pad(x, [pad] * 4), _kernel(x, gain), groups=x.shape[1])


def downsample2d(x: torch.Tensor, stride: int = 2, pad: int = 1) -> torch.Tensor:
    """FIR-filter with `pad` zeros each side, then keep every `stride`-th pixel; x's dtype.

    Defaults give (N, C, H/2, W/2); stride=1, pad=2 gives the (H+1) blur a stride-2 3x3 conv expects.
    A bf16 input is filtered in float32 when strided: oneDNN's strided depthwise bf16 conv (and its
    backward) runs ~10x slower than float32 on CPU.
    """
    y = x.float() if stride > 1 else x
    return F.conv2d(F.pad(y, [pad] * 4), _kernel(y, 1.0), stride=stride, groups=x.shape[1]).to(x.dtype)
