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
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from labelfactory.datasetgan.labeller import KIND as INTERPRETER
from labelfactory.datasetgan.labeller import Interpreter
from labelfactory.datasetgan.taps import ws_from_seeds, ws_from_w
from labelfactory.errors import LabelFactoryError, ModelMissing
from labelfactory.latent_record import LATENT_KEY, TRUNCATION_PSI, latent_record
from labelfactory.options import SEED_RANGE, cast
from labelfactory.stylegan2.identity import generated_to_image, generator_identity, generator_window
from labelfactory.tasks.datasetgan import DatasetGANModels
from labelfactory.tasks.synthesis import add_generated_image

logger = logging.getLogger(__name__)
CANDIDATE_SEEDS = "candidate_seeds"  # info key: [first, last] seed of the window a sample was picked from
PICKED = "picked"  # info key: why that candidate (the most uncertain, or random and why)
EXPLORE = 2  # 1 in 2 random: 18 random of 30 miss a 10% organ 14% of the time; 5 (pure uncertainty) 59%


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


class GeneratedUncertain(Strategy):
    """Adds the most uncertain of K new generated images to the datastore and returns its id."""

    def __init__(
        self,
        models: DatasetGANModels,
        candidates: int = 8,
        truncation_psi: float = TRUNCATION_PSI,
        explore: int = EXPLORE,
    ):
        every = f"; 1 in {explore} a random one" if explore else ""
        super().__init__(
            f"A new generated image, the most uncertain of {candidates} candidates for the interpreter"
            f" (random until one is trained{every})"
        )
        self.models, self.candidates, self.truncation_psi, self.explore = models, candidates, truncation_psi, explore

    def info(self) -> dict[str, Any]:
        return {**super().info(), "device": str(self.models.device)}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        k = cast(int, "candidates", request.get("candidates", self.candidates), 1, 256)
        psi = cast(float, "truncation_psi", request.get("truncation_psi", self.truncation_psi))
        explore = cast(int, "explore", request.get("explore", self.explore))
        if not 0.0 < psi <= 1.0:
            raise LabelFactoryError(f"option truncation_psi={psi}: expected a number in (0, 1]")
        low, high = SEED_RANGE
        seed = cast(int, "seed", request["seed"], low, high - k + 1) if request.get("seed") is not None else None
        G = self.models.generator.get()  # after the options: a bad one answers 400 with or without a model
        infos = generated_infos(datastore)
        start = next_candidate_seed(infos) if seed is None else seed
        seeds = list(range(start, start + k))
        ws = ws_from_seeds(G, seeds, psi)
        interp = interpreter_or_none(self.models)
        if interp is None:
            pick, score, why = 0, None, "random: no interpreter yet"
        elif explore and (len(infos) + 1) % explore == 0:  # this is the (len(infos) + 1)-th generated image
            pick, score, why = 0, float(interp.label(ws[:1]).score[0]), f"random: 1 in {explore} images explores"
        else:
            scores = torch.cat([interp.label(ws[i : i + 4]).score for i in range(0, k, 4)])
            pick, score, why = int(scores.argmax()), float(scores.max()), "the most uncertain candidate"
        with torch.no_grad():
            img = G.synthesis(ws[pick : pick + 1], noise_mode="const")
        seed = seeds[pick]
        record = latent_record(seed, psi, ws[pick, 0].tolist(), generator_identity(G))
        image = generated_to_image(img, generator_window(G))
        info = {CANDIDATE_SEEDS: [seeds[0], seeds[-1]], PICKED: why}
        image_id = add_generated_image(datastore, image, record, score, info)
        logger.info(f"next sample: {image_id} (of seeds {seeds[0]}..{seeds[-1]}, {why}, uncertainty {score})")
        return {"id": image_id, "seed": seed, "uncertainty": score, PICKED: why}


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
