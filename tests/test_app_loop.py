"""The product end to end, as Slicer and a scripted loop meet it: a real server on 127.0.0.1 and the real client.

info -> train stylegan2 -> next sample -> infer datasetgan -> save label (x3) -> train datasetgan ->
infer again -> synthesis -> train segmentation -> infer segmentation on a real volume (3D in, 3D out,
same geometry) -> train and infer clamnet; a corrupt model file never replaces the one being served.
Tiny sizes (32^2 GAN, a few steps) keep it to minutes. Scoring after each training is off here (each run
is a subprocess that builds the app, ~10 s): the next-sample strategy scores its own candidates, and
scoring runs are tested in test_server. A training killed with -9: test_crash_safety.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient

from labelfactory.annotator import hu_rule_annotator
from labelfactory.io import read_image
from labelfactory.labels import LABEL_NAMES
from labelfactory.loop import run_loop, wait_for_training

pytestmark = pytest.mark.slow

TINY = {
    "models": "all",
    "stylegan2_preset": "demo",
    "stylegan2_resolution": "32",
    "stylegan2_total_kimg": "0.016",
    "stylegan2_snapshot_kimg": "0.008",
    "stylegan2_batch_size": "4",
    "datasetgan_members": "2",
    "datasetgan_max_epochs": "2",
    "interpreter_pixels_per_image": "128",  # the older conf prefix still read
    "segmentation_steps": "4",
    "segmentation_size": "32",
    "clamnet_steps": "2",
    "clamnet_size": "32",
    "candidates": "3",
    "skip_scoring": "true",
}


def _infer(url, model, image, params=None):
    r = requests.post(
        f"{url}/infer/{model}",
        params={"image": image, "output": "image"},
        data={"params": json.dumps({"result_extension": ".nii.gz", **(params or {})})},
        timeout=600,
    )
    return r


def _train(client, model, params=None):
    client.train_start(model, params or {})
    status = wait_for_training(client, timeout=900, poll=1.0)
    assert status.get("status") == "DONE", json.dumps(status)[-3000:]
    return status


def test_interactive_loop_end_to_end(datastore_copy, app_copy, start_server, tmp_path):
    srv = start_server(datastore_copy, app_copy, conf=TINY)
    url, client = srv.url, MONAILabelClient(srv.url)

    info = client.info()
    assert {"datasetgan", "segmentation", "clamnet", "synthesis"} <= set(info["models"])
    assert {"stylegan2", "datasetgan", "segmentation", "clamnet", "interpreter"} <= set(info["trainers"])  # + old name
    assert "deprecated" in info["trainers"]["interpreter"]["description"]
    assert {"generated_uncertain", "random"} <= set(info["strategies"])
    assert info["labels"] == LABEL_NAMES

    # before any training: clear 409s, never random weights
    r = requests.post(f"{url}/activelearning/generated_uncertain", json={}, timeout=60)
    assert r.status_code == 409 and "train stylegan2 first" in r.json()["detail"]
    r = _infer(url, "segmentation", "torso_3mm")
    assert r.status_code == 409 and "train segmentation first" in r.text

    _train(client, "stylegan2")
    assert (app_copy / "model" / "stylegan2.pt").is_file()

    # three rounds of next sample -> (no interpreter yet) -> annotate -> save; then retrain the interpreter
    records = run_loop(url, rounds=3, annotate=hu_rule_annotator, retrain_every=3, train_params={}, log=lambda m: None)
    assert [r["train"] for r in records if "train" in r] == ["DONE"]
    ids = [r["image"] for r in records]
    assert len(set(ids)) == 3 and all(i.startswith("gen_seed") for i in ids)
    assert {r["picked"] for r in records} == {"random: no interpreter yet"}  # each pick says why
    for i in ids:  # each sample was stored with its latent, and its submitted label kept
        info_i = requests.get(f"{url}/datastore/image/info", params={"image": i}, timeout=30).json()
        assert len(info_i["labelfactory"]["w"]) > 0 and "seed" in info_i["labelfactory"]
        assert (datastore_copy / "labels" / "final" / f"{i}.nii.gz").is_file()
        assert (
            json.loads((datastore_copy / f"{i}.labelfactory.json").read_text())["labelfactory"]["w"]
            == info_i["labelfactory"]["w"]
        )

    # the interpreter now segments a new generated image, from its recorded w, on the image's own grid
    explores, nxt = client.next_sample("generated_uncertain", {}), client.next_sample("generated_uncertain", {})
    assert explores["picked"] == "random: 1 in 2 images explores"  # the 4th image: the default explores 1 in 2
    assert nxt["uncertainty"] is not None, "with an interpreter, candidates are scored by uncertainty"
    assert nxt["picked"] == "the most uncertain candidate"
    windows = []  # each sample is the pick of a window of seeds no earlier window held
    for i in [*ids, explores["id"], nxt["id"]]:
        info_i = requests.get(f"{url}/datastore/image/info", params={"image": i}, timeout=30).json()
        first, last = info_i["candidate_seeds"]
        assert first <= info_i["labelfactory"]["seed"] <= last and last - first + 1 == int(TINY["candidates"])
        windows.append(range(first, last + 1))
    assert all(max(a) < min(b) for a, b in itertools.pairwise(windows))
    r = _infer(url, "datasetgan", nxt["id"])
    assert r.status_code == 200, r.text
    mask_file = tmp_path / "m.nii.gz"
    mask_file.write_bytes(r.content)
    mask, image = read_image(mask_file), read_image(datastore_copy / f"{nxt['id']}.nii.gz")
    assert mask.array.shape == image.array.shape == (32, 32)
    assert set(np.unique(mask.array)) <= set(LABEL_NAMES.values())
    forged = {"labelfactory": {"seed": 1, "truncation_psi": 0.7, "w": [0.0] * 16}}  # provenance only from the datastore
    r = requests.post(
        f"{url}/infer/datasetgan", params={"image": nxt["id"]}, data={"params": json.dumps(forged)}, timeout=60
    )
    assert r.status_code == 400 and "set by the server" in r.text

    # synthesis: a new pair on request, reproducible from its seed
    a, b = _infer(url, "synthesis", "seed000777"), _infer(url, "synthesis", "seed000777")
    assert a.status_code == 200 and a.content == b.content
    r = requests.post(
        f"{url}/infer/synthesis",
        params={"image": "seed000778", "output": "json"},
        data={"params": json.dumps({"add_to_datastore": True})},
        timeout=300,
    )
    assert r.status_code == 200 and r.json()["image_id"] == "gen_seed000778"
    assert "generated_image_file" not in r.json() and (datastore_copy / "gen_seed000778.nii.gz").is_file()

    # downstream segmenter: 3D volume in, 3D label out on the same grid
    _train(client, "segmentation")
    r = _infer(url, "segmentation", "torso_3mm")
    assert r.status_code == 200, r.text
    (tmp_path / "s.nii.gz").write_bytes(r.content)
    seg, vol = read_image(tmp_path / "s.nii.gz"), read_image(datastore_copy / "torso_3mm.nii.gz")
    assert seg.array.shape == vol.array.shape
    assert (
        np.allclose(seg.spacing, vol.spacing)
        and np.allclose(seg.origin, vol.origin)
        and np.allclose(seg.direction, vol.direction)
    )

    # ClamNet: weak marker map on the dissection study
    _train(client, "clamnet")
    r = _infer(url, "clamnet", "thorax_aorta")
    assert r.status_code == 200, r.text
    (tmp_path / "c.nii.gz").write_bytes(r.content)
    assert (
        read_image(tmp_path / "c.nii.gz").array.shape == read_image(datastore_copy / "thorax_aorta.nii.gz").array.shape
    )
    # image-level labels through the API win over the CSV: slice 0 of the dissection study marked normal
    abnormal = json.loads((app_copy / "model" / "clamnet_train_stats.json").read_text())["abnormal"]
    info = {"image_labels": [{"slice": 0, "label": "normal"}]}
    r = requests.put(
        f"{url}/datastore/image/info", params={"image": "thorax_aorta"}, data={"info": json.dumps(info)}, timeout=30
    )
    assert r.status_code == 200, r.text
    _train(client, "clamnet")
    assert json.loads((app_copy / "model" / "clamnet_train_stats.json").read_text())["abnormal"] == abnormal - 1

    # a corrupt model file never replaces the one being served
    good = _infer(url, "segmentation", "torso_3mm").content
    model = app_copy / "model" / "segmentation.pt"
    model.write_bytes(model.read_bytes()[:2000])
    r = _infer(url, "segmentation", "torso_3mm")
    assert r.status_code == 200 and r.content == good
    assert requests.get(f"{url}/info/", timeout=30).status_code == 200
