"""`labelfactory loop`: a scripted active-learning loop against a running server.

Each round: next sample (a new generated image) -> auto-segment it (when a model exists) ->
an annotator corrects it -> save the label -> every `retrain_every` labels, retrain and wait.
It speaks only MONAI Label's REST API through `monailabel.client.MONAILabelClient`, exactly as
3D Slicer does, so the same loop drives a local or a remote server. The built-in annotator is a
simulation (a rule on HU ranges); a person in Slicer is the real one.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from labelfactory.annotator import hu_rule_annotator
from labelfactory.errors import LabelFactoryError
from labelfactory.io import Image, read_image, write_image
from labelfactory.labels import LABEL_NAMES

logger = logging.getLogger(__name__)
Annotator = Callable[[Image, "Image | None"], np.ndarray]


def wait_for_training(client: MONAILabelClient, timeout: float = 3600, poll: float = 2.0) -> dict:
    """Poll /train/ until the newest training task has finished (DONE, ERROR or STOPPED); its status dict."""
    t0 = time.time()
    while True:
        status = client.train_status()
        if status.get("status") not in ("SUBMITTED", "QUEUED", "RUNNING"):
            return status
        if time.time() - t0 > timeout:
            raise TimeoutError(f"training still running after {timeout:.0f} s")
        time.sleep(poll)


def download_image(server: str, image_id: str, folder: Path) -> Path:
    r = requests.get(f"{server}/datastore/image", params={"image": image_id}, timeout=120)
    if r.status_code != 200:
        raise LabelFactoryError(f"cannot fetch image {image_id}: HTTP {r.status_code} {r.text[:200]}")
    path = folder / f"{image_id}.nii.gz"
    path.write_bytes(r.content)
    return path


def run_loop(
    server: str,
    rounds: int,
    annotate: Annotator = hu_rule_annotator,
    strategy: str = "generated_uncertain",
    infer_model: str = "datasetgan",
    train_model: str = "datasetgan",
    retrain_every: int = 3,
    train_params: dict | None = None,
    log: Callable[[str], None] = print,
    label_names: dict[str, int] | None = None,
) -> list[dict]:
    """Run `rounds` annotation rounds; retrain `train_model` after every `retrain_every` labels. A record a round.

    `label_names` (name -> value) name the annotator's values to the server (default: the TotalSegmentator map)."""
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        client, tmp = MONAILabelClient(server, tmpdir=tmp), Path(tmp)
        for r in range(rounds):
            sample = client.next_sample(strategy, {})
            image_id = sample.get("id")
            if not image_id:
                raise LabelFactoryError(f"strategy {strategy} returned no sample: {sample}")
            image = read_image(download_image(server, image_id, tmp))
            prediction, agreement = None, None
            try:
                label_file, _ = client.infer(infer_model, image_id, {"result_extension": ".nii.gz"})
                prediction = read_image(label_file)
            except MONAILabelClientException as e:
                log(f"round {r}: no auto-segmentation yet ({str(e.msg)[:120]})")
            mask = annotate(image, prediction)
            if prediction is not None:
                agreement = float((prediction.array == mask).mean())
            path = write_image(image.with_array(mask.astype(np.uint8)), tmp / f"{image_id}_label.nii.gz")
            names = [{"name": n, "idx": v} for n, v in (label_names or LABEL_NAMES).items() if v]
            client.save_label(image_id, str(path), tag="final", params={"label_info": names})
            rec = {"round": r, "image": image_id, "uncertainty": sample.get("uncertainty"), "agreement": agreement}
            rec["picked"] = sample.get("picked")  # why the strategy chose it (generated_uncertain says)
            log(
                f"round {r}: labelled {image_id}"
                + (f" ({rec['picked']})" if rec["picked"] else "")
                + (f", auto-segmentation agreed on {agreement:.1%} of pixels" if agreement is not None else "")
            )
            if (r + 1) % retrain_every == 0:
                client.train_start(train_model, train_params or {})
                status = wait_for_training(client)
                rec["train"] = status.get("status") if isinstance(status, dict) else status
                log(f"round {r}: retrained {train_model}: {rec['train']}")
            records.append(rec)
    return records


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="http://127.0.0.1:8000")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--retrain-every", type=int, default=3)
    p.add_argument("--strategy", default="generated_uncertain")
    p.add_argument("--infer-model", default="datasetgan")
    p.add_argument("--train-model", default="datasetgan")
    p.add_argument("--train-params", default="{}", help="JSON for the train request, e.g. '{\"epochs\": 5}'")
    p.add_argument(
        "--annotator-model",
        default=None,
        help="segmentation model file that labels each image (labelfactory.annotator_model); default: the HU rule",
    )


def run(args: argparse.Namespace) -> int:
    from labelfactory.annotator_model import ModelAnnotator

    annotate = ModelAnnotator(args.annotator_model) if args.annotator_model else hu_rule_annotator
    records = run_loop(
        args.server,
        args.rounds,
        annotate,
        args.strategy,
        args.infer_model,
        args.train_model,
        args.retrain_every,
        json.loads(args.train_params),
        label_names=getattr(annotate, "label_names", None),
    )
    print(json.dumps(records, indent=1))
    return 0
