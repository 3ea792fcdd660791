"""Files written whole or not at all, and the one way the project writes JSON.

`write_atomic` writes through a temp file in the same folder (`.<name>.<random>.tmp`), fsyncs and
renames it into place: a reader sees the old file or the new one, never half of one, and an
interrupted write leaves only a temp file that cleanups can recognise by its suffix.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"
_UMASK = os.umask(0o022)  # read once (umask can only be read by setting it), at import, single-threaded
os.umask(_UMASK)


def temp_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temp file in `path`'s folder, named for `path`, with the mode `open()` would give
    (0666 less the umask), not mkstemp's private 0600: models and labels are read by other accounts too."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)
    return fd, tmp


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """`write(binary file)` into a temp file beside `path` (parents created), fsync, rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(obj: Any, path: str | os.PathLike, indent: int = 1) -> Path:
    """Write `obj` as JSON (NaN allowed, as Python's json writes it) to `path` atomically. Returns the path."""
    data = json.dumps(obj, indent=indent, allow_nan=True).encode()
    return write_atomic(path, lambda f: f.write(data))


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON in `path`, or `default` when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else default
