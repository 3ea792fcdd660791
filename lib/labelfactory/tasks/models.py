"""Model files as infers see them: loaded once, reloaded when the file changes, never half-served.

A trainer publishes `<model_dir>/<name>.pt` atomically with its `.sha256` (labelfactory.checkpoints).
An infer asks `ModelCache.get()`: the first call loads the file, later calls reload only when the
file or its recorded hash changed (mtime, size). A new file that fails to load (corrupt, truncated,
hash mismatch, not plain data, wrong kind) is logged and the previous version keeps serving. After
a restart, a damaged file falls back to the kept previous version (`x.previous.pt`, see
checkpoints.save_checkpoint); with neither, a 409 names what to train.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from labelfactory.checkpoints import hash_path, previous_path
from labelfactory.errors import LabelFactoryError, ModelMissing

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ModelCache(Generic[T]):
    """`loader(path) -> model` behind a stamp check (mtime and size of the file and of its hash); thread-safe."""

    def __init__(self, path: str | os.PathLike, loader: Callable[[Path], T], train_hint: str):
        self.path, self.loader, self.train_hint = Path(path), loader, train_hint
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._failed: tuple | None = None
        self._model: T | None = None

    def get(self) -> T:
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                if self._model is not None:
                    return self._model
                msg = f"no model at {self.path.name} yet: {self.train_hint}"
                raise ModelMissing(msg, model=self.path.stem) from None
            stamp = (st.st_mtime_ns, st.st_size, _stamp_of(hash_path(self.path)))
            if stamp != self._stamp and stamp != self._failed:
                try:
                    self._model, self._stamp, self._failed = self.loader(self.path), stamp, None
                    logger.info(f"loaded {self.path}")
                except LabelFactoryError as e:
                    self._failed = stamp
                    if self._model is None:
                        self._model = self._load_previous(e)
                    logger.error(f"{self.path.name} cannot be loaded ({e}); serving the previous version")
            if self._model is None:
                raise ModelMissing(f"{self.path.name} cannot be loaded: {self.train_hint}", model=self.path.stem)
            return self._model

    def _load_previous(self, error: LabelFactoryError) -> T:
        prev = previous_path(self.path)
        if not prev.exists():
            raise error
        try:
            return self.loader(prev)
        except LabelFactoryError:
            raise error from None

    def info(self) -> dict[str, Any]:
        """What /info can show: whether a model is being served and from which file state."""
        return {"path": str(self.path), "loaded": self._model is not None, "exists": self.path.exists()}


def _stamp_of(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size
