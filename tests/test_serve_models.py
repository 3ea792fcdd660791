"""`labelfactory serve --models DIR`: each deployment reads and writes its own models folder; the default is a
working copy of the sample's shipped models; the sample served and its label map are chosen and said."""

from __future__ import annotations

import pytest

from labelfactory import serve
from labelfactory.cli import main


@pytest.fixture
def started(monkeypatch):
    """Runs `labelfactory serve ...` up to the exec; returns the server command lines it would have run."""
    commands = []
    monkeypatch.setattr(serve.os, "execve", lambda path, cmd, env: commands.append(cmd))
    return commands


def conf_of(cmd: list[str]) -> dict[str, str]:
    return {cmd[i + 1]: cmd[i + 2] for i, a in enumerate(cmd) if a == "--conf"}


def test_two_deployments_serve_their_own_models_folders(tmp_path, started):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        main(["serve", "--studies", str(tmp_path / name), "--models", str(tmp_path / name / "models")])
    a, b = (conf_of(c) for c in started)
    assert a["model_dir"] == str(tmp_path / "a" / "models") and b["model_dir"] == str(tmp_path / "b" / "models")
    assert (tmp_path / "a" / "models").is_dir() and not any((tmp_path / "a" / "models").iterdir())  # never seeded
    assert "labels" not in a  # a folder of one's own: the map its models record


def test_default_serves_a_working_copy_of_the_samples_models_and_says_which(tmp_path, started, monkeypatch, capsys):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "segmentation.pt").write_bytes(b"shipped")
    (shipped / "segmentation.pt.sha256").write_text("x  segmentation.pt\n")
    sample = serve.Sample("openkbp", serve.SAMPLES["openkbp"].datastore, shipped, "openkbp")
    monkeypatch.setitem(serve.SAMPLES, "openkbp", sample)
    work = tmp_path / "runs"
    (work / "openkbp" / "models").mkdir(parents=True)
    (work / "openkbp" / "models" / "segmentation.pt").write_bytes(b"trained here")
    main(["serve", "--sample", "openkbp", "--workdir", str(work)])
    conf = conf_of(started[0])
    assert conf["model_dir"] == str(work / "openkbp" / "models") and conf["labels"] == "openkbp"
    assert (work / "openkbp" / "models" / "segmentation.pt").read_bytes() == b"trained here"  # never overwritten
    assert (work / "openkbp" / "datastore" / "validation_pt_201.nii.gz").is_file()
    assert "the openkbp sample (chosen with --sample)" in capsys.readouterr().out


def test_auto_falls_back_to_the_totalsegmentator_demo_while_openkbp_ships_no_models(tmp_path, monkeypatch):
    monkeypatch.setitem(serve.SAMPLES, "openkbp", serve.Sample("openkbp", tmp_path, tmp_path / "none", "openkbp"))
    sample, why = serve.choose_sample("auto")
    assert sample.name == "totalsegmentator" and "holds no models yet" in why
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "stylegan2.pt").write_bytes(b"g")
    assert serve.choose_sample("auto")[0].name == "openkbp"


def test_serve_binds_beyond_loopback_only_with_authentication(tmp_path, monkeypatch, capsys):
    envs = []
    monkeypatch.setattr(serve.os, "execve", lambda path, cmd, env: envs.append(env))
    monkeypatch.delenv("MONAI_LABEL_AUTH_ENABLE", raising=False)
    base = ["serve", "--studies", str(tmp_path), "--models", str(tmp_path / "m")]
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        assert main([*base, "--host", host]) != 0
        assert "authentication is off" in capsys.readouterr().err
    assert not envs
    main([*base, "--host", "localhost"])
    main([*base, "--host", "::1"])
    main([*base, "--host", "0.0.0.0", "--insecure-no-auth"])
    assert "without authentication" in capsys.readouterr().out
    realm = "https://idp.example.org/realms/monailabel"
    main([*base, "--host", "0.0.0.0", "--auth-realm", realm, "--auth-client-id", "lf", "--model-routes"])
    assert envs[-1]["MONAI_LABEL_AUTH_ENABLE"] == "true" and envs[-1]["MONAI_LABEL_AUTH_REALM_URI"] == realm
    assert envs[-1]["MONAI_LABEL_AUTH_CLIENT_ID"] == "lf" and envs[-1]["LABELFACTORY_MODEL_ROUTES"] == "true"
    assert "LABELFACTORY_MODEL_ROUTES" not in envs[0], "model routes stay off unless asked for"
    monkeypatch.setenv("MONAI_LABEL_AUTH_ENABLE", "true")  # auth configured in the environment counts too
    main([*base, "--host", "0.0.0.0"])


def test_the_samples_models_fall_back_to_the_samples_own_label_map(tmp_path, started):
    main(["serve", "--sample", "openkbp", "--workdir", str(tmp_path / "runs"), "--studies", str(tmp_path)])
    conf = conf_of(started[0])
    assert "labels" not in conf and conf["labels_fallback"] == "openkbp"  # the models' own map first, then this
    main(["serve", "--studies", str(tmp_path), "--models", str(tmp_path / "m")])
    assert "labels_fallback" not in conf_of(started[1])  # neither the sample's data nor its models
