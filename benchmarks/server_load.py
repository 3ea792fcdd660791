"""Load on a labelfactory server: concurrent clients for a bounded time, loopback only.

Mixed load (what a reading room and a scripted loop do at once), on a server this script starts
on temp copies of the sample datastore and the app with the demo models:

    .venv/bin/python benchmarks/server_load.py --start --mixed --clients 8 --seconds 60 --out results/x.json

Each client cycles through synthesis, datasetgan, segmentation (a 3D volume), next sample with
both strategies (`random`, `generated_uncertain`), a label save and `/info`, each client starting
at another route. Single-route load on a running server: `--server URL --target MODEL:IMAGE_ID`.
Prints and writes (JSON) requests/s, p50 / p99 latency and errors per route, and for the mixed
load how long scoring kept running after the clients stopped. Requests only go to a server on
this machine (127.0.0.0/8 or localhost): the script refuses anything else.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
MIXED = ("synthesis", "datasetgan", "segmentation", "next_random", "next_generated", "label_put", "info")


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summary(lat: list[float], errors: list[str], wall: float) -> dict:
    return {
        "requests": len(lat),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:3],
        "requests_per_s": round(len(lat) / wall, 2),
        "p50_s": round(percentile(lat, 50), 3),
        "p99_s": round(percentile(lat, 99), 3),
        "mean_s": round(statistics.fmean(lat), 3) if lat else None,
    }


def check_local(server: str) -> None:
    host = urlparse(server).hostname or ""
    if not (host == "localhost" or host.startswith("127.")):
        raise SystemExit(f"refusing to load {host}: this benchmark only targets a server on this machine")


def _infer(session: requests.Session, server: str, model: str, image: str, params: dict | None = None):
    data = {"params": json.dumps(params or {})}
    return session.post(f"{server}/infer/{model}", params={"image": image, "output": "json"}, data=data, timeout=600)


class Mixed:
    """The mixed workload's requests; `prepare` makes the generated image that datasetgan and label saves use."""

    def __init__(self, server: str, workdir: Path):
        self.server, self.workdir = server, workdir
        self._seed = iter(range(1000, 10**6))
        self._lock = threading.Lock()

    def prepare(self) -> None:
        r = requests.post(f"{self.server}/activelearning/random", json={}, timeout=300)  # warm-up
        r = requests.post(f"{self.server}/activelearning/generated_uncertain", json={}, timeout=600)
        r.raise_for_status()
        self.generated = r.json()["id"]
        img = requests.get(f"{self.server}/datastore/image", params={"image": self.generated}, timeout=60)
        path = self.workdir / "image.nii.gz"
        path.write_bytes(img.content)
        from labelfactory.io import read_image, write_image

        image = read_image(path)
        label = np.zeros(image.array.shape, np.uint8)
        label[: label.shape[0] // 2] = 1
        self.label = write_image(image.with_array(label), self.workdir / "label.nii.gz").read_bytes()
        for model, image_id in (
            ("synthesis", "seed000001"),
            ("datasetgan", self.generated),
            ("segmentation", "torso_3mm"),
        ):
            _infer(requests.Session(), self.server, model, image_id)  # warm-up: models loaded

    def call(self, session: requests.Session, route: str) -> requests.Response:
        s = self.server
        if route == "info":
            return session.get(f"{s}/info/", timeout=600)
        if route == "label_put":
            files = {"label": ("label.nii.gz", self.label)}
            return session.put(
                f"{s}/datastore/label", params={"image": self.generated, "tag": "final"}, files=files, timeout=600
            )
        if route == "next_random":
            return session.post(f"{s}/activelearning/random", json={}, timeout=600)
        if route == "next_generated":
            return session.post(f"{s}/activelearning/generated_uncertain", json={}, timeout=600)
        if route == "synthesis":
            with self._lock:
                seed = next(self._seed)
            return _infer(session, s, "synthesis", f"seed{seed:06d}")
        if route == "datasetgan":
            return _infer(session, s, "datasetgan", self.generated)
        return _infer(session, s, "segmentation", "torso_3mm")


def drive(
    clients: int, seconds: float, route_of: Callable[[int, int], str], call: Callable
) -> tuple[dict, dict, float]:
    """`clients` threads for `seconds`: client k's i-th request is `call(session, route_of(k, i))`.

    Returns (latencies per route of the 200 answers, errors per route, wall seconds).
    """
    lat: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, list[str]] = defaultdict(list)

    def client(k: int, stop: float) -> None:
        session, i = requests.Session(), 0
        while time.time() < stop:
            route = route_of(k, i)
            i += 1
            t0 = time.perf_counter()
            try:
                r = call(session, route)
            except requests.RequestException as e:
                errors[route].append(type(e).__name__)
                continue
            if r.status_code == 200:
                lat[route].append(time.perf_counter() - t0)
            else:
                errors[route].append(f"{r.status_code}: {r.text[:120]}")

    stop = time.time() + seconds
    threads = [threading.Thread(target=client, args=(k, stop)) for k in range(clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, errors, time.time() - t0


def run_mixed(server: str, clients: int, seconds: float, workdir: Path) -> dict:
    check_local(server)
    mix = Mixed(server, workdir)
    mix.prepare()
    lat, errors, wall = drive(clients, seconds, lambda k, i: MIXED[(k + i) % len(MIXED)], mix.call)
    routes = {r: summary(lat[r], errors[r], wall) for r in MIXED}
    total = sum(len(v) for v in lat.values())
    for r, v in routes.items():
        print(
            f"{r:16s} {v['requests_per_s']:6.2f} req/s  p50 {v['p50_s']:.3f} s  p99 {v['p99_s']:.3f} s  "
            f"errors {v['errors']}"
        )
    tail = scoring_tail(server, limit=180)
    print(f"all routes: {total / wall:.2f} req/s over {wall:.1f} s; scoring kept running {tail} s after the load")
    return {
        "clients": clients,
        "seconds": round(wall, 1),
        "requests": total,
        "requests_per_s": round(total / wall, 2),
        "errors": sum(len(v) for v in errors.values()),
        "scoring_tail_s": tail,
        "routes": routes,
    }


def scoring_tail(server: str, limit: float) -> float | str:
    """Seconds until no scoring task runs any more (">limit" when it still runs at the limit)."""
    t0 = time.time()
    while time.time() - t0 < limit:
        r = requests.get(f"{server}/scoring/", params={"check_if_running": "true"}, timeout=60)
        if r.status_code == 404:  # MONAI Label: "No Scoring Tasks are currently Running"
            return round(time.time() - t0, 1)
        time.sleep(1)
    return f">{limit:.0f}"


def _target_call(session: requests.Session, route: str, server: str, model: str, image: str, params: dict):
    return _infer(session, server, model, image, params)


def run_targets(server: str, targets: list[tuple[str, str]], clients: int, seconds: float, params: dict) -> dict:
    check_local(server)
    results = {}
    for model, image in targets:
        _infer(requests.Session(), server, model, image, params)  # warm-up
        name = f"{model}:{image}"
        call = functools.partial(_target_call, server=server, model=model, image=image, params=params)
        lat, errors, wall = drive(clients, seconds, lambda k, i, name=name: name, call)
        r = results[name] = {"clients": clients, "seconds": round(wall, 1), **summary(lat[name], errors[name], wall)}
        print(
            f"{model:14s} {image:24s} {r['requests_per_s']:6.2f} req/s  p50 {r['p50_s']:.3f} s  "
            f"p99 {r['p99_s']:.3f} s  errors {r['errors']}"
        )
    return results


def start_server(workdir: Path, port: int, conf: list[tuple[str, str]]) -> subprocess.Popen:
    """The app on copies of the sample datastore and the app folder (demo models installed); ready when it returns."""
    from labelfactory.serve import DEMO_MODELS, install_models, server_command, server_env

    shutil.copytree(REPO / "sample-data" / "datastore", workdir / "datastore")
    shutil.copytree(
        REPO / "apps" / "labelfactory", workdir / "app", ignore=shutil.ignore_patterns("model", "logs", "__pycache__")
    )
    install_models(DEMO_MODELS, workdir / "app" / "model")
    cmd = server_command(str(workdir / "datastore"), "127.0.0.1", port, conf, workdir / "app")
    proc = subprocess.Popen(
        cmd,
        stdout=open(workdir / "server.log", "wb"),
        stderr=subprocess.STDOUT,
        env=server_env(),
        start_new_session=True,
    )
    t0 = time.time()
    while time.time() - t0 < 300:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {workdir / 'server.log'}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/info/", timeout=5).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(1)
    raise SystemExit(f"server not ready after 300 s; see {workdir / 'server.log'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="http://127.0.0.1:8000")
    ap.add_argument(
        "--start", action="store_true", help="start a server on temp copies of the sample data (port from --server)"
    )
    ap.add_argument("--mixed", action="store_true", help="the mixed load (every route at once) instead of --target")
    ap.add_argument("--target", action="append", default=[], help="MODEL:IMAGE_ID (repeatable; single-route load)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--params", default="{}", help="JSON params sent with every --target request")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "server_load.json"))
    a = ap.parse_args()
    if not a.mixed and not a.target:
        ap.error("give --mixed or at least one --target")
    with tempfile.TemporaryDirectory(prefix="lf-load-") as tmp:
        proc = start_server(Path(tmp), urlparse(a.server).port or 80, [("models", "all")]) if a.start else None
        try:
            if a.mixed:
                res = {"mixed": run_mixed(a.server, a.clients, a.seconds, Path(tmp))}
            else:
                res = {
                    "targets": run_targets(
                        a.server, [tuple(t.split(":", 1)) for t in a.target], a.clients, a.seconds, json.loads(a.params)
                    )
                }
        finally:
            if proc is not None:  # the server and its scoring / training subprocesses
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(
        json.dumps({"server": a.server, **res, "cpu": _cpu(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2)
    )
    print(f"wrote {a.out}")


def _cpu() -> str:
    try:
        name = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        return f"{name} x{len(os.sched_getaffinity(0))}"
    except (OSError, StopIteration):
        return sys.platform


if __name__ == "__main__":
    main()
