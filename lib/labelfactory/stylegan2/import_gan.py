"""`labelfactory import-stylegan2 FILE --out MODEL.pt`: a stylegan2-ada-pytorch `G_ema` as our generator checkpoint.

The pickle is read as data only (`reference_pickle`), its configuration checked against what our
generator can reproduce (anything else is refused, naming the option), the reference's names
mapped onto ours, and the result published like a trained generator (`gan.checkpoint`).

Names: `mapping.fcN` -> `mapping.layers.N`; `synthesis.b<R>.conv0/conv1` -> `synthesis.blocks[k].convs[0/1]`
(k = log2 R - 2; the 4x4 block has only `conv1`, our `convs[0]`); `const`, `torgb`, `noise_const`,
`noise_strength`, `affine` keep theirs. The `resample_filter` buffers are checked to be [1, 3, 3, 1]
and dropped (ours is a constant). FP16 layers (`num_fp16_res`) change only the reference's run-time
precision, not its weights: the import computes in float32, as the reference with `force_fp32=True`.
`conv_clamp` carries over, to the convs and to toRGB as in the reference.

Three colour channels become one by averaging toRGB's weights and biases over its outputs. The image
is a sum of upsampled toRGB outputs, each linear in (weight, bias) per channel, so this gives exactly
mean(R, G, B) of the reference's image. A network trained on grey slices exported as RGB (R = G = B)
makes three near-equal channels: their mean is that grey image, and equal weights (rather than luma
weights) average out independent per-channel errors best.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from labelfactory.errors import LabelFactoryError
from labelfactory.stylegan2.checkpoint import publish_generator
from labelfactory.stylegan2.networks import Generator
from labelfactory.stylegan2.reference_pickle import Record, load_reference_pickle

SOURCE = "stylegan2-ada-pytorch"
_TAPS = torch.tensor([1.0, 3.0, 3.0, 1.0])
_FILTER = torch.outer(_TAPS, _TAPS) / _TAPS.sum() ** 2  # the reference's setup_filter([1, 3, 3, 1])


def _refuse(option: str) -> LabelFactoryError:
    return LabelFactoryError(
        f"the generator uses {option}, which labelfactory's generator does not have: not imported", 400
    )


def _check_mapping(mapping: Record, z_dim: int, w_dim: int) -> tuple[int, float]:
    """-> (num_layers, lr_multiplier); refuses layer widths other than w_dim, other activations, no w_avg."""
    num_layers = int(mapping.attr("num_layers", 0))
    fcs = [mapping.modules.get(f"fc{i}") for i in range(num_layers)]
    if num_layers < 1 or any(fc is None for fc in fcs):
        raise LabelFactoryError(
            "the mapping network has no fc0..fcN layers: not a stylegan2-ada-pytorch generator", 400
        )
    for i, fc in enumerate(fcs):
        if fc.attr("activation") != "lrelu":
            raise _refuse(f"mapping activation={fc.attr('activation')!r}")
        shape = tuple(fc.state["_parameters"]["weight"].shape)
        if shape != (w_dim, z_dim if i == 0 else w_dim):
            raise _refuse(f"mapping layer_features other than w_dim={w_dim} (fc{i} weight {list(shape)})")
    gains = {float(fc.attr("bias_gain")) for fc in fcs}
    if len(gains) != 1:
        raise _refuse(f"mapping lr multipliers {sorted(gains)} differing by layer")
    if mapping.state["_buffers"].get("w_avg") is None:
        raise _refuse("w_avg_beta=None (no w_avg, so no truncation)")
    return num_layers, gains.pop()


def _check_synthesis(synthesis: Record) -> float | None:
    """-> conv_clamp (one value for every layer); refuses other architectures, kernels, filters, activations."""
    clamps = set()
    for res in synthesis.attr("block_resolutions"):
        block = synthesis.modules[f"b{res}"]
        if block.attr("architecture") != "skip":
            raise _refuse(f"architecture={block.attr('architecture')!r} (ours is 'skip')")
        layers = [block.modules[n] for n in (("conv1",) if res == 4 else ("conv0", "conv1"))]
        for layer in layers:
            if not layer.attr("use_noise", True):
                raise _refuse("use_noise=False")
            if layer.attr("activation") != "lrelu":
                raise _refuse(f"synthesis activation={layer.attr('activation')!r}")
            if tuple(layer.state["_parameters"]["weight"].shape[2:]) != (3, 3):
                raise _refuse(f"kernel_size={layer.state['_parameters']['weight'].shape[-1]}")
        for name, t in block.tensors().items():
            if name.endswith("resample_filter") and (
                t.shape != _FILTER.shape or not torch.allclose(t.float(), _FILTER)
            ):
                raise _refuse(f"a resample_filter other than [1, 3, 3, 1] (b{res}.{name})")
        clamps |= {layer.attr("conv_clamp") for layer in layers} | {block.modules["torgb"].attr("conv_clamp")}
    if len(clamps) != 1:
        raise _refuse(f"conv_clamp values {sorted(map(str, clamps))} differing by layer")
    clamp = clamps.pop()
    return None if clamp is None else float(clamp)


def _our_name(name: str) -> str | None:
    """The reference's state-dict name -> ours; None for the dropped resample filters; KeyError if unknown."""
    if name.endswith("resample_filter"):
        return None
    if m := re.fullmatch(r"mapping\.fc(\d+)\.(weight|bias)", name):
        return f"mapping.layers.{m[1]}.{m[2]}"
    if name == "mapping.w_avg":
        return name
    if m := re.fullmatch(r"synthesis\.b(\d+)\.(.+)", name):
        res, rest = int(m[1]), m[2]
        block = f"synthesis.blocks.{int(math.log2(res)) - 2}"
        if c := re.fullmatch(r"conv([01])\.(.+)", rest):
            return f"{block}.convs.{int(c[1]) - (res == 4)}.{c[2]}"
        if rest == "const" or rest.startswith("torgb."):
            return f"{block}.{rest}"
    raise KeyError(name)


def convert_generator(G: Record) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """The reference's `G_ema` record -> (our Generator kwargs, our state dict, facts about the source)."""
    if not isinstance(G, Record) or G.class_name != "Generator":
        raise LabelFactoryError("G_ema is not a stylegan2-ada-pytorch Generator", 400)
    if G.attr("c_dim"):
        raise _refuse(f"class conditioning (c_dim={G.attr('c_dim')})")
    z_dim, w_dim, res, channels = (int(G.attr(k)) for k in ("z_dim", "w_dim", "img_resolution", "img_channels"))
    if channels not in (1, 3):
        raise _refuse(f"img_channels={channels} (1 or 3 can be imported)")
    if res < 8:
        raise _refuse(f"img_resolution={res} (ours starts at 8)")
    synthesis, mapping = G.modules["synthesis"], G.modules["mapping"]
    num_layers, lr_mul = _check_mapping(mapping, z_dim, w_dim)
    conv_clamp = _check_synthesis(synthesis)
    syn_kwargs = dict(synthesis.attr("_init_kwargs") or {})
    kwargs = dict(
        z_dim=z_dim,
        w_dim=w_dim,
        img_resolution=res,
        img_channels=1,
        channel_base=int(syn_kwargs.get("channel_base", 32768)),
        channel_max=int(syn_kwargs.get("channel_max", 512)),
        mapping_layers=num_layers,
        mapping_lr_multiplier=lr_mul,
        conv_clamp=conv_clamp,
    )
    state = {}
    for name, t in G.tensors().items():
        try:
            ours = _our_name(name)
        except KeyError:
            raise LabelFactoryError(
                f"the generator has a tensor {name} that labelfactory's generator has no place for", 400
            ) from None
        if ours is None:
            continue
        t = t.detach().to(torch.float32).contiguous().clone()
        state[ours] = (
            t.mean(dim=0, keepdim=True) if ours.endswith(("torgb.weight", "torgb.bias")) and channels == 3 else t
        )
    facts = dict(
        source=SOURCE, img_channels=channels, conv_clamp=conv_clamp, num_fp16_res=syn_kwargs.get("num_fp16_res", 0)
    )
    return kwargs, state, facts


def _plain(d: Any) -> dict[str, Any]:
    """The JSON-like items of a dict (what the reference records of its training set), for provenance."""
    return {str(k): v for k, v in dict(d or {}).items() if isinstance(v, (str, int, float, bool, type(None)))}


def import_generator(src: str | Path, out: str | Path) -> dict[str, Any]:
    """Convert the pickle's `G_ema` and publish it at `out`; returns a summary. LabelFactoryError(400) if refused."""
    src, out = Path(src), Path(out)
    data = load_reference_pickle(src)
    if not isinstance(data, dict) or "G_ema" not in data:
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise LabelFactoryError(
            f"{src.name} holds no G_ema (found {keys}): not a stylegan2-ada-pytorch network pickle", 400
        )
    try:
        kwargs, state, facts = convert_generator(data["G_ema"])
        G = Generator(**kwargs)
        G.load_state_dict(state)
    except LabelFactoryError as e:
        raise LabelFactoryError(f"{src.name}: {e}", e.status) from None
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as e:
        raise LabelFactoryError(
            f"{src.name}: G_ema does not have the layout of a stylegan2-ada-pytorch generator "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            400,
        ) from None
    snapshot = re.fullmatch(r"network-snapshot-(\d+)\.pkl", src.name)
    digest = hashlib.sha256()
    with src.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    sha256 = digest.hexdigest()
    config = {"imported": {**facts, "file": src.name, "sha256": sha256}}
    publish_generator(
        G.eval(),
        kwargs,
        out,
        config,
        {"training_set": _plain(data.get("training_set_kwargs"))},
        kimg=float(snapshot[1]) if snapshot else 0.0,
    )
    return {
        "out": str(out),
        "resolution": kwargs["img_resolution"],
        "source_channels": facts["img_channels"],
        "num_ws": G.num_ws,
        "sha256": sha256,
    }


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pickle", type=Path, help="a stylegan2-ada-pytorch network pickle (network-snapshot-*.pkl)")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="the generator file to write (e.g. apps/labelfactory/model/stylegan2.pt)",
    )


def run(args: argparse.Namespace) -> int:
    print(json.dumps(import_generator(args.pickle, args.out), indent=1))
    return 0
