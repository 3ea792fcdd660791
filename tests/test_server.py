"""The app starts as a real MONAI Label server on the sample data and answers /info."""

from __future__ import annotations

import pytest
from monailabel.client import MONAILabelClient

from labelfactory.labels import LABEL_COLORS, LABEL_NAMES

pytestmark = pytest.mark.slow


def test_server_starts_on_the_sample_data_and_answers_info(datastore_copy, app_copy, start_server):
    srv = start_server(datastore_copy, app_copy, conf={"models": "all"})
    info = MONAILabelClient(srv.url).info()
    assert info["name"] == "labelfactory"
    assert info["labels"] == LABEL_NAMES
    assert set(info["label_colors"]) == set(LABEL_COLORS)
    assert all(0 <= c <= 1 for rgb in info["label_colors"].values() for c in rgb)
    assert info["datastore"]["total"] == 4  # every sample study is served
    assert info["datastore"]["completed"] == 2  # two carry final labels


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
