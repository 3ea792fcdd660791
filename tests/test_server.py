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
