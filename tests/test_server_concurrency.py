"""The server starts on the sample data and answers /info; under load it answers light routes while heavy ones run,
takes one training at a time, coalesces scoring."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from monailabel.client import MONAILabelClient

from labelfactory.labels import LABEL_COLORS, LABEL_NAMES
from tests.conftest import module_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module, with the demo models (the demo segmenter: a real, heavy infer)."""
    with module_server(tmp_path_factory.mktemp("concurrency"), conf={"models": "all"}) as srv:
        yield srv


def test_server_starts_on_the_sample_data_and_answers_info(server):
    """First in the module: the datastore is still the sample's."""
    info = MONAILabelClient(server.url).info()
    assert info["name"] == "labelfactory"
    assert info["labels"] == LABEL_NAMES
    assert set(info["label_colors"]) == set(LABEL_COLORS)
    assert all(0 <= c <= 1 for rgb in info["label_colors"].values() for c in rgb)
    assert info["datastore"]["total"] == 4  # every sample study is served
    assert info["datastore"]["completed"] == 2  # two carry final labels


def test_light_routes_answer_while_segmentations_run(server):
    url, done = server.url, {}

    def segment(k):
        r = requests.post(f"{url}/infer/segmentation", params={"image": "torso_3mm", "output": "json"}, timeout=600)
        done[k] = (time.perf_counter(), r.status_code)

    heavy = [threading.Thread(target=segment, args=(k,)) for k in range(2)]
    for t in heavy:
        t.start()
    time.sleep(1.0)  # both segmentations are under way
    label = (server.studies / "labels" / "final" / "torso_3mm.nii.gz").read_bytes()
    info = requests.get(f"{url}/info/", timeout=600)
    saved = requests.put(
        f"{url}/datastore/label", params={"image": "torso_3mm"}, files={"label": ("l.nii.gz", label)}, timeout=600
    )
    light_done = time.perf_counter()
    for t in heavy:
        t.join()
    assert info.status_code == 200 and saved.status_code == 200, saved.text
    assert [code for _, code in done.values()] == [200, 200]
    assert light_done < min(t for t, _ in done.values()), (
        "/info and a label save must not wait behind the segmentations"
    )


def test_a_burst_of_trainings_accepts_exactly_one(server):
    def start(model):
        return requests.post(f"{server.url}/train/{model}", json={}, timeout=120).status_code

    with ThreadPoolExecutor(3) as pool:
        codes = sorted(pool.map(start, ["segmentation", "segmentation", "clamnet"]))
    requests.delete(f"{server.url}/train/", timeout=60)
    assert codes == [200, 429, 429]


def test_scoring_is_coalesced(server):
    waiting, runs = [], []
    for _ in range(6):  # every next sample asks for a scoring run; a run takes seconds (a subprocess builds the app)
        assert requests.post(f"{server.url}/activelearning/random", json={}, timeout=120).status_code == 200
        runs = requests.get(f"{server.url}/scoring/", params={"all": "true"}, timeout=60).json()
        waiting.append(sum(r["status"] == "SUBMITTED" for r in runs))
        time.sleep(1.1)  # MONAI Label's random strategy weighs images by whole seconds since their last pick
    requests.delete(f"{server.url}/scoring/", timeout=60)
    assert max(waiting) <= 1, (
        f"at most one scoring run waits behind the running one; waiting after each call: {waiting}"
    )
    assert len(runs) < 6, f"{len(runs)} scoring runs for 6 next samples and the one at start"
