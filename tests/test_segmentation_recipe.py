"""The one segmentation training path: partial-label loss, batches as a function of (seed, step), resume, schedule,
augmentation, a fixed real share, fine-tuning, per-patient validation Dice."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from labelfactory.checkpoints import load_checkpoint
from labelfactory.errors import LabelFactoryError
from labelfactory.segmentation import train as seg_train
from labelfactory.segmentation.augment import nnunet2d
from labelfactory.segmentation.data import RealSlices
from labelfactory.segmentation.losses import PartialDiceCELoss, segmentation_loss
from labelfactory.segmentation.train import BatchPlan, SegmentationConfig, train_segmenter, validation_dice

S = 32
NAMES = {"background": 0, "a": 1, "b": 2}


def blobs(n: int, seed: int = 0, groups: list[str] | None = None) -> RealSlices:
    """n slices with a bright square (organ a) and a dark one (organ b) at random places."""
    g = torch.Generator().manual_seed(seed)
    images = torch.full((n, 1, S, S), -1.0)
    masks = torch.zeros(n, S, S, dtype=torch.uint8)
    for i in range(n):
        for value, level in ((1, 0.8), (2, 0.0)):
            y, x = torch.randint(0, S - 5, (2,), generator=g).tolist()
            images[i, 0, y : y + 5, x : x + 5] = level
            masks[i, y : y + 5, x : x + 5] = value
    return RealSlices(images, masks, groups or [f"p{i % 2}" for i in range(n)], classes=3)


def config(**kw) -> SegmentationConfig:
    base = {"network": "unet", "size": S, "steps": 4, "batch_size": 4, "val_interval": 2, "label_names": NAMES}
    return SegmentationConfig(**(base | {"augment": "none"} | kw))


def test_partial_loss_matches_a_hand_computation():
    """Equal logits (p = 1/3 each), pixel 0 background, pixel 1 organ 1, organ 2 uncontoured: CE uses p0 + p2 for
    the background pixel; Dice has a background term (merged probability) and organ 1's, none for organ 2."""
    logits = torch.zeros(1, 3, 1, 2)
    label = torch.tensor([[[[0, 1]]]])
    contoured = torch.tensor([[True, True, False]])
    ce = -(math.log(2 / 3) + math.log(1 / 3)) / 2
    dice_bg = 1 - (2 * (2 / 3)) / ((2 / 3 + 2 / 3) + 1)
    dice_1 = 1 - (2 * (1 / 3)) / ((1 / 3 + 1 / 3) + 1)
    got = PartialDiceCELoss(batch=True, smooth_nr=0, smooth_dr=0)(logits, label, contoured)
    assert got.item() == pytest.approx(ce + (dice_bg + dice_1) / 2, rel=1e-6)


@pytest.mark.parametrize("batch", [True, False])
def test_partial_loss_with_every_organ_contoured_is_monai_dice_ce(batch):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 8, 8, generator=g)
    label = torch.randint(0, 4, (3, 1, 8, 8), generator=g)
    ours = PartialDiceCELoss(batch=batch)(logits, label, torch.ones(3, 4, dtype=torch.bool))
    monai = DiceCELoss(to_onehot_y=True, softmax=True, batch=batch)(logits, label)
    assert ours.item() == pytest.approx(monai.item(), rel=1e-5)


def test_an_uncontoured_organ_drawn_on_background_is_not_penalised():
    """Logits that say organ 2 on a slice labelled all background: penalised when organ 2 was contoured there;
    when it was not, the loss is that of logits as sure of background."""
    says_2, says_background = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    says_2[:, 2], says_background[:, 0] = 6.0, 6.0
    label = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    loss = PartialDiceCELoss()
    complete = loss(says_2, label, torch.tensor([[True, True, True]]))
    partial = loss(says_2, label, torch.tensor([[True, True, False]]))
    reference = loss(says_background, label, torch.tensor([[True, True, False]]))
    assert partial.item() == pytest.approx(reference.item(), abs=1e-5) and complete.item() > partial.item() + 1


def test_deep_supervision_heads_weigh_as_monai():
    g = torch.Generator().manual_seed(2)
    heads = [torch.randn(2, 3, 4, 4, generator=g) for _ in range(3)]
    label, flags = torch.randint(0, 3, (2, 1, 4, 4), generator=g), torch.ones(2, 3, dtype=torch.bool)
    loss = PartialDiceCELoss()
    expected = loss(heads[0], label, flags) + 0.5 * loss(heads[1], label, flags) + 0.25 * loss(heads[2], label, flags)
    assert segmentation_loss(heads, label, flags, loss).item() == pytest.approx(expected.item(), rel=1e-6)


def test_batches_are_a_function_of_seed_and_step_and_cover_each_epoch():
    plan = BatchPlan(10, 0, 4, 0.0, seed=3)
    first = [plan.at(s) for s in range(5)]
    assert [BatchPlan(10, 0, 4, 0.0, seed=3).at(s) for s in (4, 0)] == [first[4], first[0]]  # any order, fresh plan
    assert sorted(sum(first, [])[:10]) == list(range(10))  # the first 10 draws are one permutation
    assert first != [BatchPlan(10, 0, 4, 0.0, seed=4).at(s) for s in range(5)]
    shared = BatchPlan(10, 3, 4, 0.5, seed=0)
    for s in range(6):
        batch = shared.at(s)
        assert len(batch) == 4 and sum(i >= 10 for i in batch) == 2  # two real items (indices past the 10)
    assert BatchPlan(10, 3, 4, 0.0, seed=0).k_real == 0  # share 0: pooled


def test_augmentation_is_seeded_and_keeps_labels_whole():
    item = blobs(1)[0]
    a, b = nnunet2d(), nnunet2d()
    outs = []
    for t in (a, b):
        t.set_random_state(seed=7)
        outs.append([t({"image": item["image"], "label": item["label"]}) for _ in range(20)])
    for x, y in zip(outs[0], outs[1], strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert any(not torch.equal(o["image"], item["image"]) for o in outs[0])  # something changed
    for o in outs[0]:
        assert o["image"].shape == (1, S, S) and set(o["label"].unique().tolist()) <= {0, 1, 2}


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, monkeypatch):
    data = blobs(8)
    cfg = config(augment="nnunet2d")
    whole = train_segmenter(data, None, cfg)
    original = seg_train._save_state

    def save_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(seg_train, "_save_state", save_then_stop)
    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        train_segmenter(data, None, cfg, state_file=state)
    assert load_checkpoint(state, seg_train.STATE_KIND)["run"]["step"] == 2
    monkeypatch.setattr(seg_train, "_save_state", original)
    resumed = train_segmenter(data, None, cfg, state_file=state, out=tmp_path / "m.pt")
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history], rel=1e-4)
    for k, v in whole.network.state_dict().items():
        assert torch.allclose(v.float(), resumed.network.state_dict()[k].float(), atol=1e-4), k
    assert not state.exists()  # the model is written: its state is gone
    with pytest.raises(LabelFactoryError, match="other settings"):
        seg_train.save_checkpoint({"kind": seg_train.STATE_KIND, "config": {"steps": 1}, "data": {}}, state)
        train_segmenter(data, None, cfg, state_file=state)


def test_schedule_warms_up_and_decays_to_zero():
    hist = train_segmenter(blobs(4), None, config(steps=6, val_interval=1, warmup=2, lr=1e-2)).history
    lrs = [h["lr"] for h in hist]
    assert lrs[0] < lrs[1] == pytest.approx(1e-2, rel=1e-6) and lrs[-1] == pytest.approx(0.0, abs=1e-9)
    constant = train_segmenter(blobs(4), None, config(steps=3, val_interval=1, schedule="constant")).history
    assert [h["lr"] for h in constant] == pytest.approx([1e-3] * 3)


def test_fine_tuning_starts_from_the_given_model(tmp_path):
    first = train_segmenter(blobs(6), None, config(), out=tmp_path / "a.pt")
    tuned = train_segmenter(blobs(6, seed=1), None, config(init_from=str(tmp_path / "a.pt"), steps=1, lr=1e-9))
    for k, v in first.network.state_dict().items():
        if v.is_floating_point() and "running" not in k:
            assert torch.allclose(v, tuned.network.state_dict()[k], atol=1e-5), k
    with pytest.raises(LabelFactoryError, match="init_from"):
        train_segmenter(blobs(6), None, config(network="unetpp", init_from=str(tmp_path / "a.pt")))
    assert load_checkpoint(tmp_path / "a.pt", "segmentation")["config"]["augment"] == "none"


def test_validation_dice_is_per_patient_over_contoured_organs():
    """Patient p0 (organ 2 uncontoured) is predicted perfectly on organ 1; patient p1 has organ 1 half right."""

    class Fixed(torch.nn.Module):
        def __init__(self, pred: torch.Tensor):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.pred = pred

        def forward(self, x):
            return torch.nn.functional.one_hot(self.pred[: len(x)], 3).permute(0, 3, 1, 2).float() + 0 * self.w

    truth = torch.zeros(2, 2, 2, dtype=torch.uint8)
    truth[0, 0, 0] = 1  # p0: organ 1 at one pixel
    truth[1, 0, :] = 1  # p1: organ 1 at two pixels
    pred = truth.long().clone()
    pred[0, 1, 1] = 2  # organ 2 drawn in p0, where it is not contoured: not scored
    pred[1, 0, 1] = 0  # p1: one of two organ-1 pixels found -> Dice 2/3
    flags = torch.tensor([[True, True, False], [True, True, True]])
    data = RealSlices(torch.zeros(2, 1, 2, 2), truth, ["p0", "p1"], flags)
    got = validation_dice(Fixed(pred), data, batch_size=2, device=torch.device("cpu"))
    assert got == pytest.approx((1.0 + 2 / 3) / 2)


def test_a_real_share_trains_and_is_recorded(tmp_path):
    result = train_segmenter(blobs(6), blobs(4, 5), config(real_share=0.5), real_set=blobs(2, 9), out=tmp_path / "m.pt")
    assert result.steps == 4 and math.isfinite(result.best_val_dice)
    assert load_checkpoint(tmp_path / "m.pt", "segmentation")["config"]["real_share"] == 0.5


def test_body_crop_slices_are_the_crops_the_infer_sees():
    """A real OpenKBP sample patient: the training crops of a body-crop segmenter are the infer's crops
    (same boxes, same window), and each label crop is the label under its image crop."""
    from labelfactory.datasets.openkbp import WINDOW, body_boxes, crop
    from labelfactory.io import read_image
    from labelfactory.io.dataset import Study
    from labelfactory.io.slices import reorient
    from labelfactory.labels import OPENKBP
    from labelfactory.segmentation.data import body_crop_slices

    root = Path(__file__).resolve().parents[1] / "sample-data" / "openkbp" / "datastore"
    study = Study("validation_pt_201", root / "validation_pt_201.nii.gz", root / "organs" / "validation_pt_201.nii.gz")
    images, masks, ids = body_crop_slices([study], 64, WINDOW, OPENKBP.values)
    hu = reorient(read_image(study.image))[0].array.astype(np.float32)
    boxes = body_boxes(hu, 64)
    assert images.shape == (len(boxes), 1, 64, 64) and masks.shape == (len(boxes), 64, 64)
    assert set(ids) == {"validation_pt_201"}
    expected = torch.from_numpy(WINDOW.to_unit(crop(hu, boxes, fill=-1000.0)))
    assert torch.allclose(images[:, 0], expected)
    organ = masks > 0
    on_tissue = (images[:, 0][organ] > -1).float().mean()  # organs lie on tissue (the larynx's airway aside)
    flipped = (images[:, 0].flip(-1).flip(-2)[organ] > -1).float().mean()
    assert organ.any() and on_tissue > 0.9 and on_tissue > flipped


def test_the_served_models_recipe_is_the_trainers_default():
    from labelfactory.segmentation.train import recorded_config

    shipped = Path(__file__).resolve().parents[1] / "sample-data" / "openkbp" / "models" / "segmentation.pt"
    recipe = recorded_config(shipped)
    payload = load_checkpoint(shipped, "segmentation")["config"]
    assert recipe.slicing == payload["slicing"] == "body-crop" and recipe.window == tuple(payload["window"])
    assert (recipe.size, recipe.steps, recipe.batch_size) == (payload["size"], payload["steps"], payload["batch_size"])
    assert recorded_config(shipped.with_name("none.pt")) is None


def test_mean_teacher_averages_the_student_and_ramps_its_weight():
    from labelfactory.segmentation.mean_teacher import MeanTeacher

    student = torch.nn.Linear(2, 2)
    mt = MeanTeacher(student, weight=2.0, decay=0.5, steps=8)
    before = mt.model.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    mt.update(student, step=0)  # a = min(1 - 1/1, 0.5) = 0: the teacher becomes the student
    assert torch.allclose(mt.model.weight, before + 1.0)
    with torch.no_grad():
        student.weight.add_(2.0)
    mt.update(student, step=9)  # a = min(0.9, 0.5) = 0.5: halfway
    assert torch.allclose(mt.model.weight, before + 2.0)
    assert mt.ramp(0) == pytest.approx(2.0 * math.exp(-5)) and mt.ramp(2) == mt.ramp(5) == pytest.approx(2.0)
    a, b = mt.views(torch.zeros(1, 1, 4, 4), seed=3)
    assert not torch.equal(a, b) and torch.equal(a, mt.views(torch.zeros(1, 1, 4, 4), seed=3)[0])


def test_a_mean_teacher_trains_on_unlabelled_slices_and_keeps_the_teacher(tmp_path):
    data, unlabelled = blobs(6), [{"image": item["image"]} for item in blobs(5, seed=4)]
    cfg = config(consistency=1.0, ema_decay=0.9)
    with pytest.raises(LabelFactoryError, match="unlabelled"):
        train_segmenter(data, None, cfg)
    result = train_segmenter(data, blobs(4, 5), cfg, unlabelled_set=unlabelled, out=tmp_path / "m.pt")
    plain = train_segmenter(data, blobs(4, 5), config())
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert result.history[-1]["loss"] != pytest.approx(plain.history[-1]["loss"])  # the consistency term counts
    saved = load_checkpoint(tmp_path / "m.pt", "segmentation")
    assert saved["config"]["consistency"] == 1.0
    for k, v in result.network.state_dict().items():  # the model returned is the one written
        assert torch.equal(v, saved["state_dict"][k])
