"""Infer `synthesis`: a new generated image and its mask, on request, from a seed; adding generated images.

`POST /infer/synthesis?image=seed<N>` (e.g. `seed000042`) generates the image of seed N with
truncation psi, labels it with the interpreter, and returns the mask (a 2D label on the image's
grid) with the seed, w and uncertainty in the JSON. With `add_to_datastore: true` the result also
names the generated image's temp file (GENERATED_FILE), which `finish` (called by the app, the infers'
one door to the datastore) adds with its latent record (id `gen_seed<N>`) via `add_generated_image`,
exactly as the next-sample strategy does.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferType

from labelfactory.datasetgan.taps import ws_from_seeds
from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image, read_image, write_image
from labelfactory.labels import LABEL_NAMES, foreground
from labelfactory.latent_record import LATENT_KEY, TRUNCATION_PSI, latent_record
from labelfactory.options import SEED_RANGE, cast
from labelfactory.stylegan2.identity import generated_to_image, generator_identity, generator_window, seed_name
from labelfactory.tasks.base import InferBase, result_file
from labelfactory.tasks.datasetgan import DatasetGANModels
from labelfactory.tasks.datastore import LabelFactoryDatastore

SEED_ID = re.compile(r"^seed(\d{1,9})$")
GENERATED_FILE = "generated_image_file"  # result key `finish` takes the image to add from (never sent to clients)


def seed_of(image_id: str) -> int:
    """'seed000042' -> 42; LabelFactoryError for anything else."""
    m = SEED_ID.match(str(image_id))
    if not m:
        raise LabelFactoryError(f"synthesis takes image=seed<N> (e.g. seed000042), got {image_id!r}")
    return int(m.group(1))


def add_generated_image(
    datastore: Datastore, image: Image, record: dict[str, Any], uncertainty: float | None, info: dict | None = None
) -> str:
    """Store a generated image as `gen_seed<N>` with its latent record, uncertainty and `info`; returns the id.

    The one way provenance is set: the datastore takes the record only as `add_image(..., latent=)`."""
    image_id = f"gen_{seed_name(record['seed'])}"
    with tempfile.TemporaryDirectory() as tmp:
        path = write_image(image, Path(tmp) / f"{image_id}.nii.gz")
        info = {"uncertainty": uncertainty, **(info or {})}
        if isinstance(datastore, LabelFactoryDatastore):
            datastore.add_image(image_id, str(path), info, latent=record)
        else:  # MONAI Label's own datastores (DICOMweb) keep it in the info
            datastore.add_image(image_id, str(path), {LATENT_KEY: record, **info})
    return image_id


class SynthesisInfer(InferBase):
    """Seed -> generated image + the interpreter's mask, uncertainty and latent record."""

    makes_its_image = True  # image=seed<N>

    def __init__(
        self,
        models: DatasetGANModels,
        truncation_psi: float = TRUNCATION_PSI,
        label_names: dict[str, int] = LABEL_NAMES,
    ):
        super().__init__(
            models.model_dir,
            InferType.OTHERS,
            foreground(label_names),
            2,
            "DatasetGAN synthesis: image=seed<N> -> a new generated image and its mask",
            {"truncation_psi": truncation_psi, "add_to_datastore": False},
            device=str(models.device),
        )
        self.models, self.truncation_psi = models, truncation_psi

    def infer(self, request: dict[str, Any]) -> tuple[Image, dict[str, Any]]:
        seed = request["seed"] if request.get("seed") is not None else seed_of(request.get("image", ""))
        seed = cast(int, "seed", seed, *SEED_RANGE)
        psi = cast(float, "truncation_psi", request.get("truncation_psi", self.truncation_psi))
        if not 0.0 < psi <= 1.0:
            raise LabelFactoryError(f"option truncation_psi={psi}: expected a number in (0, 1]")
        interp = self.models.interpreter()
        ws = ws_from_seeds(interp.G, [seed], psi)
        lab = interp.label(ws)
        image = generated_to_image(lab.image[0], generator_window(interp.G))
        record = latent_record(seed, psi, ws[0, 0].tolist(), generator_identity(interp.G))
        result = {
            "seed": seed,
            "uncertainty": float(lab.score[0]),
            "label_names": foreground(interp.label_names),
            LATENT_KEY: record,
        }
        if cast(bool, "add_to_datastore", request.get("add_to_datastore", False)):
            result[GENERATED_FILE] = result_file(image)
        return image.with_array(lab.mask[0].cpu().numpy().astype(np.uint8)), result

    def prepare(self, request: dict[str, Any], datastore: Datastore, image_id: str | None) -> dict[str, Any]:
        return {**request, "seed": seed_of(request.get("image", ""))}

    def finish(self, params: dict[str, Any], datastore: Datastore) -> None:
        generated = params.pop(GENERATED_FILE, None)
        if generated:
            try:
                params["image_id"] = add_generated_image(
                    datastore, read_image(generated), params[LATENT_KEY], params["uncertainty"]
                )
            finally:
                os.unlink(generated)
