"""One training per models folder, across server restarts: a lock file holding the trainer's PID.

A trainer takes `<model_dir>/training.lock` for as long as it trains and removes it when done. The
lock is created exclusively and whole (a hard link of a written temp file) and holds JSON: pid, the
process's start time as /proc reports it, model, time. A server killed mid-training leaves its
trainer running (MONAI Label starts trainings as subprocesses); the restarted server reads the lock
and refuses a second training (429) while that PID lives. A lock whose process is gone (killed,
crashed, or its PID reused by another process) is stale: the next check removes it, with a log line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from labelfactory.errors import LabelFactoryError
from labelfactory.jsonio import temp_beside

logger = logging.getLogger(__name__)
LOCK_FILE = "training.lock"


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces), None where unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), None where unreadable."""
    fields = _stat(pid)
    return fields[19] if fields else None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another account's process: it exists
        pass
    fields = _stat(pid)
    if fields and fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent: gone
        return False
    now = fields[19] if fields else None
    return started is None or now is None or now == started  # a PID reused by a later process is not the trainer


def holder(model_dir: str | os.PathLike) -> dict | None:
    """The live trainer holding `model_dir`'s lock ({pid, model, time}), or None; a stale lock is removed."""
    path = Path(model_dir) / LOCK_FILE
    try:
        lock = json.loads(path.read_text())
        pid = int(lock["pid"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError):
        lock, pid = {}, 0
    if pid > 0 and pid != os.getpid() and _alive(pid, lock.get("start")):
        return lock
    if pid != os.getpid():
        logger.warning(f"removed a stale training lock {path} ({lock or 'unreadable'}): its process is gone")
        path.unlink(missing_ok=True)
    return None


def busy_message(lock: dict) -> str:
    return (
        f"a training of {lock.get('model', '?')} (PID {lock.get('pid')}, started {lock.get('time', '?')}) is still "
        "running on this models folder, possibly started by an earlier server: wait for it to finish, or stop it "
        f"(kill {lock.get('pid')})"
    )


@contextlib.contextmanager
def training_lock(model_dir: str | os.PathLike, model: str) -> Iterator[Path]:
    """Hold `model_dir`'s training lock while training `model`; LabelFactoryError 429 while another trainer holds it."""
    path = Path(model_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "pid": os.getpid(),
        "start": _start_time(os.getpid()),
        "model": model,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    fd, tmp = temp_beside(path)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    try:
        for _ in range(2):  # a second try after removing a stale lock
            try:
                os.link(tmp, path)  # created whole with its content, or not at all when one exists
                break
            except FileExistsError:
                live = holder(model_dir)
                if live is not None:
                    raise LabelFactoryError(busy_message(live), status=429) from None
        else:
            raise LabelFactoryError(f"could not take the training lock {path}: another trainer took it first", 429)
    finally:
        Path(tmp).unlink(missing_ok=True)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            if int(json.loads(path.read_text())["pid"]) == os.getpid():
                path.unlink()
