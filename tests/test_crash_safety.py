"""Nothing written is ever half-written or lost to a stale copy: the datastore index, labels and generated images.

Unit tests drive two datastore objects on one folder (what the server and its scoring subprocess
are); the kill tests SIGKILL a real server at the moment it opens the file for writing, through a
fault-injection `sitecustomize` on its PYTHONPATH (armed by a flag file once the server is up),
then start a new server on the same folder. A training killed with -9 resumes from its last snapshot.
"""

from __future__ import annotations

import json
import os
import re
import signal
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel.datastore.local import LocalDatastore

from labelfactory.io import Image, read_image, write_image
from labelfactory.latent_record import LATENT_KEY
from labelfactory.loop import wait_for_training
from labelfactory.tasks.datastore import LabelFactoryDatastore
from tests.test_app_loop import TINY, _train

W = [0.25] * 8


def _generated(tmp_path, seed: int):
    path = write_image(
        Image(np.full((16, 16), seed, np.int16), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0)),
        tmp_path / f"g{seed}.nii.gz",
    )
    return path, {LATENT_KEY: {"seed": seed, "truncation_psi": 0.7, "w": W, "generator": "g1"}, "uncertainty": 0.5}


def _add_generated(ds: LabelFactoryDatastore, image_id: str, path, info) -> str:
    """What the server's synthesis does (`add_generated_image`): the latent record as `latent=`, never in info."""
    return ds.add_image(
        image_id, str(path), {k: v for k, v in info.items() if k != LATENT_KEY}, latent=info[LATENT_KEY]
    )


def _open(folder) -> LabelFactoryDatastore:
    return LabelFactoryDatastore(str(folder), extensions=["*.nii.gz"], auto_reload=False)


def test_a_stale_copy_never_overwrites_the_index(datastore_copy, tmp_path):
    server, scoring = _open(datastore_copy), _open(datastore_copy)  # both loaded the index as it was
    path, info = _generated(tmp_path, 7)
    _add_generated(server, "gen_seed000007", path, info)
    scoring.update_image_info("torso_3mm", {"uncertainty": 0.1})  # writes from its old copy under MONAI Label
    fresh = _open(datastore_copy)
    assert fresh.get_image_info("gen_seed000007")[LATENT_KEY]["w"] == W
    assert fresh.get_image_info("torso_3mm")["uncertainty"] == 0.1
    assert fresh.get_image_info("gen_seed000007")["uncertainty"] == 0.5


def test_provenance_survives_an_index_written_without_it(datastore_copy, tmp_path):
    ds = _open(datastore_copy)
    path, info = _generated(tmp_path, 3)
    _add_generated(ds, "gen_seed000003", path, info)
    assert (datastore_copy / "gen_seed000003.labelfactory.json").is_file()
    (datastore_copy / "datastore_v2.json").unlink()  # the entry is re-made from the file alone, info lost
    LocalDatastore(str(datastore_copy), extensions=["*.nii.gz"])
    assert (
        LATENT_KEY
        not in json.loads((datastore_copy / "datastore_v2.json").read_text())["objects"]["gen_seed000003"]["image"][
            "info"
        ]
    )
    info = _open(datastore_copy).get_image_info("gen_seed000003")
    assert info[LATENT_KEY]["seed"] == 3 and info[LATENT_KEY]["w"] == W, (
        "a generated image must never pass for a real patient"
    )


@pytest.mark.parametrize("damage", [b"", b'{"name": "new-dataset", "objects": {"torso_3mm": {"ima'])
def test_a_damaged_index_is_rebuilt_keeping_labels_and_latents(datastore_copy, tmp_path, damage, caplog):
    ds = _open(datastore_copy)
    path, info = _generated(tmp_path, 5)
    _add_generated(ds, "gen_seed000005", path, info)
    (datastore_copy / "datastore_v2.json").write_bytes(damage)
    rebuilt = _open(datastore_copy)
    assert "DATASTORE INDEX DAMAGED" in caplog.text
    assert sorted(rebuilt.list_images()) == sorted(
        ["abdomen", "thorax_aorta", "torso_3mm", "torso_3mm_long", "gen_seed000005"]
    )
    assert sorted(rebuilt.get_labeled_images()) == ["abdomen", "torso_3mm"]
    assert rebuilt.get_image_info("gen_seed000005")[LATENT_KEY]["w"] == W
    assert list(datastore_copy.glob("datastore_v2.json.damaged-*")), "the damaged index is kept for inspection"


def test_concurrent_writers_lose_nothing(datastore_copy, tmp_path):
    """Two datastore objects (the server and a subprocess) writing at once, each from its own copy of the index."""

    def writer(offset):
        ds = _open(datastore_copy)
        for i in range(8):
            path, info = _generated(tmp_path, offset + i)
            _add_generated(ds, f"gen_seed{offset + i:06d}", path, info)
            ds.update_image_info("torso_3mm", {f"writer{offset}": i})

    threads = [threading.Thread(target=writer, args=(offset,)) for offset in (100, 200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ds = _open(datastore_copy)
    assert len([i for i in ds.list_images() if LATENT_KEY in ds.get_image_info(i)]) == 16
    assert {k: v for k, v in ds.get_image_info("torso_3mm").items() if k.startswith("writer")} == {
        "writer100": 7,
        "writer200": 7,
    }


# ---- a real server killed at the write ----

_KILLER = textwrap.dedent(
    '''
    """Test-only fault injection: SIGKILL this process when it opens a watched file for writing, once armed."""
    import builtins, fnmatch, os, signal

    _folder, _pattern, _flag = os.environ["LF_KILL_ON_WRITE"].split(os.pathsep)
    _open, _os_open = builtins.open, os.open

    def _check(path, writing):
        path = os.fspath(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        if writing and isinstance(path, str) and os.path.exists(_flag):
            full = os.path.realpath(path)
            if os.path.dirname(full) == _folder and fnmatch.fnmatch(os.path.basename(full), _pattern):
                os.kill(os.getpid(), signal.SIGKILL)

    def _patched_open(file, mode="r", *args, **kwargs):
        result = _open(file, mode, *args, **kwargs)
        _check(file, any(c in mode for c in "wax+"))
        return result

    def _patched_os_open(path, flags, *args, **kwargs):
        fd = _os_open(path, flags, *args, **kwargs)
        _check(path, bool(flags & (os.O_WRONLY | os.O_RDWR)))
        return fd

    builtins.open, os.open = _patched_open, _patched_os_open
    '''
)


def _killer_env(tmp_path, folder, pattern):
    (tmp_path / "killer").mkdir(exist_ok=True)
    (tmp_path / "killer" / "sitecustomize.py").write_text(_KILLER)
    flag = tmp_path / "armed"
    env = {
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "killer"), os.environ.get("PYTHONPATH", "")]),
        "LF_KILL_ON_WRITE": os.pathsep.join([str(os.path.realpath(folder)), pattern, str(flag)]),
    }
    return env, flag


def _put_label(url, image_id, data: bytes):
    files = {"label": ("l.nii.gz", data)}
    return requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": "final"}, files=files, timeout=120)


def _wait_dead(srv, timeout=60):
    srv.proc.wait(timeout)
    assert srv.proc.returncode == -9, "the fault injection should have killed the server at the write"


@pytest.mark.slow
def test_a_server_killed_while_writing_a_label_keeps_the_old_one(datastore_copy, app_copy, start_server, tmp_path):
    label = datastore_copy / "labels" / "final" / "torso_3mm.nii.gz"
    old = label.read_bytes()
    env, flag = _killer_env(tmp_path, label.parent, "*")
    conf = {"models": "all", "skip_scoring": "true"}
    srv = start_server(datastore_copy, app_copy, conf=conf, env=env)
    ok = read_image(label)
    new = write_image(ok.with_array(np.zeros_like(ok.array)), tmp_path / "new.nii.gz").read_bytes()
    flag.touch()
    with pytest.raises(requests.ConnectionError):
        _put_label(srv.url, "torso_3mm", new)
    _wait_dead(srv)
    assert label.read_bytes() == old, "a crash while a label is written must leave the old label"
    srv = start_server(datastore_copy, app_copy, conf=conf)
    got = requests.get(f"{srv.url}/datastore/label", params={"label": "torso_3mm", "tag": "final"}, timeout=60)
    assert got.status_code == 200 and got.content == old
    assert not list(label.parent.glob(".*.tmp")), "the interrupted write's temp file is removed at start"


@pytest.mark.slow
def test_a_server_killed_while_writing_the_index_restarts_with_every_label_and_latent(
    datastore_copy, app_copy, start_server, tmp_path
):
    path, info = _generated(tmp_path, 11)
    _add_generated(_open(datastore_copy), "gen_seed000011", path, info)
    labels_before = sorted(p.name for p in (datastore_copy / "labels" / "final").iterdir())
    env, flag = _killer_env(tmp_path, datastore_copy, "*datastore_v2.json*")
    conf = {"models": "all", "skip_scoring": "true"}
    srv = start_server(datastore_copy, app_copy, conf=conf, env=env)
    flag.touch()
    with pytest.raises(requests.ConnectionError):
        requests.put(
            f"{srv.url}/datastore/image/info",
            params={"image": "torso_3mm"},
            data={"info": json.dumps({"note": "x"})},
            timeout=60,
        )
    _wait_dead(srv)
    model_dir = app_copy / "model"
    (model_dir / ".segmentation.pt.k1ll3d.tmp").write_bytes(b"half a model")  # what a killed training leaves
    srv = start_server(datastore_copy, app_copy, conf=conf)
    info = requests.get(f"{srv.url}/datastore/image/info", params={"image": "gen_seed000011"}, timeout=60).json()
    assert info[LATENT_KEY]["w"] == W
    ds = requests.get(f"{srv.url}/datastore/", params={"output": "all"}, timeout=60).json()
    assert sorted(k for k, v in ds["objects"].items() if v["labels"].get("final")) == sorted(
        n.removesuffix(".nii.gz") for n in labels_before
    )
    assert not list(model_dir.glob("*.tmp")), "temp model files of a killed write are removed at start"
    assert not list(datastore_copy.glob(".*.tmp"))


def _training_pids(server_pid):
    """The server's training subprocesses (`python -m monailabel.interfaces.utils.app -m train ...`)."""
    out = []
    for p in psutil.Process(server_pid).children(recursive=True):
        try:
            cmd = p.cmdline()
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
        if "monailabel.interfaces.utils.app" in cmd and "train" in cmd:
            out.append(p)
    return out


@pytest.mark.slow
def test_killed_training_resumes_and_keeps_labels(datastore_copy, app_copy, start_server):
    conf = {**TINY, "stylegan2_total_kimg": "0.064", "stylegan2_snapshot_kimg": "0.008"}
    srv = start_server(datastore_copy, app_copy, conf=conf)
    client = MONAILabelClient(srv.url)
    labels_before = sorted(p.name for p in (datastore_copy / "labels" / "final").iterdir())
    client.train_start("stylegan2", {})
    stats_file = app_copy / "model" / "stylegan2_train_stats.json"
    t0 = time.time()
    while not stats_file.exists() and time.time() - t0 < 600:
        time.sleep(0.2)
    assert stats_file.exists(), "a snapshot should appear"
    pids = _training_pids(srv.proc.pid)
    assert pids, "training runs in a subprocess"
    for p in pids:
        os.kill(p.pid, signal.SIGKILL)
    wait_for_training(client, timeout=120, poll=0.5)
    done_before = float(json.loads(stats_file.read_text())["kimg"])
    assert 0 < done_before < 0.064, "killed before the end"
    _train(client, "stylegan2")
    assert float(json.loads(stats_file.read_text())["kimg"]) >= 0.064
    resumed = [float(k) for k in re.findall(r"resumed \S+ at ([0-9.]+) kimg", srv.log.read_text())]
    assert resumed and resumed[0] >= done_before, (
        "the second training must resume from the last snapshot, not start over"
    )
    assert sorted(p.name for p in (datastore_copy / "labels" / "final").iterdir()) == labels_before
