"""Model files are data: never executed when loaded, checked against their recorded SHA-256, no temp left behind."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
import torch

from labelfactory import checkpoints
from labelfactory.checkpoints import (
    copy_model,
    hash_path,
    load_checkpoint,
    previous_path,
    remove_leftover_temp_files,
    save_checkpoint,
)
from labelfactory.errors import LabelFactoryError
from labelfactory.tasks.models import ModelCache


class _RunsCode:
    """Unpickling this calls `open(marker, "w")`: what a hostile model file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _publish(path, value):
    return save_checkpoint(
        {"kind": "toy", "config": {"v": value}, "data": {}, "state": torch.full((3,), float(value))}, path
    )


def _loader(path):
    return float(load_checkpoint(path, "toy")["state"][0])


def test_a_model_file_that_would_run_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"kind": "toy", "config": {}, "data": {}, "payload": _RunsCode(marker)}, tmp_path / "m.pt")
    with pytest.raises(LabelFactoryError, match="never executed") as e:
        load_checkpoint(tmp_path / "m.pt", "toy")
    assert e.value.status == 409
    assert not marker.exists(), "loading a model file must not run the code it carries"


def test_the_sha256_is_recorded_beside_each_model_and_a_changed_byte_is_refused(tmp_path):
    path = _publish(tmp_path / "m.pt", 1)
    digest, name = hash_path(path).read_text().split()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() and name == "m.pt"
    cache = ModelCache(path, _loader, "train toy first")
    assert cache.get() == 1.0
    _publish(path, 2)
    assert (
        hash_path(previous_path(path)).read_text().split()[0]
        == hashlib.sha256(previous_path(path).read_bytes()).hexdigest()
    )
    assert cache.get() == 2.0

    data = bytearray(path.read_bytes())  # four bytes changed inside, same size: loads fine without the hash
    data[len(data) // 2 : len(data) // 2 + 4] = bytes(4 - i for i in range(4))
    path.write_bytes(bytes(data))
    with pytest.raises(LabelFactoryError, match="SHA-256") as e:
        load_checkpoint(path, "toy")
    assert e.value.status == 409
    assert cache.get() == 2.0, "a damaged file never replaces the model being served"
    assert ModelCache(path, _loader, "train toy first").get() == 1.0, (
        "a fresh server falls back to the previous version"
    )
    assert not list(tmp_path.glob("*.tmp"))


def test_a_model_without_a_recorded_hash_still_loads(tmp_path):
    path = _publish(tmp_path / "m.pt", 3)
    hash_path(path).unlink()  # e.g. a file copied by hand from another machine
    assert _loader(path) == 3.0


def test_a_copied_model_keeps_its_hash_and_a_copy_cut_short_is_refused(tmp_path, monkeypatch):
    src = _publish(tmp_path / "a" / "m.pt", 4)
    dst = copy_model(src, tmp_path / "b" / "m.pt")
    assert dst.read_bytes() == src.read_bytes() and hash_path(dst).read_text() == hash_path(src).read_text()
    assert _loader(dst) == 4.0

    other = _publish(tmp_path / "c" / "m.pt", 5)
    hash_path(other).unlink()
    copy_model(other, dst)  # a source without a hash: dst's old hash would refuse the new bytes, so it goes
    assert not hash_path(dst).exists() and _loader(dst) == 5.0

    def cut_short(path, write):  # the machine dies before the model file itself lands
        if path.suffix == ".pt":
            raise OSError("disk gone")
        return real(path, write)

    real = checkpoints.write_atomic
    monkeypatch.setattr(checkpoints, "write_atomic", cut_short)
    with pytest.raises(OSError):
        copy_model(src, dst)
    with pytest.raises(LabelFactoryError, match="SHA-256"):  # src's hash sits beside dst's other bytes: refused
        load_checkpoint(dst, "toy")


def test_leftover_temp_files_are_removed(tmp_path):
    _publish(tmp_path / "m.pt", 1)
    left = [tmp_path / ".m.pt.abc123.tmp", tmp_path / "m.previous.pt.tmp"]
    for p in left:
        p.write_bytes(b"half a model")
    assert sorted(remove_leftover_temp_files(tmp_path)) == sorted(str(p) for p in left)
    assert not any(p.exists() for p in left) and (tmp_path / "m.pt").exists() and hash_path(tmp_path / "m.pt").exists()


def test_code_version_is_read_once_per_process_and_unknown_outside_a_checkout(tmp_path, monkeypatch):
    calls = []
    real_run = subprocess.run
    monkeypatch.setattr(checkpoints.subprocess, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k))
    checkpoints.code_version.cache_clear()
    for i in range(3):
        _publish(tmp_path / f"m{i}.pt", i)
    assert len(calls) <= 2, f"git ran {len(calls)} times for 3 saves"
    monkeypatch.setattr(checkpoints, "_REPO", tmp_path)
    checkpoints.code_version.cache_clear()
    try:
        assert checkpoints.code_version()["git"] == "unknown"
        assert load_checkpoint(_publish(tmp_path / "x.pt", 1), "toy")["provenance"]["git"] == "unknown"
    finally:
        checkpoints.code_version.cache_clear()


_KILLED_PUBLISH = """
import os, signal, sys
import torch
from labelfactory import checkpoints

real = checkpoints.write_atomic

def die_before_the_hash(path, write):  # the model file is renamed into place; its hash is not written yet
    if str(path).endswith("m.pt.sha256"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, write)

checkpoints.write_atomic = die_before_the_hash
value = float(sys.argv[2])
checkpoints.save_checkpoint({"kind": "toy", "config": {}, "data": {}, "state": torch.full((3,), value)}, sys.argv[1])
"""


def test_two_publishes_killed_between_rename_and_hash_still_leave_a_loadable_model(tmp_path):
    import os
    import signal
    import sys

    path = _publish(tmp_path / "m.pt", 1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for value in (2, 3):  # kill -9 at the same point twice in a row
        run = subprocess.run([sys.executable, "-c", _KILLED_PUBLISH, str(path), str(value)], env=env, timeout=120)
        assert run.returncode == -signal.SIGKILL
        assert float(torch.load(path, weights_only=True)["state"][0]) == value, "the rename happened"
        with pytest.raises(LabelFactoryError, match="SHA-256"):
            load_checkpoint(path, "toy")
        assert ModelCache(path, _loader, "train toy first").get() == 1.0, "the last checked version still loads"
    _publish(path, 4)  # the next complete publish: current checked, the good previous kept
    assert _loader(path) == 4.0 and _loader(previous_path(path)) == 1.0
    _publish(path, 5)
    assert _loader(path) == 5.0 and _loader(previous_path(path)) == 4.0
