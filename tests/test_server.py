"""`labelfactory serve` puts demo models and a working copy of the sample in place (the server itself starts in
test_server_concurrency, whose first test checks /info on the sample data)."""

from __future__ import annotations


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
