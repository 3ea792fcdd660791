"""Versioned model files: written atomically with their config, data, code version and SHA-256; loaded as data only.

A checkpoint is a torch file holding a dict with at least `kind` (e.g. "stylegan2"), `config`,
`data` (what it was trained on) and `provenance` (package version, git commit, time, host).
Writing goes to a temp file in the same folder, fsync, then `os.replace`: a reader sees the old
file or the new one, never half of one. Beside it, `<name>.sha256` (sha256sum's format, written
the same way) records the file's SHA-256; a file whose bytes no longer match is refused like a
truncated one. The version being replaced is kept as `<name>.previous<suffix>` (hard links, also
atomic) with its hash, so a file damaged later on disk still has a good predecessor; a current file
that does not match its hash (a publish killed between its rename and its hash write) is never
kept as the previous one, so even two such crashes in a row leave the previous version loadable. Files are
loaded with `torch.load(weights_only=True)`: tensors and plain containers only, so a model file
can never run code in the server; one that needs more is refused (409).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from labelfactory.errors import LabelFactoryError, ModelMissing
from labelfactory.jsonio import TMP_SUFFIX, temp_beside, write_atomic

logger = logging.getLogger(__name__)
_REPO = Path(__file__).resolve().parents[2]


@functools.cache
def code_version() -> dict[str, str]:
    """Package version and git commit (+dirty) of the checkout, "unknown" outside one; read once per process."""
    from labelfactory import __version__

    info = {"package": __version__, "git": "unknown"}
    if not (_REPO / ".git").exists():
        return info
    try:
        rev = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            info["git"] = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def hash_path(path: str | os.PathLike) -> Path:
    """Where the SHA-256 of `path` is kept: x.pt -> x.pt.sha256."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def previous_path(path: str | os.PathLike) -> Path:
    """Where the version before the current one of `path` is kept: x.pt -> x.previous.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def copy_model(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy model file `src` and its SHA-256 to `dst`, each atomically and the hash first, so that `dst` is never
    read unchecked (a stale hash of dst's old version goes when src has none). Returns dst."""
    src, dst = Path(src), Path(dst)
    for a, b in ((hash_path(src), hash_path(dst)), (src, dst)):
        if not a.is_file():
            b.unlink(missing_ok=True)
            continue
        with open(a, "rb") as f:
            write_atomic(b, lambda out, f=f: shutil.copyfileobj(f, out, 1 << 20))
    return dst


def publish_model(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Publish the checked model file `src` as `dst` the way save_checkpoint does: the current `dst` kept as
    the previous version (when it matches its hash), then the file, then its new hash. Returns dst."""
    src, dst = Path(src), Path(dst)
    digest = sha256_of(src)
    keep_as_previous(dst)
    with open(src, "rb") as f:
        write_atomic(dst, lambda out: shutil.copyfileobj(f, out, 1 << 20))
    write_atomic(hash_path(dst), lambda out: out.write(f"{digest}  {dst.name}\n".encode()))
    return dst


def _link_atomic(src: Path, dst: Path) -> None:
    """Hard-link `src` as `dst`, replacing dst atomically (no-op when src is missing)."""
    if not src.exists():
        return
    link = dst.with_name(dst.name + TMP_SUFFIX)
    link.unlink(missing_ok=True)
    os.link(src, link)
    os.replace(link, dst)


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Atomically write `payload` (must hold kind, config, data) with provenance, and its SHA-256. Returns the path."""
    for key in ("kind", "config", "data"):
        if key not in payload:
            raise ValueError(f"checkpoint payload lacks '{key}'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        **payload,
        "provenance": {**code_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname()},
    }
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_of(tmp)
        keep_as_previous(path)
        # model first, then its hash: in between (or after a crash there) the pair mismatches and the
        # file is refused, falling back to the previous version (kept above), never served unchecked
        os.replace(tmp, path)
        write_atomic(hash_path(path), lambda f: f.write(f"{digest}  {path.name}\n".encode()))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _loads_checked(path: Path) -> bool:
    """Whether `path` exists and matches its recorded SHA-256 (or records none: a hand-copied file)."""
    if not path.is_file():
        return False
    recorded = hash_path(path)
    if not recorded.is_file():
        return True
    fields = recorded.read_text().split()
    return bool(fields) and sha256_of(path) == fields[0]


def keep_as_previous(path: str | os.PathLike) -> None:
    """Keep the current `path` (and its hash) as `<name>.previous<suffix>`, only when it matches its hash.

    A current file that does not match (a publish interrupted between its rename and its hash write)
    never replaces a good previous version: so at every instant of every publish, crashes included,
    either the current file or the previous one loads checked. Each step is atomic: the previous
    file's stale hash goes first (the previous file then loads unchecked, never refused), then the
    file, then its hash."""
    path = Path(path)
    if not _loads_checked(path):
        if path.exists():
            logger.warning(f"{path.name} does not match its recorded SHA-256: kept out of {previous_path(path).name}")
        return
    prev = previous_path(path)
    hash_path(prev).unlink(missing_ok=True)
    _link_atomic(path, prev)
    _link_atomic(hash_path(path), hash_path(prev))


def verify_hash(path: Path) -> None:
    """LabelFactoryError (409) when `path` has a recorded SHA-256 that its bytes do not match."""
    recorded = hash_path(path)
    if not recorded.exists():
        logger.warning(f"{path.name} has no recorded SHA-256 ({recorded.name}); loading it unchecked")
        return
    fields = recorded.read_text().split()
    expected = fields[0] if fields else ""
    if sha256_of(path) != expected:
        raise LabelFactoryError(
            f"{path.name} does not match its recorded SHA-256 ({recorded.name}): corrupt or changed since "
            "it was published; retrain or restore it",
            status=409,
        )


def load_checkpoint(
    path: str | os.PathLike, kind: str | tuple[str, ...] | None = None, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load and validate a checkpoint; 409 if missing, corrupt, changed, not plain data or of another kind.

    `kind`: the kind expected, or a tuple of accepted kinds (the first is the current name)."""
    kinds = (kind,) if isinstance(kind, str) else kind
    kind = kinds[0] if kinds else None
    path = Path(path)
    if not path.exists():
        raise ModelMissing(
            f"no model file at {path}" + (f": train {kind} first" if kind else ""), model=kind or path.stem
        )
    verify_hash(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        unsafe = _unsafe_globals(path)
        if not unsafe:
            raise LabelFactoryError(
                f"{path.name} is corrupt or truncated (not a readable pickle); retrain or restore it", status=409
            ) from None
        raise LabelFactoryError(
            f"{path.name} holds objects other than tensors and plain data ({', '.join(unsafe[:5])}), which could "
            "run code when loaded: refused, never executed; retrain it with labelfactory",
            status=409,
        ) from None
    except Exception as e:  # torch raises many types for truncated or garbled files
        raise LabelFactoryError(
            f"{path.name} is corrupt or truncated ({type(e).__name__}); retrain or restore it", status=409
        ) from None
    if not isinstance(payload, dict) or "kind" not in payload:
        raise LabelFactoryError(f"{path.name} is not a labelfactory checkpoint", status=409)
    if kinds and payload["kind"] not in kinds:
        raise LabelFactoryError(f"{path.name} holds a '{payload['kind']}' model, expected '{kind}'", status=409)
    return payload


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a torch file would import beyond weights_only's allow-list (read from its pickle, nothing run)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a torch file at all: nothing to report
        return []


def remove_leftover_temp_files(folder: str | os.PathLike) -> list[str]:
    """Temp files of checkpoint writes a crash interrupted; call only where no training can be writing."""
    folder = Path(folder)
    removed = [str(p) for p in sorted(folder.glob(f"*{TMP_SUFFIX}")) if p.is_file()] if folder.is_dir() else []
    for p in removed:
        Path(p).unlink(missing_ok=True)
    if removed:
        logger.warning(
            f"removed {len(removed)} temp files left by interrupted model writes in {folder}: {', '.join(removed[:5])}"
        )
    return removed
