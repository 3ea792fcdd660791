"""Shared fixtures: paths to the bundled sample data, temp copies of the datastore, a real server.

Also how the suite runs in parallel (`make test`: pytest-xdist, `--dist loadfile`, each module on one worker, so
its module fixtures are built once): one torch / OpenMP thread per process (the test workers and every server,
trainer and torchrun child they start), and the slow modules handed out first.
"""

from __future__ import annotations

import os

# Before torch is imported, and inherited by every subprocess: on 2 shared cores, OpenMP threads that spin against
# another process made tiny networks ~30x slower; each worker is one process on one core.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import contextlib  # noqa: E402 (after the thread settings)
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from labelfactory.serve import DEMO_MODELS, install_models, server_command, server_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample-data"
DATASTORE = SAMPLE / "datastore"
# the smallest StyleGAN2 the GAN tests train: 16^2, 16 channels, batch 4 (StyleGAN2Config fields)
TINY_GAN = dict(resolution=16, z_dim=16, w_dim=16, mapping_layers=2, channel_base=256, channel_max=16, batch_size=4)


# the longest modules (a minute or two each, docs/RESULTS.md section 8): handed out first, one to each worker
LONGEST = ("tests.test_label_efficiency", "tests.test_app_loop")


def pytest_collection_modifyitems(config, items):
    """The longest modules first, then those with slow tests, so that `--dist loadfile` hands the longest work out
    before the short. Stable and per module: a module's tests stay together and in their order."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}

    def rank(item) -> tuple[int, int]:
        name = item.module.__name__
        return (LONGEST.index(name) if name in LONGEST else len(LONGEST), name not in slow_modules)

    items.sort(key=rank)


@pytest.fixture
def one_thread():
    """One torch thread for tiny networks: on a shared 2-core machine, spinning OpenMP threads made them ~30x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def sample() -> Path:
    return SAMPLE


@pytest.fixture
def datastore_copy(tmp_path) -> Path:
    """A writable copy of the sample datastore (images + labels/final)."""
    dst = tmp_path / "datastore"
    shutil.copytree(DATASTORE, dst)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `monailabel start_server` for the app, on 127.0.0.1 and a free port; stopped by PID."""

    def __init__(
        self,
        studies: Path,
        app_dir: Path,
        conf: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = server_command(str(studies), "127.0.0.1", self.port, list((conf or {}).items()), app_dir)
        self.log = log or (studies.parent / f"server-{self.port}.log")
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**server_env(), **(env or {})}, start_new_session=True
        )

    def wait_ready(self, timeout: float = 180) -> None:
        import requests

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if requests.get(self.url + "/info/", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._log.close()


@pytest.fixture
def start_server(tmp_path):
    """Factory: start_server(studies, app_dir=..., conf=...) -> ready Server; all stopped at teardown."""
    servers = []

    def _start(
        studies: Path,
        app_dir: Path | None = None,
        conf: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
    ) -> Server:
        srv = Server(studies, app_dir or tmp_path / "app", conf, env)
        servers.append(srv)
        srv.wait_ready()
        return srv

    yield _start
    for s in servers:
        s.stop()


def copy_app(dst: Path) -> Path:
    """A copy of apps/labelfactory at `dst` (so model files written by tests stay in tmp)."""
    shutil.copytree(REPO / "apps" / "labelfactory", dst, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
    return dst


@pytest.fixture
def app_copy(tmp_path) -> Path:
    return copy_app(tmp_path / "app")


@contextlib.contextmanager
def module_server(root: Path, conf: dict[str, str] | None = None, env: dict[str, str] | None = None):
    """A ready server on copies of the sample datastore and the app under `root`, the demo models in the app's model
    folder (`.studies`, `.app`, `.models`): one server start that a module's tests share (a start costs ~10 s of
    CPU); stopped on exit."""
    studies, app = root / "datastore", copy_app(root / "app")
    shutil.copytree(DATASTORE, studies)
    install_models(DEMO_MODELS, app / "model")
    srv = Server(studies, app, conf, env)
    srv.studies, srv.app, srv.models = studies, app, app / "model"
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _make_pairs(folder: Path, n: int, size: int = 32, seed: int = 0) -> Path:
    """n drawn-shape pairs in the synthesis layout: 2D CT in HU (body, liver=1, spleen=2, aorta=6), uint8 labels."""
    import numpy as np

    from labelfactory.io import Image, write_image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(n):
        image = np.full((size, size), -1000.0, np.float32)
        label = np.zeros((size, size), np.uint8)
        body = ((yy - 0.5) / 0.45) ** 2 + ((xx - 0.5) / 0.45) ** 2 < 1
        image[body] = 0.0
        for value, hu, r in ((1, 150.0, 0.18), (2, -300.0, 0.1), (6, 600.0, 0.06)):
            cy, cx = rng.uniform(0.3, 0.7, 2)
            blob = ((yy - cy) / r) ** 2 + ((xx - cx) / r) ** 2 < 1
            image[blob & body] = hu
            label[blob & body] = value
        image += rng.normal(0, 20, image.shape).astype(np.float32)
        geometry = ((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
        write_image(Image(image, *geometry), folder / "images" / f"seed{seed * 1000 + i:06d}.nii.gz")
        write_image(Image(label, *geometry), folder / "labels" / f"seed{seed * 1000 + i:06d}.nii.gz")
    (folder / "manifest.csv").write_text("seed\n" + "\n".join(str(seed * 1000 + i) for i in range(n)) + "\n")
    return folder


@pytest.fixture(scope="session")
def make_pairs():
    """make_pairs(folder, n, size=32, seed=0) -> folder: a tiny synthetic data set (images/, labels/, manifest.csv)."""
    return _make_pairs


@pytest.fixture
def app_config(monkeypatch):
    """app_config(name) -> the module apps/labelfactory/lib/configs/<name>.py, imported as the app imports it."""
    import importlib

    monkeypatch.syspath_prepend(str(REPO / "apps" / "labelfactory"))
    return lambda name: importlib.import_module(f"lib.configs.{name}")
