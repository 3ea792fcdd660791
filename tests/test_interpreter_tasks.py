"""MONAI Label adapters: trainer `datasetgan` over the datastore's labelled generated images, infer `datasetgan`."""

import numpy as np
import pytest
import torch
from monailabel.datastore.local import LocalDatastore

from labelfactory.datasetgan import generate_with_taps, load_interpreter, ws_from_seeds, ws_from_w
from labelfactory.datasetgan.train import DatasetGANConfig
from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image, read_image, write_image
from labelfactory.stylegan2.checkpoint import load_generator, publish_generator
from labelfactory.stylegan2.identity import generated_to_image, generator_identity
from labelfactory.stylegan2.networks import Generator
from labelfactory.tasks.datasetgan import DatasetGANInfer, DatasetGANModels, DatasetGANTrain
from labelfactory.tasks.datastore import LabelFactoryDatastore

KW = dict(z_dim=32, w_dim=32, img_resolution=32, channel_base=512, channel_max=32, mapping_layers=2)
FAST = DatasetGANConfig(members=2, hidden=(8, 8), max_epochs=3, pixels_per_image=128)


@pytest.fixture
def setup(tmp_path):
    model_dir, studies = tmp_path / "model", tmp_path / "studies"
    studies.mkdir()
    torch.manual_seed(0)
    publish_generator(Generator(**KW).eval(), KW, model_dir / "stylegan2.pt", config={}, data={}, kimg=0.0)
    G = load_generator(model_dir / "stylegan2.pt")
    ds = LocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    return model_dir, ds, G, tmp_path


def add_generated(ds, G, seed, tmp_path, label=True):
    ws = ws_from_seeds(G, [seed], 0.7)
    img, _ = generate_with_taps(G, ws)
    image = generated_to_image(img)
    path = write_image(image, tmp_path / f"gen{seed}.nii.gz")
    info = {
        "labelfactory": {
            "seed": seed,
            "truncation_psi": 0.7,
            "w": ws[0, 0].tolist(),
            "generator": generator_identity(G),
        }
    }
    if isinstance(ds, LabelFactoryDatastore):  # provenance only as the server's synthesis sets it
        image_id = ds.add_image(f"gen{seed}", str(path), {}, latent=info["labelfactory"])
    else:
        image_id = ds.add_image(f"gen{seed}", str(path), info)
    if label:
        lab = write_image(image.with_array((img[0, 0] > 0).numpy().astype(np.uint8)), tmp_path / f"lab{seed}.nii.gz")
        ds.save_label(image_id, str(lab), "final", {})
    return image_id


def test_train_then_infer(setup):
    model_dir, ds, G, tmp = setup
    ids = [add_generated(ds, G, s, tmp) for s in range(3)]
    add_generated(ds, G, 99, tmp, label=False)
    plain = write_image(
        Image(np.zeros((32, 32), np.int16), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0)), tmp / "real.nii.gz"
    )
    ds.add_image("real", str(plain), {})
    ds.save_label("real", str(plain), "final", {})

    trainer = DatasetGANTrain(model_dir, FAST)
    stats = trainer({}, ds)
    assert stats["images"] == 3 and trainer.stats()["epochs"] == len(stats["epoch_loss"])
    saved = load_interpreter(model_dir / "datasetgan.pt", G)
    assert saved.ensemble.config.members == 2

    infer = DatasetGANInfer(DatasetGANModels(model_dir))
    out, meta = infer({"image": ds.get_image_uri(ids[1]), **latent(ds, ids[1])})
    mask = read_image(out).array
    w = torch.tensor(ds.get_image_info(ids[1])["labelfactory"]["w"])
    expected = saved.label(ws_from_w(G, w))
    assert np.array_equal(mask, expected.mask[0].numpy())
    assert meta["label_names"]["liver"] == 1 and "background" not in meta["label_names"]
    assert meta["uncertainty"] == pytest.approx(float(expected.score[0]), rel=1e-5, abs=1e-7)  # this image's score

    with pytest.raises(LabelFactoryError, match="no recorded latent"):
        infer({"image": ds.get_image_uri("real")})


def latent(ds, image_id):
    """What the app adds to a datasetgan request: the image's latent record from its datastore info."""
    return {"labelfactory": ds.get_image_info(image_id)["labelfactory"]}


def test_missing_models_and_data(setup):
    model_dir, ds, G, tmp = setup
    with pytest.raises(LabelFactoryError, match="train datasetgan") as e:
        DatasetGANTrain(model_dir, FAST)({}, ds)
    assert e.value.status == 409
    image_id = add_generated(ds, G, 5, tmp)
    with pytest.raises(LabelFactoryError, match="train datasetgan first") as e:
        DatasetGANInfer(DatasetGANModels(model_dir))({"image": ds.get_image_uri(image_id), **latent(ds, image_id)})
    assert e.value.status == 409
    (model_dir / "stylegan2.pt").unlink()
    with pytest.raises(LabelFactoryError, match="train stylegan2 first"):
        DatasetGANTrain(model_dir, FAST)({}, ds)
    with pytest.raises(LabelFactoryError, match="train stylegan2 first"):
        DatasetGANInfer(DatasetGANModels(model_dir))({"image": ds.get_image_uri(image_id), **latent(ds, image_id)})


def test_label_of_the_wrong_shape_is_refused(setup):
    model_dir, ds, G, tmp = setup
    image_id = add_generated(ds, G, 1, tmp, label=False)
    bad = write_image(
        Image(np.zeros((16, 16), np.uint8), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0)), tmp / "bad.nii.gz"
    )
    ds.save_label(image_id, str(bad), "final", {})
    with pytest.raises(LabelFactoryError, match="differs from its image"):
        DatasetGANTrain(model_dir, FAST)({}, ds)


def test_offline_records_read_the_provenance_sidecars(setup):
    """`train-datasetgan --datastore DIR` (no server) finds what the server trainer finds: sidecar latents, labels."""
    from labelfactory.datasetgan.records import records_from_datastore, records_from_datastore_folder
    from labelfactory.tasks.datastore import LabelFactoryDatastore

    _, _, G, tmp = setup
    folder = tmp / "lf_store"
    folder.mkdir()
    ds = LabelFactoryDatastore(str(folder), extensions=["*.nii.gz"], auto_reload=False, label_names={"bg": 0, "fg": 1})
    ids = [add_generated(ds, G, s, tmp) for s in (3, 5)]
    add_generated(ds, G, 7, tmp, label=False)
    offline = records_from_datastore_folder(folder)
    assert [i for i, _, _ in offline] == sorted(ids)
    for (i, rec, path), (j, rec2, path2) in zip(offline, records_from_datastore(ds), strict=True):
        assert (i, rec["seed"], rec["w"], path) == (j, rec2["seed"], rec2["w"], path2)
    with pytest.raises(LabelFactoryError, match="no such datastore folder"):
        records_from_datastore_folder(tmp / "absent")


def test_generated_uncertain_explores_every_nth_image_and_says_why(setup):
    """With an interpreter: the most uncertain of the window, except every `explore`-th generated image, which is
    the window's first (random) seed; each pick records why. An ensemble never shown a class is not uncertain on
    it, so only such picks can find what the first labels missed."""
    from labelfactory.tasks.active_learning import CANDIDATE_SEEDS, EXPLORE, PICKED, GeneratedUncertain

    model_dir, ds, G, tmp = setup
    for s in range(3):
        add_generated(ds, G, s, tmp)
    DatasetGANTrain(model_dir, FAST)({}, ds)
    models = DatasetGANModels(model_dir)
    interp = models.interpreter()
    strategy = GeneratedUncertain(models, candidates=6, truncation_psi=0.7, explore=2)
    picks = [strategy({}, ds) for _ in range(3)]  # the 4th, 5th and 6th generated images
    for p, explores in zip(picks, (True, False, True), strict=True):
        first, last = ds.get_image_info(p["id"])[CANDIDATE_SEEDS]
        scores = interp.label(ws_from_seeds(G, list(range(first, last + 1)), 0.7)).score
        expected = first if explores else first + int(scores.argmax())
        assert p["seed"] == expected and ("random" in p[PICKED]) == explores, p
        assert ds.get_image_info(p["id"])[PICKED] == p[PICKED]
        assert p["uncertainty"] == pytest.approx(float(scores[p["seed"] - first]), rel=1e-4, abs=1e-6)
    never = GeneratedUncertain(models, candidates=6, truncation_psi=0.7, explore=0)  # pure uncertainty
    assert never({}, ds)[PICKED] == "the most uncertain candidate"
    assert GeneratedUncertain(models).explore == EXPLORE == 2  # the default explores: 1 in 2 images
    with pytest.raises(LabelFactoryError, match=r"option explore=-1: expected int .*>= 0"):
        strategy({"explore": -1}, ds)
    with pytest.raises(LabelFactoryError, match="option explore='often': expected int"):
        strategy({"explore": "often"}, ds)


class TableInterpreter:
    """A stand-in interpreter: candidate i (its ws[i, 0, 0] == i) has mask `masks[i]` and score `scores[i]`."""

    def __init__(self, masks: list[np.ndarray], scores: list[float], label_names: dict[str, int]):
        self.masks, self.scores = torch.tensor(np.stack(masks)), torch.tensor(scores)
        self.label_names = label_names

    def label(self, ws):
        from labelfactory.datasetgan.labeller import Labelled

        i = ws[:, 0, 0].long()
        return Labelled(torch.zeros(len(i), 1, 4, 4), self.masks[i], torch.zeros(len(i), 4, 4), self.scores[i])


def organ_mask(*organs: int, pixels: int = 5) -> np.ndarray:
    """(4, 4) mask with `pixels` pixels of each of `organs` (at most 3 organs), the rest background."""
    mask = np.zeros(16, np.int64)
    for k, v in enumerate(organs):
        mask[k * 5 : k * 5 + pixels] = v
    return mask.reshape(4, 4)


def candidates(k: int) -> torch.Tensor:
    """(k, 2, 3) latents whose [i, 0, 0] is i (what TableInterpreter looks up)."""
    ws = torch.zeros(k, 2, 3)
    ws[:, 0, 0] = torch.arange(k)
    return ws


def test_pick_coverage_prefers_an_organ_no_label_holds():
    """coverage: the highest sum of 1 / (1 + labelled images with the organ) over the organs a candidate shows
    (>= SHOWN_PIXELS pixels), ties by uncertainty; uncertainty: the highest score. Hand-made candidates."""
    from labelfactory.tasks.active_learning import SHOWN_PIXELS, organ_counts, pick, rarity

    names = {"background": 0, "brainstem": 1, "larynx": 2, "mandible": 3}
    counts = organ_counts([organ_mask(1, 3), organ_mask(1), organ_mask(1, 3)])  # no larynx among the labels
    assert dict(counts) == {0: 3, 1: 3, 3: 2}
    assert rarity([1, 2, 3], counts) == pytest.approx(1 / 4 + 1 + 1 / 3)
    masks = [
        organ_mask(1, 3),  # 1/4 + 1/3, the most uncertain
        organ_mask(2),  # larynx: 1
        organ_mask(1, 2, pixels=SHOWN_PIXELS - 1),  # too few pixels to show either: 0
        organ_mask(2),  # larynx as well, less uncertain than candidate 1
    ]
    interp = TableInterpreter(masks, [0.9, 0.3, 0.5, 0.2], names)
    chosen = pick(candidates(4), interp, counts, n=3, explore=2, rule="coverage")
    assert (chosen.index, chosen.uncertainty) == (1, pytest.approx(0.3))
    assert chosen.why == "coverage: the rarest organs (larynx; rarity 1.000)"
    assert pick(candidates(4), interp, counts, n=3, explore=2).index == 0  # the default rule: uncertainty
    larynx_thrice = organ_counts([organ_mask(2)] * 3)  # now brainstem and mandible are the unlabelled: 1 + 1
    assert pick(candidates(4), interp, larynx_thrice, 3, 2, "coverage").index == 0


def test_pick_explores_the_first_candidate_reproducibly():
    """Without an interpreter, and at every `explore`-th image (1: every one, 0: never), the pick is the first
    candidate (the window's first seed, a random latent) whatever the rule; the same inputs give the same pick."""
    from labelfactory.tasks.active_learning import RULES, pick

    names = {"background": 0, "brainstem": 1}
    interp = TableInterpreter([organ_mask(), organ_mask(1)], [0.1, 0.8], names)
    for rule in RULES:
        assert pick(candidates(2), None, {}, n=7, explore=0, rule=rule).why == "random: no interpreter yet"
        for n, explore, first in ((4, 2, True), (5, 2, False), (5, 1, True), (4, 0, False)):
            chosen = pick(candidates(2), interp, {}, n, explore, rule)
            assert (chosen.index == 0) == first and chosen.why.startswith("random") == first, (rule, n, explore)
            assert pick(candidates(2), interp, {}, n, explore, rule) == chosen
    with pytest.raises(LabelFactoryError, match="option rule='diverse': expected one of uncertainty, coverage"):
        pick(candidates(2), interp, {}, 1, 2, "diverse")


def test_generated_uncertain_rule_coverage_is_pick_over_the_datastore_labels(setup):
    """The server's choice under `rule` coverage is `pick` over the window and the datastore's labels, recorded
    with the rule in the sample's info; the default rule stays uncertainty; an unknown rule is a 400."""
    from labelfactory.tasks.active_learning import (
        CANDIDATE_SEEDS,
        PICKED,
        RULE,
        GeneratedUncertain,
        labelled_organ_counts,
        pick,
    )

    model_dir, ds, G, tmp = setup
    for s in range(3):
        add_generated(ds, G, s, tmp)
    DatasetGANTrain(model_dir, FAST)({}, ds)
    models = DatasetGANModels(model_dir)
    assert GeneratedUncertain(models).rule == "uncertainty"
    counts = labelled_organ_counts(ds)
    assert counts[1] == 3  # every hand label (img > 0) holds value 1
    coverage = GeneratedUncertain(models, candidates=6, truncation_psi=0.7, explore=0, rule="coverage")
    got = coverage({}, ds)
    first, last = ds.get_image_info(got["id"])[CANDIDATE_SEEDS]
    ws = ws_from_seeds(G, list(range(first, last + 1)), 0.7)
    expected = pick(ws, models.interpreter(), counts, 4, 0, "coverage")
    assert got["seed"] == first + expected.index and got[PICKED] == expected.why and got[RULE] == "coverage"
    assert ds.get_image_info(got["id"])[RULE] == "coverage" and expected.why.startswith("coverage: ")
    assert coverage({"rule": "uncertainty"}, ds)[PICKED] == "the most uncertain candidate"
    with pytest.raises(LabelFactoryError, match="option rule='rare': expected one of") as e:
        coverage({"rule": "rare"}, ds)
    assert e.value.status == 400
