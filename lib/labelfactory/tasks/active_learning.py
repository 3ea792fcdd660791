"""Next-sample strategy `generated_uncertain` and scoring `generated_uncertainty` for the DatasetGAN loop.

The next sample is a *new* generated image: K candidate seeds never considered before (the K seeds
after the last window, recorded as `candidate_seeds` in each sample's info) are generated, scored by
the interpreter's ensemble uncertainty (the mean of each image's top 10% per-pixel JS divergence),
and the most uncertain one is added to the datastore with its latent record (seed, truncation psi,
w, generator) in its info. While no interpreter exists for the current generator, the first
candidate is taken (the seeds are random latents, so this is a random sample that stays
reproducible). With `explore` N > 0 (default `EXPLORE`), every N-th generated image is that random
first candidate too: an ensemble never shown a class is confidently wrong on it, not uncertain, so
uncertainty alone never finds what the first labels missed (docs/RESULTS.md section 0: pure
uncertainty put no larynx in 30 picks; benchmarks/selection_coverage.py: the odds per class).

Which of the other candidates is taken is the strategy's `rule` (conf or request `rule`, recorded in the sample's
info): `uncertainty` (the default) takes the most uncertain; `coverage` takes the one whose predicted organs are
rarest among the labels so far (`pick` says exactly how). `pick` is the whole choice, free of the datastore, so
`benchmarks/active_learning.py` measures what the server does.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from labelfactory.datasetgan.labeller import KIND as INTERPRETER
from labelfactory.datasetgan.labeller import Interpreter
from labelfactory.datasetgan.records import records_from_datastore
from labelfactory.datasetgan.taps import ws_from_seeds, ws_from_w
from labelfactory.errors import LabelFactoryError, ModelMissing
from labelfactory.io import read_label
from labelfactory.latent_record import LATENT_KEY, TRUNCATION_PSI, latent_record
from labelfactory.options import SEED_RANGE, cast
from labelfactory.stylegan2.identity import generated_to_image, generator_identity, generator_window
from labelfactory.tasks.datasetgan import DatasetGANModels
from labelfactory.tasks.synthesis import add_generated_image

logger = logging.getLogger(__name__)
CANDIDATE_SEEDS = "candidate_seeds"  # info key: [first, last] seed of the window a sample was picked from
PICKED = "picked"  # info key: why that candidate (the most uncertain, or random and why)
RULE = "rule"  # info key: the rule that chose among the candidates
EXPLORE = 2  # 1 in 2 random: 18 random of 30 miss a 10% organ 14% of the time; 5 (pure uncertainty) 59%
CANDIDATES = 8  # K new candidate seeds scored per next sample
RULES = ("uncertainty", "coverage")  # `pick`'s rules; the first is the default
SHOWN_PIXELS = 5  # a candidate shows an organ when the interpreter draws at least this many of its pixels


@dataclass(frozen=True)
class Pick:
    """One choice among K candidates: `index` into them, the interpreter's `uncertainty` of that candidate (mean of
    its top 10% per-pixel JS divergence, nats; None without an interpreter) and `why` (the sample's `picked`)."""

    index: int
    uncertainty: float | None
    why: str


def check_rule(rule: str) -> str:
    """`rule` if it is one of RULES, else LabelFactoryError (a 400 naming the choices)."""
    if rule not in RULES:
        raise LabelFactoryError(f"option rule={rule!r}: expected one of {', '.join(RULES)}")
    return rule


def organ_counts(masks: Iterable[np.ndarray]) -> Counter[int]:
    """{label value: how many of `masks` (each (H, W) int) hold at least one pixel of it}: the labels so far."""
    counts: Counter[int] = Counter()
    for mask in masks:
        counts.update(np.unique(mask).tolist())
    return counts


def shown_organs(mask: torch.Tensor, organs: Iterable[int], min_pixels: int = SHOWN_PIXELS) -> list[int]:
    """The values of `organs` that (H, W) `mask` draws in at least `min_pixels` pixels."""
    return [v for v in organs if int((mask == v).sum()) >= min_pixels]


def rarity(shown: Iterable[int], counts: Mapping[int, int]) -> float:
    """Sum over the organs `shown` of 1 / (1 + labelled images holding it): 1 for an organ no label holds, 1/2 for
    one held by a single label, ...; a candidate showing more, and rarer, organs scores higher."""
    return sum(1.0 / (1 + counts.get(v, 0)) for v in shown)


def pick(
    ws: torch.Tensor,
    interp: Interpreter | None,
    counts: Mapping[int, int],
    n: int,
    explore: int = EXPLORE,
    rule: str = RULES[0],
) -> Pick:
    """Which of K candidates becomes the `n`-th generated image (1-based) of the label set.

    ws: (K, num_ws, w_dim) the candidates' latents, in seed order (the first is a random latent, since seeds are).
    interp: the interpreter of their generator, or None while none is trained. counts: label value -> labelled
    images holding it (`organ_counts`; only `coverage` reads it). explore: every `explore`-th image (n % explore
    == 0; 0 never, 1 always) is the first candidate. rule, for the other images:
      `uncertainty`: the candidate with the highest uncertainty score (first on ties);
      `coverage`: the candidate with the highest `rarity` of the organs the interpreter draws in it (`shown_organs`:
      >= SHOWN_PIXELS pixels of a foreground value of `interp.label_names`), rarities equal to 1e-9 broken by the
      higher uncertainty, then by seed order. An organ no label holds is never drawn by an ensemble never taught
      it, so coverage, like uncertainty, needs `explore` to find one.
    Without an interpreter the first candidate. Deterministic: the same inputs give the same pick."""
    check_rule(rule)
    if interp is None:
        return Pick(0, None, "random: no interpreter yet")
    if explore and n % explore == 0:
        return Pick(0, float(interp.label(ws[:1]).score[0]), f"random: 1 in {explore} images explores")
    labelled = [interp.label(ws[i : i + 4]) for i in range(0, len(ws), 4)]
    scores = torch.cat([b.score for b in labelled]).tolist()
    if rule == "uncertainty":
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        return Pick(best, scores[best], "the most uncertain candidate")
    organs = [v for v in interp.label_names.values() if v]
    shown = [shown_organs(m, organs) for b in labelled for m in b.mask]
    rare = [round(rarity(s, counts), 9) for s in shown]
    best = max(range(len(scores)), key=lambda i: (rare[i], scores[i], -i))
    names = {v: k for k, v in interp.label_names.items()}
    what = ", ".join(names[v] for v in shown[best]) or "no organ"
    return Pick(best, scores[best], f"coverage: the rarest organs ({what}; rarity {rare[best]:.3f})")


def interpreter_or_none(models: DatasetGANModels) -> Interpreter | None:
    """The interpreter of the served generator, or None while none is trained for it."""
    try:
        return models.interpreter()
    except ModelMissing as e:
        if e.model != INTERPRETER:
            raise
        logger.info(f"no interpreter: {e}")
        return None


def generated_infos(datastore: Datastore) -> list[dict[str, Any]]:
    """The info of every generated image in the datastore (those whose latent record holds a seed)."""
    infos = (datastore.get_image_info(i) or {} for i in datastore.list_images())
    return [info for info in infos if isinstance(info.get(LATENT_KEY), dict) and "seed" in info[LATENT_KEY]]


def next_candidate_seed(infos: list[dict[str, Any]]) -> int:
    """The first seed after every candidate window (or generated seed) of `infos` (`generated_infos`)."""
    last = -1
    for info in infos:
        window = info.get(CANDIDATE_SEEDS)
        last = max(last, int(info[LATENT_KEY]["seed"]), int(window[1]) if isinstance(window, list | tuple) else -1)
    return last + 1


def labelled_organ_counts(datastore: Datastore) -> Counter[int]:
    """`organ_counts` of the final labels of the datastore's generated images (what `coverage` weighs against)."""
    return organ_counts(read_label(path).array for _, _, path in records_from_datastore(datastore))


class GeneratedUncertain(Strategy):
    """Adds the `pick` of K new generated images (by default the most uncertain) to the datastore; returns its id."""

    def __init__(
        self,
        models: DatasetGANModels,
        candidates: int = CANDIDATES,
        truncation_psi: float = TRUNCATION_PSI,
        explore: int = EXPLORE,
        rule: str = RULES[0],
    ):
        check_rule(rule)
        every = f"; 1 in {explore} a random one" if explore else ""
        best = "the most uncertain" if rule == "uncertainty" else "the one showing the rarest organs"
        super().__init__(
            f"A new generated image, {best} of {candidates} candidates for the interpreter"
            f" (random until one is trained{every})"
        )
        self.models, self.candidates, self.truncation_psi = models, candidates, truncation_psi
        self.explore, self.rule = explore, rule

    def info(self) -> dict[str, Any]:
        return {**super().info(), "device": str(self.models.device)}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        k = cast(int, "candidates", request.get("candidates", self.candidates), 1, 256)
        psi = cast(float, "truncation_psi", request.get("truncation_psi", self.truncation_psi))
        explore = cast(int, "explore", request.get("explore", self.explore))
        rule = check_rule(cast(str, "rule", request.get("rule", self.rule)))
        if not 0.0 < psi <= 1.0:
            raise LabelFactoryError(f"option truncation_psi={psi}: expected a number in (0, 1]")
        low, high = SEED_RANGE
        seed = cast(int, "seed", request["seed"], low, high - k + 1) if request.get("seed") is not None else None
        G = self.models.generator.get()  # after the options: a bad one answers 400 with or without a model
        infos = generated_infos(datastore)
        start = next_candidate_seed(infos) if seed is None else seed
        seeds = list(range(start, start + k))
        ws = ws_from_seeds(G, seeds, psi)
        counts = labelled_organ_counts(datastore) if rule == "coverage" else Counter()
        chosen = pick(ws, interpreter_or_none(self.models), counts, len(infos) + 1, explore, rule)
        with torch.no_grad():
            img = G.synthesis(ws[chosen.index : chosen.index + 1], noise_mode="const")
        seed, score, why = seeds[chosen.index], chosen.uncertainty, chosen.why
        record = latent_record(seed, psi, ws[chosen.index, 0].tolist(), generator_identity(G))
        image = generated_to_image(img, generator_window(G))
        info = {CANDIDATE_SEEDS: [seeds[0], seeds[-1]], PICKED: why, RULE: rule}
        image_id = add_generated_image(datastore, image, record, score, info)
        logger.info(f"next sample: {image_id} (of seeds {seeds[0]}..{seeds[-1]}, {why}, uncertainty {score})")
        return {"id": image_id, "seed": seed, "uncertainty": score, PICKED: why, RULE: rule}


class GeneratedUncertainty(ScoringMethod):
    """Scores every unlabelled generated image by the interpreter's uncertainty (info 'uncertainty')."""

    def __init__(self, models: DatasetGANModels):
        super().__init__("Ensemble uncertainty (top-10% JS divergence) of the unlabelled generated images")
        self.models = models

    def info(self) -> dict[str, Any]:
        return {**super().info(), "device": str(self.models.device)}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        G = self.models.generator.get()
        interp = self.models.interpreter()
        scored = {}
        for image_id in datastore.get_unlabeled_images():
            rec = (datastore.get_image_info(image_id) or {}).get(LATENT_KEY)
            if not isinstance(rec, dict) or not rec.get("w"):
                continue
            score = float(interp.label(ws_from_w(G, torch.tensor(np.asarray(rec["w"], np.float32)))).score[0])
            datastore.update_image_info(image_id, {"uncertainty": score})
            scored[image_id] = score
        return {"scored": scored}
