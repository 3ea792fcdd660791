"""`labelfactory import-stylegan2`: a stylegan2-ada-pytorch pickle read as data only, its names mapped onto ours.

The reference's code cannot ship here (its licence), so a tiny stand-in writes pickles of the same
layout: each module a call of `torch_utils.persistence._reconstruct_persistent_obj(meta)` whose meta
holds the module's source and its `__dict__` (`_parameters`, `_buffers`, `_modules`, attributes),
inside a dict with `G_ema`. Exactness against the reference itself: scripts/check_import_against_reference.py.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch

from labelfactory.cli import main
from labelfactory.errors import LabelFactoryError
from labelfactory.stylegan2.checkpoint import load_generator
from labelfactory.stylegan2.import_gan import import_generator
from labelfactory.stylegan2.networks import Generator
from labelfactory.stylegan2.reference_pickle import load_reference_pickle

KW = dict(z_dim=16, w_dim=12, img_resolution=16, channel_base=128, channel_max=16, mapping_layers=2)
FILTER = torch.tensor([[1.0, 3, 3, 1], [3, 9, 9, 3], [3, 9, 9, 3], [1, 3, 3, 1]]) / 64


class StandIn:
    """Pickles like a persistent_class instance: the reconstruct function, (meta,) with source and state."""

    def __init__(self, class_name: str, source: str, **state):
        self.meta = dict(type="class", version=6, module_src=source, class_name=class_name, state=state)

    def __reduce__(self):
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,))


@pytest.fixture
def reference_modules(monkeypatch):
    """Stand-ins for `torch_utils.persistence` and `dnnlib.util`, present only while a pickle is written."""

    def _reconstruct_persistent_obj(meta):  # what the reference does: exec(meta["module_src"])
        raise AssertionError("the stand-in's reconstruct function must never be called")

    class EasyDict(dict):
        pass

    for fn, mod in ((_reconstruct_persistent_obj, "torch_utils.persistence"), (EasyDict, "dnnlib.util")):
        fn.__module__, fn.__qualname__ = mod, fn.__name__
        module = types.ModuleType(mod)
        setattr(module, fn.__name__, fn)
        monkeypatch.setitem(sys.modules, mod.split(".")[0], types.ModuleType(mod.split(".")[0]))
        monkeypatch.setitem(sys.modules, mod, module)
    return EasyDict


def _module(class_name, src, params=(), buffers=(), modules=(), **attrs):
    params = OrderedDict((k, torch.nn.Parameter(v.detach().clone(), requires_grad=False)) for k, v in params)
    state = dict(
        training=False,
        _parameters=params,
        _buffers=OrderedDict(buffers),
        _modules=OrderedDict(modules),
        _non_persistent_buffers_set=set(),
        _forward_hooks=OrderedDict(),
        **attrs,
    )
    return StandIn(class_name, src, **state)


def reference_layout(G: Generator, src: str, easydict, channels: int = 1, torgb=None, architecture="skip", c_dim=0):
    """Our G's weights in the reference's module tree. `torgb`: {block index: (weight (3, C, 1, 1), bias (3,))}."""
    sd = G.state_dict()

    def fc(prefix, activation="linear", lr=1.0):
        return _module(
            "FullyConnectedLayer",
            src,
            [("weight", sd[f"{prefix}.weight"]), ("bias", sd[f"{prefix}.bias"])],
            activation=activation,
            weight_gain=np.float64(lr / np.sqrt(sd[f"{prefix}.weight"].shape[1])),
            bias_gain=lr,
        )

    fcs = [(f"fc{i}", fc(f"mapping.layers.{i}", "lrelu", 0.01)) for i in range(len(G.mapping.layers))]
    mapping = _module(
        "MappingNetwork",
        src,
        buffers=[("w_avg", sd["mapping.w_avg"])],
        modules=fcs,
        num_layers=len(fcs),
        z_dim=G.z_dim,
        c_dim=c_dim,
        w_dim=G.w_dim,
        num_ws=G.num_ws,
        w_avg_beta=0.995,
    )
    blocks = []
    for k, res in enumerate(G.synthesis.block_resolutions):
        p = f"synthesis.blocks.{k}"
        layers = []
        for j in range(len(G.synthesis.blocks[k].convs)):
            q = f"{p}.convs.{j}"
            layer = _module(
                "SynthesisLayer",
                src,
                [(n, sd[f"{q}.{n}"]) for n in ("weight", "noise_strength", "bias")],
                [("resample_filter", FILTER), ("noise_const", sd[f"{q}.noise_const"])],
                [("affine", fc(f"{q}.affine"))],
                resolution=res,
                up=1 + (j == 0 and res > 4),
                use_noise=True,
                activation="lrelu",
                conv_clamp=None,
                padding=1,
            )
            layers.append((f"conv{j + (res == 4)}", layer))
        w, b = torgb[k] if torgb else (sd[f"{p}.torgb.weight"], sd[f"{p}.torgb.bias"])
        layers.append(
            (
                "torgb",
                _module(
                    "ToRGBLayer",
                    src,
                    [("weight", w), ("bias", b)],
                    modules=[("affine", fc(f"{p}.torgb.affine"))],
                    conv_clamp=None,
                ),
            )
        )
        const = [("const", sd[f"{p}.const"])] if res == 4 else []
        blocks.append(
            (
                f"b{res}",
                _module(
                    "SynthesisBlock",
                    src,
                    const,
                    [("resample_filter", FILTER)],
                    layers,
                    resolution=res,
                    architecture=architecture,
                    use_fp16=res >= 8,
                    in_channels=0 if res == 4 else 16,
                ),
            )
        )
    synthesis = _module(
        "SynthesisNetwork",
        src,
        modules=blocks,
        block_resolutions=G.synthesis.block_resolutions,
        _init_kwargs=easydict(channel_base=KW["channel_base"], channel_max=KW["channel_max"], num_fp16_res=2),
    )
    return _module(
        "Generator",
        src,
        modules=[("synthesis", synthesis), ("mapping", mapping)],
        z_dim=G.z_dim,
        c_dim=c_dim,
        w_dim=G.w_dim,
        img_resolution=G.img_resolution,
        img_channels=channels,
        num_ws=G.num_ws,
    )


def _random_generator(seed: int) -> Generator:
    torch.manual_seed(seed)
    G = Generator(**KW).eval()
    with torch.no_grad():
        for name, t in G.state_dict().items():
            if name.endswith(("bias", "noise_strength", "w_avg")):
                t.copy_(torch.randn_like(t) * 0.3)
    return G


def _write(tmp_path, name, obj, protocol=4):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def _source_with_side_effect(path) -> str:
    """Module source that, if ever executed (as the reference's loader does), creates `path`."""
    return f"open({str(path)!r}, 'w').write('the embedded source ran')\nclass Generator:\n    pass\n"


@pytest.mark.parametrize("protocol", [3, 4])  # 3: what the reference's Python 3.7 wrote (sets as calls)
def test_import_maps_names_keeps_w_avg_and_never_runs_the_source(tmp_path, reference_modules, one_thread, protocol):
    G0 = _random_generator(0)
    side = tmp_path / "ran.txt"
    src = _source_with_side_effect(side)
    exec(compile(src, "<check>", "exec"), {})  # the side-effect file does detect an execution...
    assert side.exists()
    side.unlink()
    data = dict(
        G_ema=reference_layout(G0, src, reference_modules),
        G=reference_layout(G0, src, reference_modules),
        training_set_kwargs=dict(path="ct.zip", resolution=16),
    )
    pkl = _write(tmp_path, "network-snapshot-000120.pkl", data, protocol)
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):
        sys.modules.pop(name)  # reading needs none of the reference's modules
    summary = import_generator(pkl, tmp_path / "stylegan2.pt")
    assert not side.exists()  # ...and importing never ran it
    G = load_generator(tmp_path / "stylegan2.pt")
    assert summary["resolution"] == 16 and G.checkpoint_info["kimg"] == 120.0
    assert G.checkpoint_info["config"]["imported"]["num_fp16_res"] == 2
    for name, t in G0.state_dict().items():
        torch.testing.assert_close(G.state_dict()[name], t, rtol=0, atol=0, msg=name)
    z = torch.randn(3, KW["z_dim"])
    with torch.no_grad():
        torch.testing.assert_close(G(z, truncation_psi=0.6), G0(z, truncation_psi=0.6))


def test_three_channels_become_their_mean(tmp_path, reference_modules, one_thread):
    G0 = _random_generator(1)
    torch.manual_seed(2)
    torgb = {
        k: (torch.randn(3, b.torgb.weight.shape[1], 1, 1), torch.randn(3)) for k, b in enumerate(G0.synthesis.blocks)
    }
    pkl = _write(tmp_path, "rgb.pkl", dict(G_ema=reference_layout(G0, "", reference_modules, channels=3, torgb=torgb)))
    import_generator(pkl, tmp_path / "stylegan2.pt")
    G = load_generator(tmp_path / "stylegan2.pt")
    ws = G0.mapping(torch.randn(2, KW["z_dim"]))
    per_channel = []
    for c in range(3):  # the reference's channel c: our 1-channel G0 with toRGB row c
        with torch.no_grad():
            for k, block in enumerate(G0.synthesis.blocks):
                block.torgb.weight.copy_(torgb[k][0][c : c + 1])
                block.torgb.bias.copy_(torgb[k][1][c : c + 1])
            per_channel.append(G0.synthesis(ws))
    with torch.no_grad():
        torch.testing.assert_close(G.synthesis(ws), torch.stack(per_channel).mean(dim=0), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(per_channel[0], per_channel[1], atol=1e-3)  # the channels do differ


def test_a_pickle_that_would_run_a_command_is_refused(tmp_path):
    side = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {side}",))

    pkl = _write(tmp_path, "evil.pkl", {"G_ema": Exploit()})
    with pytest.raises(LabelFactoryError, match=r"refers to (posix|os)\.system.*refused") as e:
        load_reference_pickle(pkl)
    assert e.value.status == 400 and not side.exists()


@pytest.mark.parametrize(
    ("option", "kwargs"), [("architecture='resnet'", dict(architecture="resnet")), ("c_dim=10", dict(c_dim=10))]
)
def test_options_we_lack_are_refused_by_name(tmp_path, reference_modules, option, kwargs):
    pkl = _write(tmp_path, "x.pkl", dict(G_ema=reference_layout(_random_generator(0), "", reference_modules, **kwargs)))
    with pytest.raises(LabelFactoryError, match=rf"uses .*{option}") as e:
        import_generator(pkl, tmp_path / "stylegan2.pt")
    assert e.value.status == 400 and not (tmp_path / "stylegan2.pt").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a pickle at all", "not a readable network pickle"),
        (pickle.dumps({"G_ema": 1})[:-5], "not a readable network pickle"),  # truncated
        (pickle.dumps({"D": 1}), r"holds no G_ema \(found \['D'\]\)"),
        (pickle.dumps({"G_ema": [1, 2]}), "not a stylegan2-ada-pytorch Generator"),
    ],
)
def test_cli_exit_code_and_message_on_a_bad_file(tmp_path, capsys, content, message):
    (tmp_path / "bad.pkl").write_bytes(content)
    assert main(["import-stylegan2", str(tmp_path / "bad.pkl"), "--out", str(tmp_path / "g.pt")]) == 2
    err = capsys.readouterr().err  # other modules may log while the CLI imports them: look for our one line
    lines = [line for line in err.splitlines() if line.startswith("labelfactory import-stylegan2: bad.pkl")]
    assert len(lines) == 1 and re.search(message, lines[0]) and "Traceback" not in err
    assert not (tmp_path / "g.pt").exists()
