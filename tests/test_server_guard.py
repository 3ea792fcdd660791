"""A server no request can misuse, through one real server: model files not writable through the API, a bounded
infer queue whose abandoned requests are not run, distinct next samples under concurrency, one training per models
folder across restarts, ClamNet taking no server paths."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from labelfactory.io import read_image
from labelfactory.training_lock import LOCK_FILE
from tests.conftest import module_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module: the sample datastore and its demo models, one infer worker and one waiting place."""
    env = {"LABELFACTORY_INFER_WORKERS": "1", "LABELFACTORY_INFER_QUEUE": "1"}
    conf = {"models": "all", "explore": "0", "skip_scoring": "true"}
    with module_server(tmp_path_factory.mktemp("guard"), conf, env) as srv:
        yield srv


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_model_files_cannot_be_deleted_or_replaced_through_the_api(server):
    before = _digests(server.models)
    answers = [
        requests.delete(f"{server.url}/model/synthesis", timeout=60),  # once moved the whole models folder away
        requests.delete(f"{server.url}/model/datasetgan", timeout=60),
        requests.put(f"{server.url}/model/segmentation", files={"file": ("x.pt", b"garbage")}, timeout=60),
    ]
    assert [a.status_code for a in answers] == [403, 403, 403], [a.text for a in answers]
    assert "--model-routes" in answers[0].json()["detail"]
    assert _digests(server.models) == {k: v for k, v in before.items()}, "no model file changed, moved or added"
    assert requests.get(f"{server.url}/model/segmentation", timeout=60).status_code == 200  # download as before


def test_a_full_queue_answers_429_and_an_abandoned_request_is_not_run(server):
    """One worker, one waiting place: A runs (a ClamNet probability map), B waits and its client gives up, C is 429."""
    answer = {}

    def run_a():
        answer["a"] = requests.post(
            f"{server.url}/infer/clamnet",
            params={"image": "torso_3mm", "output": "image"},
            data={"params": json.dumps({"probability": True})},
            timeout=600,
        )

    a = threading.Thread(target=run_a)
    a.start()
    time.sleep(1.5)  # A holds the worker
    with pytest.raises(requests.Timeout):  # B: its client leaves after 1 s
        requests.post(f"{server.url}/infer/clamnet", params={"image": "thorax_aorta", "output": "json"}, timeout=1)
    c = requests.post(f"{server.url}/infer/clamnet", params={"image": "abdomen", "output": "json"}, timeout=60)
    assert c.status_code == 429 and "LABELFACTORY_INFER_QUEUE" in c.json()["detail"]
    a.join()
    assert answer["a"].status_code == 200, answer["a"].text
    for _ in range(50):  # B reaches the worker once A is done, and is dropped there
        if "not run: its client disconnected" in server.log.read_text():
            break
        time.sleep(0.2)
    log = server.log.read_text()
    assert log.count("not run: its client disconnected") == 1

    # A's result file is the probability map itself (not the 0/1 marker mask), and no server path came back
    prob = server.studies.parent / "prob.nii.gz"
    prob.write_bytes(answer["a"].content)
    values = read_image(prob).array
    assert values.dtype.kind == "f" and ((values > 0) & (values < 1)).any()
    assert b"/tmp" not in gzip.decompress(answer["a"].content)[:348]  # no path in the header either


def test_concurrent_next_samples_get_distinct_generated_images(server):
    def sample(_):
        r = requests.post(f"{server.url}/activelearning/generated_uncertain", json={"candidates": 2}, timeout=600)
        return r.status_code, r.json().get("id")

    with ThreadPoolExecutor(2) as pool:  # two at once: one runs, one waits (the server's one waiting place)
        answers = list(pool.map(sample, range(2)))
    assert [code for code, _ in answers] == [200, 200], answers
    ids = [i for _, i in answers]
    assert len(set(ids)) == 2, f"each caller gets its own image: {ids}"


def test_organ_mask_is_never_a_server_path(server):
    for bad in ("/etc/passwd", str(server.studies / "labels" / "final" / "torso_3mm.nii.gz"), "../final"):
        r = requests.post(
            f"{server.url}/infer/clamnet",
            params={"image": "torso_3mm", "output": "json"},
            data={"params": json.dumps({"organ_mask": bad})},
            timeout=60,
        )
        assert r.status_code == 400 and "label tag" in r.json()["detail"], r.text


def test_a_trainer_left_running_by_an_earlier_server_blocks_training_until_it_ends(server):
    trainer = subprocess.Popen(["sleep", "60"])  # stands in for the trainer a killed server left running
    lock = server.models / LOCK_FILE
    lock.write_text(json.dumps({"pid": trainer.pid, "model": "clamnet", "time": "earlier"}))
    try:
        r = requests.post(f"{server.url}/train/clamnet", json={}, timeout=60)
        assert r.status_code == 429 and str(trainer.pid) in r.json()["detail"], r.text
        assert lock.exists()
    finally:
        trainer.kill()
        trainer.wait()
    r = requests.post(f"{server.url}/train/clamnet", json={"steps": 1}, timeout=60)  # the lock is stale now
    requests.delete(f"{server.url}/train/", timeout=60)
    assert r.status_code == 200, r.text
    assert "removed a stale training lock" in server.log.read_text()


def test_a_trainer_holds_the_lock_with_its_own_pid_while_it_trains(tmp_path):
    import os

    from labelfactory.errors import LabelFactoryError
    from labelfactory.tasks.base import TrainBase
    from labelfactory.training_lock import training_lock

    seen = {}

    @dataclasses.dataclass
    class NoOptions:
        pass

    class Probe(TrainBase):
        name, options = "probe", ()

        def train(self, request, datastore, config, started):
            seen["lock"] = json.loads((self.model_dir / LOCK_FILE).read_text())
            with pytest.raises(LabelFactoryError) as e:  # a second trainer on the same folder, e.g. after a restart
                with training_lock(self.model_dir, "other"):
                    pass
            seen["status"] = e.value.status
            return {}

    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 7, "model": "gone"}))  # a stale lock: no such PID
    Probe("probe", tmp_path, NoOptions())({}, None)
    assert seen["lock"]["pid"] == os.getpid() and seen["lock"]["model"] == "probe" and seen["status"] == 429
    assert not (tmp_path / LOCK_FILE).exists(), "released when training ends"


def test_a_lock_whose_pid_now_names_another_process_is_stale(tmp_path):
    import os

    from labelfactory.training_lock import _start_time, holder

    live = os.getppid()  # a live process, but not the one that took the lock (its start time differs)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": live, "start": "1", "model": "x"}))
    assert holder(tmp_path) is None and not (tmp_path / LOCK_FILE).exists()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": live, "start": _start_time(live), "model": "x"}))
    assert holder(tmp_path)["pid"] == live
