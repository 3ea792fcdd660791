"""The library as a user installs it: a wheel in a fresh venv outside the checkout trains when given its paths.

No network and no reinstall of the dependencies: the wheel is built with this interpreter's
setuptools (no build isolation), and the fresh venv sees this environment's packages through a
.pth line (not processed recursively, so the checkout's editable install stays invisible).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**env, "OMP_NUM_THREADS": "1"}
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh venv holding only the labelfactory wheel (dependencies from this environment)."""
    pytest.importorskip("setuptools", reason="building the wheel without network needs setuptools here")
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"  # what the wheel is built from, copied so the build leaves nothing in the checkout
    shutil.copytree(REPO / "lib", src / "lib", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(REPO / name, src / name)
    build = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(root / "dist"),
        ],
        cwd=root,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (root / "dist").glob("labelfactory-*.whl")
    venv = root / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root).returncode == 0
    purelib = Path(
        _run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=root
        ).stdout.strip()
    )
    (purelib / "labelfactory_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        cwd=root,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return venv / "bin"


def test_wheel_imports_from_its_venv_and_trains_on_given_paths(installed, tmp_path, make_pairs):
    where = _run([str(installed / "python"), "-c", "import labelfactory; print(labelfactory.__file__)"], cwd=tmp_path)
    assert where.returncode == 0, where.stderr[-2000:]
    assert not Path(where.stdout.strip()).is_relative_to(REPO)  # the wheel's copy, not the checkout's

    synthetic = make_pairs(tmp_path / "synthetic", 4)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tiny = "--out seg.pt --network unet --size 32 --steps 2 --val-interval 2 --batch-size 2".split()
    cmd = [str(installed / "labelfactory"), "train-segmentation", "--synthetic", str(synthetic), *tiny]
    proc = _run(cmd, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{") :])
    assert report["steps"] == 2 and report["data"]["synthetic_pairs"] == 4
    assert (elsewhere / "seg.pt").is_file()


def test_checkout_defaults_fail_clearly_outside_the_checkout(installed, tmp_path):
    proc = _run([str(installed / "labelfactory"), "train-stylegan2", "--preset", "demo"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "--studies has a default only in a source checkout" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run([str(installed / "labelfactory"), "serve"], cwd=tmp_path)  # the app ships in the checkout only
    assert proc.returncode == 2 and "source checkout" in proc.stderr and "Traceback" not in proc.stderr
