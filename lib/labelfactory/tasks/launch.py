"""Server-side multi-GPU training: a trainer task's request options `multi_gpu` and `gpus` run its training as a
`torchrun` subprocess of the matching `labelfactory train-*` command, one process per device.

`gpus`: "all" or GPU indices "0,1" on a GPU server (CUDA_VISIBLE_DEVICES is set to them, NCCL); on a CPU server a
number N of gloo CPU processes. The command writes its model into a staging folder inside the models folder; only
when every rank has finished is the model published (checked against its hash, the current one kept as previous),
so a failed rank publishes nothing and the previous model keeps serving. The task holds the training lock the whole
time (429 for a second request) and writes its stats from the command's summary, as for a training in process.
Not MONAI Label's BasicTrainTask multi_gpu path (torch.multiprocessing.spawn of its own handlers): ours runs the
same commands an admin runs by hand with torchrun, so one code path trains on one machine or several.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import labelfactory
from labelfactory.errors import LabelFactoryError
from labelfactory.options import cast

logger = logging.getLogger(__name__)
OPTIONS = {"multi_gpu": False, "gpus": "all"}  # the two options every trainer's table shows
_FAILED_RANK = re.compile(r"^\s*rank\s*:\s*(\d+).*?^\s*exitcode\s*:\s*(-?\d+)", re.S | re.M)  # torchrun's table
_USER_ERROR = re.compile(r"^labelfactory [\w-]+: (.+)$")  # what a command prints for a LabelFactoryError


@dataclass(frozen=True)
class Launch:
    """How to start a training: `processes` (N) on `device` ("cuda" or "cpu"), with CUDA_VISIBLE_DEVICES `visible`
    (None: unchanged; "": no GPU at all, so every process stays on the CPU with gloo)."""

    processes: int
    device: str
    visible: str | None


def parse_launch(request: dict[str, Any], device: torch.device) -> Launch | None:
    """The launch `request` asks for with `multi_gpu`, None for an in-process training (no multi_gpu, or one device).
    400 naming the option for a bad `gpus`: unknown or repeated GPU indices, a non-number on a CPU server."""
    if not cast(bool, "multi_gpu", request.get("multi_gpu", False)):
        return None
    gpus = cast(str, "gpus", request.get("gpus") or "all").strip().replace(" ", "")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if gpus == "all":
            ids, visible = list(range(count)), None
        else:
            try:
                ids = [int(g) for g in gpus.split(",")]
            except ValueError:
                raise LabelFactoryError(f'option gpus={gpus!r}: expected "all" or GPU indices such as "0,1"') from None
            if len(set(ids)) != len(ids) or not all(0 <= i < count for i in ids):
                raise LabelFactoryError(f"option gpus={gpus!r}: this server has GPUs 0..{count - 1}, each named once")
            visible = ",".join(map(str, ids))
        return Launch(len(ids), "cuda", visible) if len(ids) > 1 else None
    cpus = os.cpu_count() or 1
    if not gpus.isdigit() or not 1 <= int(gpus) <= cpus:
        raise LabelFactoryError(
            f"option gpus={gpus!r}: this server trains on the CPU; give the number of CPU processes (1..{cpus})"
        )
    return Launch(int(gpus), "cpu", "") if int(gpus) > 1 else None


def torchrun_command(argv: list[str], launch: Launch) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m labelfactory.cli <argv>`."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1"]
    return [*torchrun, "--nproc-per-node", str(launch.processes), "-m", "labelfactory.cli", *argv]


def run_torchrun(argv: list[str], launch: Launch, what: str) -> None:
    """Run `labelfactory <argv>` under torchrun as `launch` says, its output streamed to this log; a
    LabelFactoryError (500) naming the failed rank and its error when any rank fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_library_root(), os.environ.get("PYTHONPATH")]))}
    if launch.visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = launch.visible
    cmd = torchrun_command([*argv, "--device", launch.device], launch)
    logger.info(f"{what}: {' '.join(cmd)}")
    tail: collections.deque[str] = collections.deque(maxlen=200)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            logger.info(f"[{what}] {line.rstrip()}")
            tail.append(line.rstrip())
        code = proc.wait()
    finally:  # the server thread interrupted: the ranks go with it
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code:
        raise LabelFactoryError(failure_message(what, launch, code, list(tail)), status=500)


def failure_message(what: str, launch: Launch, code: int, lines: list[str]) -> str:
    """One line for the user: which rank failed with which exit code, and its own error when it printed one."""
    text = "\n".join(lines)
    failed = _FAILED_RANK.search(text.split("Root Cause")[-1])  # the first rank to fail, not those stopped after it
    who = f"rank {failed.group(1)} exited with code {failed.group(2)}" if failed else f"torchrun exited with {code}"
    errors = [m.group(1) for m in map(_USER_ERROR.match, lines) if m]
    cause = f": {errors[-1]}" if errors else " (see the server log)"
    return (
        f"{what} on {launch.processes} {launch.device} processes failed, {who}{cause}; "
        "no model was published, the previous one is kept"
    )


@contextlib.contextmanager
def staging_folder(model_dir: Path, name: str) -> Iterator[Path]:
    """A fresh folder inside `model_dir` (hidden: no infer looks there), removed afterwards whatever happened."""
    model_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{name}-launch-", dir=model_dir))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _library_root() -> str:
    """The folder holding the `labelfactory` package, so the ranks import the server's own copy."""
    return str(Path(labelfactory.__file__).resolve().parents[1])
