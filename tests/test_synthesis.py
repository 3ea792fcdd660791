"""The labelling factory: layout, drop of the most uncertain, reproducibility, resume, `labelfactory synthesize`."""

import csv
import json

import numpy as np
import pytest
import torch

from labelfactory.cli import main
from labelfactory.datasetgan import EnsembleConfig, Interpreter, PixelEnsemble, TapLayout, save_interpreter
from labelfactory.datasetgan.synthesis import KINDS, synthesize
from labelfactory.datasetgan.taps import ws_from_seeds
from labelfactory.errors import LabelFactoryError
from labelfactory.io import read_image, read_seg_nrrd
from labelfactory.labels import LABEL_NAMES
from labelfactory.latent_record import TRUNCATION_PSI
from labelfactory.stylegan2.checkpoint import load_generator, publish_generator
from labelfactory.stylegan2.identity import generated_to_image
from labelfactory.stylegan2.networks import Generator

KW = dict(z_dim=32, w_dim=32, img_resolution=32, channel_base=512, channel_max=32, mapping_layers=2)
K = max(LABEL_NAMES.values()) + 1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny published generator and an (untrained, randomly initialised) interpreter file beside it."""
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    publish_generator(Generator(**KW).eval(), KW, d / "stylegan2.pt", config={}, data={}, kimg=0.0)
    G = load_generator(d / "stylegan2.pt")
    layout = TapLayout.of(G)
    ens = PixelEnsemble(EnsembleConfig(layout.channels, layout.resolutions, 32, K, members=3, hidden=(8, 8))).eval()
    save_interpreter(d / "datasetgan.pt", ens, LABEL_NAMES, {}, {}, G)
    return d, Interpreter(G, ens, LABEL_NAMES)


def manifest(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_generated_to_image_is_hu_int16():
    img = generated_to_image(torch.tensor([[[[-1.0, 0.0], [0.5, 1.0]]]]))
    assert img.array.dtype == np.int16 and img.array.tolist() == [[-1000, 0], [500, 1000]]
    assert img.spacing == (1.0, 1.0) and img.ndim == 2


def test_layout_drop_and_manifest(models, tmp_path):
    _, interp = models
    res = synthesize(interp, range(6), tmp_path, truncation_psi=0.7, drop_fraction=1 / 3, png=True, progress=False)
    assert res.generated == list(range(6)) and len(res.kept) == 4 and len(res.dropped) == 2
    rows = manifest(tmp_path / "manifest.csv")
    assert [int(r["seed"]) for r in rows] == res.kept
    dropped_rows = manifest(tmp_path / "dropped" / "manifest.csv")
    assert min(float(r["uncertainty"]) for r in dropped_rows) >= max(float(r["uncertainty"]) for r in rows)
    for r in rows:
        image = read_image(tmp_path / r["image"])
        label = read_image(tmp_path / r["label"])
        assert image.array.shape == label.array.shape == (32, 32)
        assert image.array.dtype == np.int16 and -1000 <= image.array.min() and image.array.max() <= 1000
        counts = [int(r[f"pixels_{n.replace(' ', '_')}"]) for n in sorted(LABEL_NAMES, key=LABEL_NAMES.get)]
        assert counts == np.bincount(label.array.reshape(-1), minlength=K).tolist()
        seg = read_seg_nrrd(tmp_path / r["label"].replace(".nii.gz", ".seg.nrrd"), LABEL_NAMES)
        assert np.array_equal(seg.array.reshape(32, 32), label.array)
        assert (tmp_path / r["image"].replace(".nii.gz", ".png")).exists()
    for s in res.dropped:
        assert not (tmp_path / "images" / f"seed{s:06d}.nii.gz").exists()
        assert (tmp_path / "dropped" / "images" / f"seed{s:06d}.nii.gz").exists()
    assert (tmp_path / "preview.png").stat().st_size > 1000


def test_reproducible_and_resumable(models, tmp_path):
    _, interp = models
    synthesize(interp, range(4), tmp_path / "a", drop_fraction=0.25, progress=False)
    res = synthesize(interp, range(8), tmp_path / "a", drop_fraction=0.25, progress=False)
    assert res.generated == [4, 5, 6, 7]  # the first four were skipped
    fresh = synthesize(interp, range(8), tmp_path / "b", drop_fraction=0.25, progress=False)
    assert fresh.kept == res.kept and fresh.dropped == res.dropped
    assert manifest(tmp_path / "a" / "manifest.csv") == manifest(tmp_path / "b" / "manifest.csv")
    for s in res.kept:
        for kind in ("images", "labels"):
            a = read_image(tmp_path / "a" / kind / f"seed{s:06d}.nii.gz").array
            assert np.array_equal(a, read_image(tmp_path / "b" / kind / f"seed{s:06d}.nii.gz").array)
    assert sorted(p.name for p in (tmp_path / "a" / "images").iterdir()) == [f"seed{s:06d}.nii.gz" for s in res.kept]
    with pytest.raises(LabelFactoryError, match="new folder"):
        synthesize(interp, range(2), tmp_path / "a", truncation_psi=0.5, progress=False)


def pairs(folder, seeds):
    """seed -> (image, mask, uncertainty) arrays and its record, read back from a synthesis folder."""
    records = {r["seed"]: r for r in map(json.loads, (folder / "records.jsonl").read_text().splitlines())}
    return {
        s: (
            *(read_image(folder / kind / f"seed{s:06d}.nii.gz").array.tobytes() for kind in KINDS),
            records[s]["uncertainty"],
        )
        for s in seeds
    }


def test_a_pair_does_not_depend_on_how_the_seeds_are_split(models, tmp_path):
    """Seeds 0-9 in one run, in two (0-4 then 5-9) and as two shards (odd seeds backwards, even seeds): byte-equal
    images, masks and uncertainty maps, equal scores; each seed as the fixed block [4k, 4k + 4) computes it."""
    _, interp = models
    run = dict(drop_fraction=0, progress=False, block=4)
    synthesize(interp, range(10), tmp_path / "one", **run)
    synthesize(interp, range(5), tmp_path / "two", **run)
    synthesize(interp, range(5, 10), tmp_path / "two", **run)
    synthesize(interp, range(9, 0, -2), tmp_path / "shards", **run)
    synthesize(interp, range(0, 10, 2), tmp_path / "shards", **run)
    one = pairs(tmp_path / "one", range(10))
    assert pairs(tmp_path / "two", range(10)) == one and pairs(tmp_path / "shards", range(10)) == one
    lab = interp.label(ws_from_seeds(interp.G, [4, 5, 6, 7], TRUNCATION_PSI))  # the block of seed 5
    alone = interp.label(ws_from_seeds(interp.G, [5], TRUNCATION_PSI))  # rounds otherwise (the test's premise)
    assert not torch.equal(alone.uncertainty[0], lab.uncertainty[1])
    assert one[5][2] == lab.uncertainty[1].numpy().astype(np.float32).tobytes() and one[5][3] == float(lab.score[1])
    records = [json.loads(line) for line in (tmp_path / "one" / "records.jsonl").read_text().splitlines()]
    assert {r["block"] for r in records} == {4}


def test_a_folder_keeps_its_block(models, tmp_path):
    """A rerun continues with the folder's B; another B is refused; a folder of before blocks continues per seed."""
    _, interp = models
    synthesize(interp, range(3), tmp_path / "a", drop_fraction=0, progress=False, block=2)
    synthesize(interp, range(6), tmp_path / "a", drop_fraction=0, progress=False)
    assert pairs(tmp_path / "a", range(6)) == pairs_of(interp, tmp_path / "b", range(6), block=2)
    with pytest.raises(LabelFactoryError, match="new folder"):
        synthesize(interp, range(8), tmp_path / "a", drop_fraction=0, progress=False, block=4)
    legacy = tmp_path / "legacy"
    synthesize(interp, range(2), legacy, drop_fraction=0, progress=False, block=1)
    log = legacy / "records.jsonl"
    log.write_text(
        "".join(
            json.dumps({k: v for k, v in json.loads(r).items() if k != "block"}) + "\n"
            for r in log.read_text().splitlines()
        )
    )
    synthesize(interp, range(4), legacy, drop_fraction=0, progress=False)
    assert pairs(legacy, range(4)) == pairs_of(interp, tmp_path / "per-seed", range(4), block=1)


def pairs_of(interp, folder, seeds, block):
    synthesize(interp, seeds, folder, drop_fraction=0, progress=False, block=block)
    return pairs(folder, seeds)


def test_cli_synthesize_and_missing_models(models, tmp_path, capsys):
    d, _ = models
    rc = main(
        [
            "synthesize",
            "--generator",
            str(d / "stylegan2.pt"),
            "--out",
            str(tmp_path / "o"),
            "--seeds",
            "3,5-6",
            "--drop-fraction",
            "0",
            "--no-progress",
        ]
    )
    assert rc == 0 and len(manifest(tmp_path / "o" / "manifest.csv")) == 3
    rc = main(
        [
            "synthesize",
            "--generator",
            str(d / "stylegan2.pt"),
            "--interpreter",
            str(tmp_path / "none.pt"),
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2 and "train datasetgan first" in capsys.readouterr().err
    rc = main(["synthesize", "--generator", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x")])
    assert rc == 2 and "train stylegan2 first" in capsys.readouterr().err
    rc = main(["synthesize", "--generator", str(d / "stylegan2.pt"), "--out", str(tmp_path / "x"), "--seeds", "a-b"])
    assert rc == 2 and "--seeds" in capsys.readouterr().err


def test_a_folder_keeps_its_precision_and_records_it(models, tmp_path):
    """Pairs record the interpreter's arithmetic; a bf16 interpreter cannot add to an fp32 folder."""
    d, interp = models
    G = load_generator(d / "stylegan2.pt")
    synthesize(interp, range(2), tmp_path / "a", drop_fraction=0, progress=False)
    records = [json.loads(r) for r in (tmp_path / "a" / "records.jsonl").read_text().splitlines()]
    assert interp.precision == "fp32" and {r["precision"] for r in records} == {"fp32"}  # auto on the CPU
    bf16 = Interpreter(G, interp.ensemble, LABEL_NAMES, precision="bf16")
    with pytest.raises(LabelFactoryError, match="new folder"):
        synthesize(bf16, range(4), tmp_path / "a", drop_fraction=0, progress=False)
