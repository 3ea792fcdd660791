"""Infer `synthesis`: a new generated image and its mask, on request, from a seed.

`POST /infer/synthesis?image=seed<N>` (e.g. `seed000042`) generates the image of seed N with
truncation psi, labels it with the interpreter, and returns the mask (a 2D label on the image's
grid) with the seed, w and uncertainty in the JSON. With `add_to_datastore: true` the image joins
the datastore with its latent record (id `gen_seed<N>`) so Slicer can open it, exactly as the
next-sample strategy would add it.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from labelfactory.errors import LabelFactoryError
from labelfactory.interpreter.labeller import generator_identity
from labelfactory.interpreter.records import LATENT_KEY
from labelfactory.interpreter.taps import ws_from_seeds
from labelfactory.io import write_image
from labelfactory.labels import LABEL_NAMES
from labelfactory.synthesis import generated_to_image, seed_name
from labelfactory.tasks.interpreter import InterpreterModels

SEED_ID = re.compile(r"^seed(\d{1,9})$")


def seed_of(image_id: str) -> int:
    """'seed000042' -> 42; LabelFactoryError for anything else."""
    m = SEED_ID.match(str(image_id))
    if not m:
        raise LabelFactoryError(f"synthesis takes image=seed<N> (e.g. seed000042), got {image_id!r}")
    return int(m.group(1))


class SynthesisInfer(InferTask):
    """Seed -> generated image (optionally stored) + the interpreter's mask, uncertainty and latent."""

    def __init__(self, models: InterpreterModels, truncation_psi: float = 0.7, label_names: dict[str, int] = LABEL_NAMES):
        super().__init__(InferType.OTHERS, {k: v for k, v in label_names.items() if v}, 2,
                         "DatasetGAN synthesis: image=seed<N> -> a new generated image and its mask",
                         {"truncation_psi": truncation_psi, "add_to_datastore": False})
        self.models, self.truncation_psi = models, truncation_psi
        self.datastore = None  # set by the app: where add_to_datastore puts images

    def is_valid(self) -> bool:
        return True

    def get_path(self, validate: bool = True):
        return str(self.models.model_dir)

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        t0 = time.time()
        seed = int(request["seed"]) if "seed" in request else seed_of(request.get("image", ""))
        psi = float(request.get("truncation_psi", self.truncation_psi))
        if not 0.0 < psi <= 1.0:
            raise LabelFactoryError("truncation_psi must be in (0, 1]")
        interp = self.models.interpreter()
        G = interp.G
        ws = ws_from_seeds(G, [seed], psi)
        lab = interp.label(ws)
        image = generated_to_image(lab.image[0])
        out = tempfile.NamedTemporaryFile(suffix=request.get("result_extension") or ".nii.gz", delete=False).name
        write_image(image.with_array(lab.mask[0].cpu().numpy().astype(np.uint8)), out)
        record = {"seed": seed, "truncation_psi": psi, "w": ws[0, 0].tolist(), "generator": generator_identity(G)}
        result = {"seed": seed, "uncertainty": float(lab.score[0]), "label_names": {k: v for k, v in interp.label_names.items() if v}, LATENT_KEY: record}
        if str(request.get("add_to_datastore", "false")).lower() == "true":
            if self.datastore is None:
                raise LabelFactoryError("this server has no datastore to add generated images to", status=500)
            image_id = f"gen_{seed_name(seed)}"
            with tempfile.TemporaryDirectory() as tmp:
                self.datastore.add_image(image_id, str(write_image(image, Path(tmp) / f"{image_id}.nii.gz")), {LATENT_KEY: record, "uncertainty": result["uncertainty"]})
            result["image_id"] = image_id
        result["latencies"] = {"total": round(time.time() - t0, 3)}
        return out, result
