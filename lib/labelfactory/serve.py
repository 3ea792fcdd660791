"""`labelfactory serve`: run the MONAI Label app on a working copy of a studies folder.

The bundled sample data is copied to `runs/datastore` on first use, so the server (which writes
labels and its own index into the datastore) never modifies the files under version control.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from labelfactory.checkpoints import hash_path
from labelfactory.errors import LabelFactoryError

REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "apps" / "labelfactory"
SAMPLE = REPO / "sample-data" / "datastore"
DEMO_MODELS = REPO / "sample-data" / "models"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--studies",
        default=None,
        help="folder of studies or a DICOMweb URL (default: a working copy of sample-data/datastore)",
    )
    p.add_argument("--workdir", default=str(REPO / "runs"), help="where the sample data copy lives (default: runs/)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: auth is off, keep it local)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--models",
        default=str(DEMO_MODELS),
        help="model files to start from when the app has none of its own (default: the demo models made by scripts/make_demo_models.sh); '' for none",
    )
    p.add_argument(
        "--conf",
        action="append",
        nargs=2,
        metavar=("KEY", "VALUE"),
        default=[],
        help="app option, e.g. --conf models all",
    )


def prepare_studies(studies: str | None, workdir: str | os.PathLike) -> str:
    """The studies argument for MONAI Label: a URL or folder as given, else the sample data's working copy."""
    if studies:
        if not studies.startswith(("http://", "https://")) and not Path(studies).is_dir():
            raise LabelFactoryError(f"--studies {studies}: no such folder")
        return studies
    copy = Path(workdir) / "datastore"
    if not copy.exists():
        shutil.copytree(SAMPLE, copy)
    return str(copy)


def install_models(source: str | os.PathLike, model_dir: str | os.PathLike) -> list[str]:
    """Copy each model file of `source` that `model_dir` lacks, with its `.sha256` (never overwrites a trained model)."""
    source, model_dir = Path(source), Path(model_dir)
    if not source.is_dir():
        return []
    model_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(source.glob("*.pt")):
        if not f.name.endswith(".previous.pt") and not (model_dir / f.name).exists():
            if hash_path(f).exists():  # the hash first: the model never sits there unchecked
                shutil.copy2(hash_path(f), hash_path(model_dir / f.name))
            shutil.copy2(f, model_dir / f.name)
            copied.append(f.name)
    return copied


def server_command(
    studies: str, host: str, port: int, conf: list[tuple[str, str]], app_dir: str | os.PathLike = APP_DIR
) -> list[str]:
    """The `monailabel start_server` command line for this app (errors answered as 4xx, see tasks.server)."""
    cmd = [
        sys.executable,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(app_dir),
        "--studies",
        studies,
        "--host",
        host,
        "--port",
        str(port),
        "--uvicorn_app",
        "labelfactory.tasks.server:app",
    ]
    for k, v in conf:
        cmd += ["--conf", k, v]
    return cmd


def server_env() -> dict[str, str]:
    """The environment for the server: this interpreter's bin folder first on PATH, where MONAI Label
    looks for dcmqi's `itkimage2segimage` (from the `dcmqi` wheel) before trying to download it."""
    bindir = os.path.dirname(sys.executable)
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}


def run(args: argparse.Namespace) -> int:
    studies = prepare_studies(args.studies, args.workdir)
    if args.models:
        copied = install_models(args.models, APP_DIR / "model")
        if copied:
            print(
                f"labelfactory: starting from the demo models {', '.join(copied)} (see {args.models}/README.md)",
                flush=True,
            )
    cmd = server_command(studies, args.host, args.port, [tuple(c) for c in args.conf])
    print(f"labelfactory: serving {studies} at http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    os.execve(cmd[0], cmd, server_env())
