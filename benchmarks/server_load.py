"""Load on a running labelfactory server: N concurrent clients for a bounded time, loopback only.

    .venv/bin/python benchmarks/server_load.py --server http://127.0.0.1:8000 --clients 4 --seconds 30 \
        --target segmentation:torso_3mm_slice --target synthesis:seed000001

Each target is MODEL:IMAGE_ID. Prints requests/s, p50 / p99 latency and errors per target and
writes benchmarks/results/server_load.json. Requests only go to the given server, which must be
on this machine (127.0.0.0/8 or localhost): the script refuses anything else.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import requests


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def hammer(server: str, model: str, image: str, params: dict, stop: float, out: list, errors: list) -> None:
    session = requests.Session()
    while time.time() < stop:
        t0 = time.perf_counter()
        try:
            r = session.post(f"{server}/infer/{model}", params={"image": image, "output": "json"}, data={"params": json.dumps(params)}, timeout=120)
            if r.status_code == 200:
                out.append(time.perf_counter() - t0)
            else:
                errors.append(f"{r.status_code}: {r.text[:120]}")
        except requests.RequestException as e:
            errors.append(type(e).__name__)


def run(server: str, targets: list[tuple[str, str]], clients: int, seconds: float, params: dict) -> dict:
    host = urlparse(server).hostname or ""
    if not (host == "localhost" or host.startswith("127.")):
        raise SystemExit(f"refusing to load {host}: this benchmark only targets a server on this machine")
    results = {}
    for model, image in targets:
        lat: list[float] = []
        errors: list[str] = []
        requests.post(f"{server}/infer/{model}", params={"image": image, "output": "json"}, data={"params": json.dumps(params)}, timeout=300)  # warm-up
        stop = time.time() + seconds
        threads = [threading.Thread(target=hammer, args=(server, model, image, params, stop, lat, errors)) for _ in range(clients)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - t0
        results[f"{model}:{image}"] = {
            "clients": clients, "seconds": round(wall, 1), "requests": len(lat), "errors": len(errors),
            "error_samples": sorted(set(errors))[:3], "requests_per_s": round(len(lat) / wall, 2),
            "p50_s": round(percentile(lat, 50), 3), "p99_s": round(percentile(lat, 99), 3),
            "mean_s": round(statistics.fmean(lat), 3) if lat else None,
        }
        r = results[f"{model}:{image}"]
        print(f"{model:14s} {image:24s} {r['requests_per_s']:6.2f} req/s  p50 {r['p50_s']:.3f} s  p99 {r['p99_s']:.3f} s  errors {r['errors']}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="http://127.0.0.1:8000")
    ap.add_argument("--target", action="append", required=True, help="MODEL:IMAGE_ID (repeatable)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--params", default="{}", help="JSON params sent with every request")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "server_load.json"))
    a = ap.parse_args()
    targets = [tuple(t.split(":", 1)) for t in a.target]
    res = run(a.server, targets, a.clients, a.seconds, json.loads(a.params))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"server": a.server, "targets": res, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
