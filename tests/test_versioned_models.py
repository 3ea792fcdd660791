"""Versioned model files: atomic publish with provenance, reload on change, a corrupt file never served."""

from __future__ import annotations

import os
import time

import pytest
import torch

from labelfactory.checkpoints import load_checkpoint, previous_path, save_checkpoint
from labelfactory.errors import LabelFactoryError
from labelfactory.tasks.models import ModelCache


def _publish(path, value):
    return save_checkpoint(
        {"kind": "toy", "config": {"v": value}, "data": {"n": 1}, "state": torch.full((3,), float(value))}, path
    )


def _loader(path):
    return float(load_checkpoint(path, "toy")["state"][0])


def _bump(path):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))


def test_checkpoint_records_config_data_and_code_version(tmp_path):
    p = _publish(tmp_path / "m.pt", 1)
    ck = load_checkpoint(p, "toy")
    assert ck["config"] == {"v": 1} and ck["data"] == {"n": 1}
    assert ck["provenance"]["package"] and ck["provenance"]["time"]
    with pytest.raises(LabelFactoryError, match="holds a 'toy' model"):
        load_checkpoint(p, "stylegan2")
    assert not list(tmp_path.glob("*.tmp")), "no temp file may be left behind"


def test_cache_reloads_on_change_and_keeps_serving_through_a_corrupt_file(tmp_path):
    path = tmp_path / "m.pt"
    cache = ModelCache(path, _loader, "train toy first")
    with pytest.raises(LabelFactoryError, match="train toy first") as e:
        cache.get()
    assert e.value.status == 409
    _publish(path, 1)
    assert cache.get() == 1.0
    time.sleep(0.01)
    _publish(path, 2)
    _bump(path)
    assert cache.get() == 2.0
    assert _loader(previous_path(path)) == 1.0  # the replaced version is kept
    path.write_bytes(path.read_bytes()[:100])  # damaged on disk
    _bump(path)
    assert cache.get() == 2.0, "a corrupt file must never replace the model being served"
    # a fresh server (new cache) falls back to the kept previous version
    assert ModelCache(path, _loader, "train toy first").get() == 1.0
    previous_path(path).unlink()
    with pytest.raises(LabelFactoryError, match="corrupt"):
        ModelCache(path, _loader, "train toy first").get()
