"""Run MONAI Label's own endpoint tests (tests/unit/endpoints of Project-MONAI/MONAILabel) against this app.

Their assertions are not changed: only `context.py`'s app folder, studies and conf are pointed at this app and at
a copy of the bundled sample whose images carry the names the tests ask for (spleen_3, spleen_9, with a final
label). The tests are read from a MONAILabel checkout you give (nothing is downloaded or kept here).

    python scripts/monailabel_endpoint_check.py --monailabel /path/to/MONAILabel [--tests info,datastore,...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TESTS = ("info", "datastore", "session", "activelearning", "logs", "model")  # what a MONAI Label app answers


def studies(out: Path) -> Path:
    """The sample's torso and thorax CT as spleen_3 / spleen_9, each with a small final label (value 1), and its
    abdomen CT as spleen_8, unlabelled (the strategies pick among unlabelled images)."""
    sys.path.insert(0, str(REPO / "lib"))
    from labelfactory.io import read_image, write_image

    (out / "labels" / "final").mkdir(parents=True)
    for name, source in (("spleen_3", "torso_3mm"), ("spleen_9", "thorax_aorta")):
        image = read_image(REPO / "sample-data" / "datastore" / f"{source}.nii.gz")
        shutil.copy(REPO / "sample-data" / "datastore" / f"{source}.nii.gz", out / f"{name}.nii.gz")
        mask = np.zeros(image.array.shape, np.uint8)
        mask[tuple(slice(s // 3, s // 3 + 2) for s in mask.shape)] = 1
        write_image(image.with_array(mask), out / "labels" / "final" / f"{name}.nii.gz")
    shutil.copy(REPO / "sample-data" / "datastore" / "abdomen.nii.gz", out / "spleen_8.nii.gz")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--monailabel", type=Path, required=True, help="a MONAILabel source checkout (its tests/ folder)")
    p.add_argument("--tests", default=",".join(TESTS), help="comma list of endpoint test modules (test_<name>.py)")
    args = p.parse_args()
    src = args.monailabel / "tests" / "unit" / "endpoints"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pkg = tmp / "tests" / "unit" / "endpoints"
        pkg.mkdir(parents=True)
        for f in ("__init__.py", *(f"test_{t}.py" for t in args.tests.split(","))):
            text = (src / f).read_text()  # the radiology app's model name -> this app's (assertions untouched)
            (pkg / f).write_text(text.replace('model = "deepedit"', 'model = "segmentation"'))
        for d in (tmp / "tests", tmp / "tests" / "unit"):
            (d / "__init__.py").touch()
        data = studies(tmp / "studies")
        context = (src / "context.py").read_text()
        models = tmp / "model"  # a copy: the model tests may upload or delete a model file
        shutil.copytree(REPO / "sample-data" / "models", models)
        conf = f'"models": "all", "skip_scoring": "true", "model_dir": {str(models)!r}'
        context = re.sub(r'"models": "[^"]*"', conf, context)
        context = context.replace(
            'os.path.join(base_dir, "sample-apps", "radiology")', repr(str(REPO / "apps" / "labelfactory"))
        )
        context = context.replace('os.path.join(data_dir, "dataset", "local", "spleen")', repr(str(data)))
        context = context.replace('data_dir = os.path.join(base_dir, "tests", "data")', f"data_dir = {str(tmp)!r}")
        (pkg / "context.py").write_text(context)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg)]
        return subprocess.call(cmd, cwd=tmp, env={**os.environ, "PYTHONPATH": f"{REPO / 'lib'}:{tmp}"})


if __name__ == "__main__":
    sys.exit(main())
