"""Read a stylegan2-ada-pytorch network pickle as data: tensors and plain state, never its embedded code.

The reference pickles its networks with `torch_utils.persistence`: each module is stored as a call
of `_reconstruct_persistent_obj(meta)`, where `meta` holds the source of the module's Python file,
the class name and the instance `__dict__` (`_parameters`, `_buffers`, `_modules`, plain
attributes). Its own loader `exec`s that source, so loading such a pickle with `pickle.load` runs
whatever code it carries. Here a restricted `pickle.Unpickler` admits only what rebuilds tensors,
storages (through torch's `weights_only` loader), numpy scalars and plain containers, and turns
each persistent object into a `Record` (class name + state): the source is a string never run.
Hand-written because torch's `weights_only` unpickler reads `torch.save` files, not these pickles.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labelfactory.errors import LabelFactoryError


@dataclass
class Record:
    """A persistent module of the reference as data: `class_name`, its `__dict__` as `state`."""

    class_name: str
    state: dict[str, Any] = field(repr=False)

    @property
    def modules(self) -> dict[str, Record]:
        return dict(self.state.get("_modules") or {})

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Every parameter and buffer below this record, by dotted name (as `state_dict()` names them)."""
        out = {}
        for group in ("_parameters", "_buffers"):
            for name, value in (self.state.get(group) or {}).items():
                if value is not None:
                    out[prefix + name] = value
        for name, sub in self.modules.items():
            if isinstance(sub, Record):
                out.update(sub.tensors(f"{prefix}{name}."))
        return out

    def attr(self, name: str, default: Any = None) -> Any:
        return self.state.get(name, default)


class _EasyDict(dict):
    """Stands in for `dnnlib.util.EasyDict` (a dict with attribute access): only the items matter."""


def _persistent_record(meta: Any) -> Record:
    """Replaces `torch_utils.persistence._reconstruct_persistent_obj`: keeps the state, drops the source unrun."""
    if not (
        isinstance(meta, dict)
        and meta.get("type") == "class"
        and isinstance(meta.get("class_name"), str)
        and isinstance(meta.get("state"), dict)
    ):
        raise LabelFactoryError(
            "a persistent object of the pickle is not a class with plain state: refused", status=400
        )
    return Record(meta["class_name"], dict(meta["state"]))


def _storage_from_bytes(data: Any):
    """Replaces `torch.storage._load_from_bytes` (which calls torch.load with weights_only=False)."""
    if not isinstance(data, bytes):
        raise LabelFactoryError("a tensor storage of the pickle is not bytes: refused", status=400)
    storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise LabelFactoryError("a tensor storage of the pickle holds something else: refused", status=400)
    return storage


def _tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> torch.Tensor:
    """Replaces `torch._utils._rebuild_tensor_v2`; hooks and metadata (tensor-subclass state) are dropped."""
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise LabelFactoryError("a tensor of the pickle is not built on a storage: refused", status=400)
    return torch._utils._rebuild_tensor(storage, int(offset), tuple(size), tuple(stride))


def _parameter(data, requires_grad=False, hooks=None, state=None) -> torch.Tensor:
    """Replaces `torch._utils._rebuild_parameter(_with_state)`: the plain tensor (we only read values)."""
    if not isinstance(data, torch.Tensor):
        raise LabelFactoryError("a parameter of the pickle is not a tensor: refused", status=400)
    return data


def _dtype(spec, align=False, copy=False) -> np.dtype:
    """Replaces `numpy.dtype` for numeric scalars (the reference stores gains as numpy floats)."""
    dtype = np.dtype(spec) if isinstance(spec, str) else None
    if dtype is None or dtype.kind not in "biuf":
        raise LabelFactoryError(f"numpy dtype {spec!r} in the pickle is not numeric: refused", status=400)
    return dtype


def _scalar(dtype, data) -> Any:
    """Replaces `numpy.core.multiarray.scalar`: a numeric numpy scalar from its bytes."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes):
        raise LabelFactoryError("a numpy scalar of the pickle is not numeric: refused", status=400)
    return np.frombuffer(data, dtype=dtype, count=1)[0]


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,  # pickle protocols < 4 store sets as a call of set
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
}


class _DataOnlyUnpickler(pickle.Unpickler):
    """`find_class` answers from `_ALLOWED` only; anything else (a function, a class, code) is refused."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            hint = ""
            if module.startswith("dnnlib.tflib"):
                hint = " (a TensorFlow StyleGAN pickle: convert it with the reference's legacy.py first)"
            raise LabelFactoryError(
                f"the pickle refers to {module}.{name}, which is not tensor data or plain state: refused"
                f" without running it{hint}",
                status=400,
            ) from None

    def persistent_load(self, pid):
        raise LabelFactoryError(
            "the pickle holds external references (a torch.save file?): not a network pickle", status=400
        )


def load_reference_pickle(path: str | os.PathLike) -> Any:
    """The pickle's top-level object with every persistent module as a `Record`; nothing in it is executed.

    Raises LabelFactoryError(400) for a missing or unreadable file, or one that refers to anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelFactoryError(f"no network pickle at {path}", status=400)
    try:
        with path.open("rb") as f:
            return _DataOnlyUnpickler(f).load()
    except LabelFactoryError as e:
        raise LabelFactoryError(f"{path.name}: {e}", status=e.status) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        RuntimeError,
        MemoryError,
        UnicodeDecodeError,
    ) as e:
        raise LabelFactoryError(
            f"{path.name} is not a readable network pickle ({type(e).__name__})", status=400
        ) from None
