"""The server's own upload temp files: the only paths besides datastore ids and sessions an infer may read.

`tasks.server` streams each upload into `<temp folder>/lf-upload-*` (`new_upload`) and forgets it when
the request ends (`release`); the app's infer takes a path only while it is such a live upload of this
process, so neither `image=<temp folder>/<file>` nor a path in `params` reaches a task.
"""

from __future__ import annotations

import os
import tempfile
import threading

UPLOAD_PREFIX = "lf-upload-"
_live: set[str] = set()
_lock = threading.Lock()


def new_upload(suffix: str) -> tuple[int, str]:
    """(fd, path) of a new upload temp file in the system temp folder, registered as live until `release`."""
    fd, path = tempfile.mkstemp(prefix=UPLOAD_PREFIX, suffix=suffix)
    with _lock:
        _live.add(os.path.realpath(path))
    return fd, path


def release(path: str) -> None:
    with _lock:
        _live.discard(os.path.realpath(path))


def is_live_upload(path: object) -> bool:
    """Whether `path` is an upload this server process made and still holds (a regular file, not a link)."""
    if not isinstance(path, str) or not os.path.isabs(path) or os.path.islink(path):
        return False
    real = os.path.realpath(path)
    with _lock:
        live = real in _live
    return (
        live
        and os.path.basename(real).startswith(UPLOAD_PREFIX)
        and os.path.dirname(real) == os.path.realpath(tempfile.gettempdir())
        and os.path.isfile(real)
    )
