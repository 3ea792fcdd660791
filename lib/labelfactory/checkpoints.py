"""Versioned model files: written atomically with their config, data and code version; validated on load.

A checkpoint is a torch file holding a dict with at least `kind` (e.g. "stylegan2"), `config`,
`data` (what it was trained on) and `provenance` (package version, git commit, time, host).
Writing goes to a temp file in the same folder, fsync, then `os.replace`: a reader sees the old
file or the new one, never half of one. The version being replaced is kept as
`<name>.previous<suffix>` (hard link, also atomic), so a file damaged later on disk still has a
good predecessor. A file that fails to load is reported, never served.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from labelfactory.errors import LabelFactoryError

_REPO = Path(__file__).resolve().parents[2]


def code_version() -> dict[str, str]:
    """Package version plus the git commit (and '+dirty') of the checkout, when there is one."""
    from labelfactory import __version__

    info = {"package": __version__}
    try:
        rev = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
            info["git"] = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Atomically write `payload` (must hold kind, config, data) with provenance added. Returns the path."""
    for key in ("kind", "config", "data"):
        if key not in payload:
            raise ValueError(f"checkpoint payload lacks '{key}'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "provenance": {**code_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname()}}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            keep = previous_path(path)
            link = keep.with_name(keep.name + ".tmp")
            link.unlink(missing_ok=True)
            os.link(path, link)
            os.replace(link, keep)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def previous_path(path: str | os.PathLike) -> Path:
    """Where the version before the current one of `path` is kept: x.pt -> x.previous.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def load_checkpoint(path: str | os.PathLike, kind: str | None = None, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint; LabelFactoryError if missing, corrupt or of another kind."""
    path = Path(path)
    if not path.exists():
        raise LabelFactoryError(f"no model file at {path}" + (f": train {kind} first" if kind else ""), status=409)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise LabelFactoryError(f"{path.name} is corrupt or truncated ({type(e).__name__}); retrain or restore it", status=409) from None
    if not isinstance(payload, dict) or "kind" not in payload:
        raise LabelFactoryError(f"{path.name} is not a labelfactory checkpoint", status=409)
    if kind is not None and payload["kind"] != kind:
        raise LabelFactoryError(f"{path.name} holds a '{payload['kind']}' model, expected '{kind}'", status=409)
    return payload
