"""What one input may cost: the server's and the readers' limits, each an environment setting with its default.

Read at each use (a test or an admin changes them without a restart of the library). A value that is not a whole
number at least the limit's minimum (1 unless it says) leaves the default. Every refusal names the limit and its
setting, so whoever meets it knows what to change. Defaults are sized for CT: a 512 x 512 x 2000 volume passes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    """One limit: its environment setting, default and unit (in messages)."""

    setting: str  # the environment variable
    default: int
    unit: str  # as messages write it: "voxels", "MB", ...
    minimum: int = 1  # a smaller value leaves the default

    def value(self) -> int:
        text = os.environ.get(self.setting, "").strip()
        return int(text) if text.isdigit() and int(text) >= self.minimum else self.default

    def named(self) -> str:
        """`4096 MB, LABELFACTORY_MAX_UPLOAD_MB`: for messages."""
        return f"{self.value()} {self.unit}, {self.setting}"


# images: what a header may declare, checked before a voxel is read (labelfactory.io.headers)
MAX_VOXELS = Limit("LABELFACTORY_MAX_VOXELS", 512 * 512 * 2048, "voxels")
MAX_SLICES = Limit("LABELFACTORY_MAX_SLICES", 4096, "voxels along one axis")
# request bodies and JSON form fields (labelfactory.tasks.server)
MAX_UPLOAD_MB = Limit("LABELFACTORY_MAX_UPLOAD_MB", 4096, "MB")
MAX_JSON_KB = Limit("LABELFACTORY_MAX_JSON_KB", 1024, "KB")
MAX_JSON_DEPTH = Limit("LABELFACTORY_MAX_JSON_DEPTH", 32, "levels of nesting")
# a session archive (PUT /session/?uncompress=true)
MAX_ARCHIVE_MB = Limit("LABELFACTORY_MAX_ARCHIVE_MB", 2048, "MB unpacked")
MAX_ARCHIVE_FILES = Limit("LABELFACTORY_MAX_ARCHIVE_FILES", 10000, "files")
# connections: one that sends no request for this long is closed (labelfactory.tasks.server)
IDLE_TIMEOUT_S = Limit("LABELFACTORY_IDLE_TIMEOUT_S", 60, "s")
# work: infer worker threads, and the requests that may wait for them per queue (more: 429)
INFER_WORKERS = Limit("LABELFACTORY_INFER_WORKERS", 2, "workers")
INFER_QUEUE = Limit("LABELFACTORY_INFER_QUEUE", 8, "waiting", minimum=0)
