"""MONAI Label's OIDC authentication on the real server, against a local identity-provider stand-in.

The stand-in serves what MONAI Label fetches from a Keycloak realm (the realm's `public_key`, its OpenID
configuration and JWKS) on 127.0.0.1; tokens are signed with an RSA key made here. The same server checks the
label-map fallback: its OpenKBP models that record a map are damaged, and it serves OpenKBP's map, not another's.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from labelfactory.checkpoints import hash_path
from labelfactory.serve import DEMO_MODELS, SAMPLES
from tests.conftest import REPO, Server

pytestmark = pytest.mark.slow
USER, ANNOTATOR, ADMIN = "monailabel-user", "monailabel-annotator", "monailabel-admin"


class IdentityProvider:
    """A Keycloak realm as MONAI Label reads it: GET <realm> (public_key), .well-known/openid-configuration, JWKS."""

    def __init__(self):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.realm = f"http://127.0.0.1:{self.http.server_port}/realms/test"
        self.documents = {
            "/realms/test": {"realm": "test", "public_key": base64.b64encode(der).decode()},
            "/realms/test/.well-known/openid-configuration": {
                "issuer": self.realm,
                "jwks_uri": f"{self.realm}/protocol/openid-connect/certs",
                "token_endpoint": f"{self.realm}/protocol/openid-connect/token",
            },
            "/realms/test/protocol/openid-connect/certs": {"keys": [{**jwk, "kid": "test", "alg": "RS256"}]},
        }
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def _handler(self):
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                doc = idp.documents.get(self.path)
                body = json.dumps(doc).encode()
                self.send_response(200 if doc else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        return Handler

    def token(self, roles: list[str], expires_in: float = 600, key=None) -> dict[str, str]:
        claims = {"preferred_username": "tester", "exp": int(time.time() + expires_in)}
        claims["realm_access"] = {"roles": roles}
        signed = jwt.encode(claims, key or self.key, algorithm="RS256", headers={"kid": "test"})
        return {"Authorization": f"Bearer {signed}"}


class AuthServer(Server):
    def wait_ready(self, timeout: float = 180, headers: dict[str, str] | None = None) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if requests.get(self.url + "/info/", headers=headers, timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def idp():
    provider = IdentityProvider()
    yield provider
    provider.http.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory, idp):
    """Auth on, model routes on; the OpenKBP datastore with its label-carrying models damaged and ClamNet's demo."""
    root = tmp_path_factory.mktemp("auth")
    studies, app, models = root / "datastore", root / "app", root / "models"
    shutil.copytree(SAMPLES["openkbp"].datastore, studies)
    shutil.copytree(REPO / "apps" / "labelfactory", app, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
    models.mkdir()
    shutil.copy(DEMO_MODELS / "clamnet.pt", models / "clamnet.pt")
    for name in ("segmentation.pt", "datasetgan.pt"):  # both models that record a label map: damaged
        (models / name).write_bytes(b"not a model any more")
    env = {
        "MONAI_LABEL_AUTH_ENABLE": "true",
        "MONAI_LABEL_AUTH_REALM_URI": idp.realm,
        "LABELFACTORY_MODEL_ROUTES": "true",
        "OMP_NUM_THREADS": "1",
    }
    conf = {"models": "all", "skip_scoring": "true", "model_dir": str(models), "labels_fallback": "openkbp"}
    srv = AuthServer(studies, app, conf, env)
    srv.models, srv.studies = models, studies
    try:
        srv.wait_ready(headers=idp.token([USER]))
        yield srv
    finally:
        srv.stop()


def test_without_a_valid_token_every_route_answers_401(server, idp):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for headers in ({}, idp.token([ADMIN], expires_in=-60), idp.token([ADMIN], key=other)):  # none, expired, forged
        assert requests.get(f"{server.url}/info/", headers=headers, timeout=60).status_code == 401
        assert requests.post(f"{server.url}/train/clamnet", json={}, headers=headers, timeout=60).status_code == 401
        assert requests.delete(f"{server.url}/model/clamnet", headers=headers, timeout=60).status_code == 401


def test_a_user_token_infers_but_cannot_train_save_labels_or_touch_models(server, idp):
    user = idp.token([USER])
    info = requests.get(f"{server.url}/info/", headers=user, timeout=60)
    assert info.status_code == 200
    organs = (server.studies / "organs" / "validation_pt_201.nii.gz").read_bytes()
    denied = [
        requests.post(f"{server.url}/train/clamnet", json={}, headers=user, timeout=60),
        requests.put(
            f"{server.url}/datastore/label",
            params={"image": "validation_pt_201"},
            files={"label": ("l.nii.gz", organs)},
            headers=user,
            timeout=60,
        ),
        requests.delete(f"{server.url}/model/clamnet", headers=user, timeout=60),
        requests.put(f"{server.url}/model/clamnet", files={"file": ("c.pt", b"x")}, headers=user, timeout=60),
    ]
    assert [r.status_code for r in denied] == [403] * 4, [r.text for r in denied]
    assert (server.models / "clamnet.pt").is_file()


def test_an_admin_token_trains_saves_labels_and_manages_models(server, idp):
    admin = idp.token([ADMIN, ANNOTATOR, USER])  # Keycloak: the admin role composite of the others
    organs = (server.studies / "organs" / "validation_pt_201.nii.gz").read_bytes()
    saved = requests.put(
        f"{server.url}/datastore/label",
        params={"image": "validation_pt_201"},
        files={"label": ("l.nii.gz", organs)},
        headers=admin,
        timeout=60,
    )
    assert saved.status_code == 200, saved.text
    garbage = requests.put(f"{server.url}/model/clamnet", files={"file": ("c.pt", b"x")}, headers=admin, timeout=60)
    assert garbage.status_code == 409, garbage.text  # checked as a model file before anything is replaced
    demo = (DEMO_MODELS / "clamnet.pt").read_bytes()
    assert (server.models / "clamnet.pt").read_bytes() == demo
    wrong_kind = requests.put(
        f"{server.url}/model/clamnet",
        files={"file": ("s.pt", (DEMO_MODELS / "stylegan2.pt").read_bytes())},
        headers=admin,
        timeout=60,
    )
    assert wrong_kind.status_code == 400 and "'stylegan2'" in wrong_kind.json()["detail"]
    replaced = requests.put(f"{server.url}/model/clamnet", files={"file": ("c.pt", demo)}, headers=admin, timeout=60)
    assert replaced.status_code == 200, replaced.text
    assert hash_path(server.models / "clamnet.pt").is_file()  # published with its hash
    deleted = requests.delete(f"{server.url}/model/clamnet", headers=admin, timeout=60)
    assert deleted.status_code == 200 and not (server.models / "clamnet.pt").exists()
    assert any(p.name.startswith("clamnet.pt.") and p.name.endswith(".deleted") for p in server.models.iterdir())
    folder = requests.delete(f"{server.url}/model/synthesis", headers=admin, timeout=60)
    assert folder.status_code in (400, 404) and server.models.is_dir()  # never the models folder itself
    train = requests.post(f"{server.url}/train/clamnet", json={"steps": 1}, headers=admin, timeout=60)
    requests.delete(f"{server.url}/train/", headers=admin, timeout=60)
    assert train.status_code == 200, train.text


def test_damaged_label_carrying_models_fall_back_to_the_data_sets_own_map(server, idp):
    info = requests.get(f"{server.url}/info/", headers=idp.token([USER]), timeout=60).json()
    assert info["label_map"] == "openkbp" and "larynx" in info["labels"]
    log = server.log.read_text()
    assert "label map 'openkbp'" in log and "segmentation.pt damaged" in log
