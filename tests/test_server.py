"""The app as a real MONAI Label server on the sample data: /info, MONAI Label's endpoint contract, and under
load: light routes answer while heavy ones run, one training at a time, scoring coalesced. One server start for the
module (tests.conftest.module_server); `labelfactory serve`'s set-up is tested without one."""

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
    root = tmp_path_factory.mktemp("server")
    env = {"MONAI_LABEL_SESSION_PATH": str(root / "sessions")}
    with module_server(root, conf={"models": "all", "device": "cpu"}, env=env) as srv:
        srv.sessions = root / "sessions"
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
    shown = {f"{k} {n}": v.get("device") for k in ("models", "trainers", "scoring") for n, v in info[k].items()}
    assert len(shown) >= 9 and set(shown.values()) == {"cpu"}, shown  # `--conf device`, on every task
    assert info["strategies"]["generated_uncertain"]["device"] == "cpu"


def test_monai_label_endpoint_contract(server, tmp_path):
    """What MONAI Label's clients (Slicer, OHIF, its own endpoint tests) call, in MONAI Label's shapes: strategies,
    datastore add / label save / download / info / remove, dataset download, sessions, model info and download."""
    url, studies = server.url, server.studies
    for strategy in ("random", "first"):  # MONAI Label's standard strategies, beside the project's own
        r = requests.post(f"{url}/activelearning/{strategy}", json={}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["id"] and r.json()["name"]

    total = requests.get(f"{url}/datastore/", timeout=30).json()["total"]
    image = (studies / "abdomen.nii.gz").read_bytes()
    label = (studies / "labels" / "final" / "abdomen.nii.gz").read_bytes()
    r = requests.put(f"{url}/datastore/", files={"file": ("contract_1.nii.gz", image)}, timeout=60)
    assert r.status_code == 200, r.text
    assert "contract_1" in requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).text
    assert requests.get(f"{url}/datastore/", timeout=30).json()["total"] == total + 1

    q = {"image": "contract_1", "tag": "test"}
    assert requests.put(f"{url}/datastore/label", params=q, files={"label": ("l.nii.gz", label)}, timeout=60).ok
    assert requests.get(f"{url}/datastore/", timeout=30).json()["label_tags"]["test"] == 1
    r = requests.get(f"{url}/datastore/label", params={"label": "contract_1", "tag": "test"}, timeout=60)
    assert r.status_code == 200 and len(r.content) > 0
    r = requests.get(f"{url}/datastore/label/info", params={"label": "contract_1", "tag": "test"}, timeout=30)
    assert r.status_code == 200 and r.json()["name"] == "contract_1.nii.gz"
    assert requests.delete(f"{url}/datastore/label", params={"id": "contract_1", "tag": "test"}, timeout=30).ok
    assert "test" not in requests.get(f"{url}/datastore/", timeout=30).json()["label_tags"]

    r = requests.get(f"{url}/datastore/image", params={"image": "contract_1"}, timeout=60)
    assert r.status_code == 200 and r.content == image
    r = requests.get(f"{url}/datastore/image/info", params={"image": "contract_1"}, timeout=30)
    assert r.status_code == 200 and r.json()["name"] == "contract_1.nii.gz"
    assert requests.put(f"{url}/datastore/image/info", params={"image": "contract_1"}, timeout=30).ok
    assert requests.delete(f"{url}/datastore/", params={"id": "contract_1"}, timeout=30).ok
    assert requests.get(f"{url}/datastore/", timeout=30).json()["total"] == total

    r = requests.get(f"{url}/datastore/dataset", timeout=120)
    assert r.status_code == 200 and r.content[:2] == b"PK"  # a zip of the images and their final labels

    assert requests.get(f"{url}/session/xyz", timeout=30).status_code != 200
    r = requests.put(f"{url}/session/", params={"expiry": 600}, files=[("files", ("s.nii.gz", image))], timeout=60)
    assert r.status_code == 200, r.text
    session = r.json()["session_id"]
    assert session and (server.sessions / session).is_dir()
    assert requests.get(f"{url}/session/{session}", timeout=30).status_code == 200
    r = requests.get(f"{url}/session/{session}", params={"image": "true"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert requests.delete(f"{url}/session/{session}", timeout=30).status_code == 200
    assert not (server.sessions / session).exists()

    r = requests.get(f"{url}/model/info/segmentation", timeout=30)
    assert r.status_code == 200 and r.json()["checksum"], r.text
    r = requests.get(f"{url}/model/segmentation", timeout=60)
    assert r.status_code == 200 and r.content == (server.models / "segmentation.pt").read_bytes()


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


def test_serve_installs_demo_models_without_overwriting_trained_ones(tmp_path):
    from labelfactory.serve import install_models, prepare_studies

    src, dst = tmp_path / "demo", tmp_path / "app" / "model"
    src.mkdir()
    (src / "stylegan2.pt").write_bytes(b"demo-g")
    (src / "segmentation.pt").write_bytes(b"demo-s")
    dst.mkdir(parents=True)
    (dst / "segmentation.pt").write_bytes(b"trained")
    assert install_models(src, dst) == ["stylegan2.pt"]
    assert (dst / "segmentation.pt").read_bytes() == b"trained" and (dst / "stylegan2.pt").read_bytes() == b"demo-g"
    assert install_models(tmp_path / "none", dst) == []
    # the sample data is served from a working copy, never in place
    studies = prepare_studies(None, tmp_path / "runs")
    copy = tmp_path / "runs" / "totalsegmentator" / "datastore"
    assert studies == str(copy) and (copy / "torso_3mm.nii.gz").is_file()
