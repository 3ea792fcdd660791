"""`labelfactory serve`: run the MONAI Label app on a studies folder with a models folder of its own.

`--models DIR` is the folder the app reads its models from and its trainers publish to, so two
deployments on one machine never mix models. Defaults: a bundled sample (`SAMPLES`: OpenKBP when
its models are shipped, else the TotalSegmentator sample with its demo models) served from working
copies, `runs/<sample>/datastore` and `runs/<sample>/models` (seeded from the shipped models, never
overwriting a trained one), so the server never modifies the files under version control.

Who may reach it: MONAI Label's OIDC authentication (`--auth-realm`, or `MONAI_LABEL_AUTH_*` in the
environment) is off by default, so `serve` binds beyond the loopback interface only with it on (or
with `--insecure-no-auth`, said at start). `PUT` / `DELETE /model` stay off unless `--model-routes`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from labelfactory.checkout import in_checkout
from labelfactory.checkpoints import copy_model
from labelfactory.errors import LabelFactoryError

REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "apps" / "labelfactory"
SAMPLE = REPO / "sample-data" / "datastore"
DEMO_MODELS = REPO / "sample-data" / "models"


@dataclass(frozen=True)
class Sample:
    """A bundled data set: its datastore, its shipped models and its label map (`labelfactory.labels`)."""

    name: str
    datastore: Path
    models: Path
    labels: str


SAMPLES = {
    "openkbp": Sample(
        "openkbp",
        REPO / "sample-data" / "openkbp" / "datastore",
        REPO / "sample-data" / "openkbp" / "models",
        "openkbp",
    ),
    "totalsegmentator": Sample("totalsegmentator", SAMPLE, DEMO_MODELS, "totalsegmentator"),
}


def choose_sample(name: str) -> tuple[Sample, str]:
    """The sample to serve and why: `name`, or for 'auto' OpenKBP when its models are shipped, else TotalSegmentator."""
    if name != "auto":
        return SAMPLES[name], "chosen with --sample"
    openkbp = SAMPLES["openkbp"]
    if any(openkbp.models.glob("*.pt")):
        return openkbp, f"its models are shipped in {openkbp.models}"
    return SAMPLES["totalsegmentator"], (
        f"{openkbp.models} holds no models yet, so the TotalSegmentator "
        "sample and its demo models instead (--sample openkbp serves OpenKBP untrained)"
    )


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--studies",
        default=None,
        help="folder of studies or a DICOMweb URL (default: a working copy of the --sample's datastore)",
    )
    p.add_argument(
        "--sample",
        default="auto",
        choices=["auto", *SAMPLES],
        help="bundled sample served without --studies, whose models seed the default --models (default auto: "
        "openkbp when sample-data/openkbp/models holds models, else totalsegmentator)",
    )
    p.add_argument(
        "--workdir", default=str(REPO / "runs"), help="where the samples' working copies live (default: runs/)"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default 127.0.0.1); any other than loopback needs authentication (--auth-realm)",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--models",
        default=None,
        help="the models folder the app reads and its trainers publish to (default: <workdir>/<sample>/models, "
        "a working copy of the sample's shipped models)",
    )
    p.add_argument(
        "--conf",
        action="append",
        nargs=2,
        metavar=("KEY", "VALUE"),
        default=[],
        help="app option, e.g. --conf models all",
    )
    p.add_argument(
        "--device",
        default=None,
        help="where every model trains and infers: auto (the GPU when one is present; default) | cpu | cuda | "
        "cuda:N; the same as --conf device",
    )
    auth = p.add_argument_group(
        "authentication", "MONAI Label's OIDC bearer tokens (e.g. Keycloak); more settings: MONAI_LABEL_AUTH_* env"
    )
    auth.add_argument(
        "--auth-realm",
        default=None,
        metavar="URI",
        help="turn authentication on with this realm of the identity provider, e.g. "
        "https://keycloak.example.org/realms/monailabel (MONAI_LABEL_AUTH_ENABLE / _REALM_URI)",
    )
    auth.add_argument(
        "--auth-client-id", default=None, help="the client id of the app in that realm (default monailabel-app)"
    )
    auth.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="bind beyond 127.0.0.1 without authentication: anyone who reaches the port may label, train and infer",
    )
    p.add_argument(
        "--model-routes",
        action="store_true",
        help="enable PUT / DELETE /model/<name> (admin role with auth; off by default: models are published by "
        "trainers and labelfactory commands)",
    )


def prepare_studies(
    studies: str | None, workdir: str | os.PathLike, sample: Sample = SAMPLES["totalsegmentator"]
) -> str:
    """The studies argument for MONAI Label: a URL or folder as given, else `sample`'s working copy."""
    if studies:
        if not studies.startswith(("http://", "https://")) and not Path(studies).is_dir():
            raise LabelFactoryError(f"--studies {studies}: no such folder")
        return studies
    copy = Path(workdir) / sample.name / "datastore"
    if not copy.exists():
        shutil.copytree(sample.datastore, copy)
    return str(copy)


def install_models(source: str | os.PathLike, model_dir: str | os.PathLike) -> list[str]:
    """Copy each model file (and its `.sha256`) of `source` that `model_dir` lacks; never overwrites a trained one."""
    source, model_dir = Path(source), Path(model_dir)
    if not source.is_dir():
        return []
    model_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(source.glob("*.pt")):
        if not f.name.endswith(".previous.pt") and not (model_dir / f.name).exists():
            copy_model(f, model_dir / f.name)
            copied.append(f.name)
    return copied


def server_command(
    studies: str, host: str, port: int, conf: list[tuple[str, str]], app_dir: str | os.PathLike = APP_DIR
) -> list[str]:
    """The `monailabel start_server` command line for this app (errors answered as 4xx, see tasks.server).

    Timeouts: `start_server` passes uvicorn no timeout options, so its keep-alive stays at uvicorn's 5 s; a
    connection with no request under way is closed after LABELFACTORY_IDLE_TIMEOUT_S (tasks.server), and every
    input is bounded by labelfactory.limits (environment settings the server inherits)."""
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


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def access_env(args: argparse.Namespace, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The settings `args` add to the server's environment; LabelFactoryError for a bind the rule refuses.

    The rule: beyond the loopback interface only with authentication on (`--auth-realm`, or
    MONAI_LABEL_AUTH_ENABLE=true with its realm in the environment), unless `--insecure-no-auth`."""
    environ = os.environ if environ is None else environ
    env = {}
    if args.auth_realm:
        env |= {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": args.auth_realm}
    if args.auth_client_id:
        env["MONAI_LABEL_AUTH_CLIENT_ID"] = args.auth_client_id
    if args.model_routes:
        env["LABELFACTORY_MODEL_ROUTES"] = "true"
    auth_on = _truthy(env.get("MONAI_LABEL_AUTH_ENABLE", environ.get("MONAI_LABEL_AUTH_ENABLE")))
    if not auth_on and not is_loopback(args.host):
        if not args.insecure_no_auth:
            raise LabelFactoryError(
                f"--host {args.host} would let anyone who reaches the port label, train and infer: authentication "
                "is off. Turn it on (--auth-realm URI, see the README's Authentication section), bind to "
                "127.0.0.1, or accept the risk with --insecure-no-auth"
            )
        print(f"labelfactory: WARNING: serving on {args.host} without authentication (--insecure-no-auth)")
    return env


def run(args: argparse.Namespace) -> int:
    if not in_checkout():
        raise LabelFactoryError(f"serve runs the MONAI Label app of a source checkout ({APP_DIR} is absent); clone it")
    extra_env = access_env(args)
    sample, why = choose_sample(args.sample)
    studies = prepare_studies(args.studies, args.workdir, sample)
    conf = [tuple(c) for c in args.conf]
    if args.models:
        models = Path(args.models).resolve()
        models.mkdir(parents=True, exist_ok=True)
    else:
        models = Path(args.workdir).resolve() / sample.name / "models"
        copied = install_models(sample.models, models)
        if copied:
            print(f"labelfactory: {models} starts from {', '.join(copied)} of {sample.models} (its README says how)")
    if not args.studies and not any(k == "labels" for k, _ in conf):
        conf.append(("labels", sample.labels))  # the sample's own map, even before its models exist
        print(f"labelfactory: the {sample.name} sample ({why})")
    if not (args.studies and args.models) and not any(k == "labels_fallback" for k, _ in conf):
        conf.append(("labels_fallback", sample.labels))  # the sample's models, if damaged: never another data set's map
    conf.append(("model_dir", str(models)))
    if args.device:
        from labelfactory.devices import resolve_device

        conf.append(("device", str(resolve_device(args.device))))  # refused here, before the server starts
    cmd = server_command(studies, args.host, args.port, conf)
    where = f"{studies} with the models in {models}"
    print(f"labelfactory: serving {where} at http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    os.execve(cmd[0], cmd, {**server_env(), **extra_env})
