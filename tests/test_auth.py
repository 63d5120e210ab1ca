"""With MONAI Label's authentication on, requests without a valid token are refused.

MONAI Label checks bearer tokens (RS256 JWTs) against the public key of an OpenID realm (Keycloak in
production). The test runs a minimal realm endpoint on loopback that publishes a public key, as
Keycloak's ``/realms/<name>`` does, and signs tokens with the matching private key.
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
from live_server import free_port

from conftest import APP, SAMPLE, Server, studies_copy

ROLES = {"user": "monailabel-user", "annotator": "monailabel-annotator", "admin": "monailabel-admin"}


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def token(key: rsa.RSAPrivateKey, roles: list[str], expires_in: float = 600) -> str:
    claims = {
        "preferred_username": "annotator1",
        "email": "a@example.org",
        "name": "Annotator One",
        "realm_access": {"roles": roles},
        "exp": int(time.time() + expires_in),
    }
    return jwt.encode(claims, key, algorithm="RS256")


@pytest.fixture(scope="module")
def realm():
    """A loopback OpenID realm that publishes the public key MONAI Label verifies tokens with."""
    key = new_key()
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    body = json.dumps({"realm": "monailabel", "public_key": base64.b64encode(der).decode()}).encode()

    class Realm(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(200 if self.path.startswith("/realms/monailabel") else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Realm)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield key, f"http://127.0.0.1:{httpd.server_address[1]}/realms/monailabel"
    httpd.shutdown()


@pytest.fixture(scope="module")
def secured(tmp_path_factory, realm):
    base = tmp_path_factory.mktemp("secured")
    app_dir = base / "app"
    shutil.copytree(APP, app_dir, ignore=shutil.ignore_patterns("model", "__pycache__", "logs"))
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm[1]}
    server = Server(studies_copy(base / "studies"), app_dir, base / "server.log", env=env, ready_status=401)
    yield server
    server.stop()


def test_unauthenticated_requests_are_refused(secured, realm):
    key, _ = realm
    url = secured.url
    label = (SAMPLE / "reference" / "spleen_ct.nii.gz").read_bytes()
    click = {"params": (None, json.dumps({"foreground": [[60, 50, 12]]}))}

    def calls(headers: dict) -> dict[str, int]:
        return {
            "info": requests.get(f"{url}/info/", headers=headers, timeout=30).status_code,
            "infer": requests.post(
                f"{url}/infer/medsam_2d",
                params={"image": "spleen_ct", "output": "json"},
                files=click,
                headers=headers,
                timeout=300,
            ).status_code,
            "save_label": requests.put(
                f"{url}/datastore/label",
                params={"image": "spleen_ct"},
                files={"label": ("l.nii.gz", label)},
                headers=headers,
                timeout=60,
            ).status_code,
            "train": requests.post(f"{url}/train/medsam", json={}, headers=headers, timeout=30).status_code,
        }

    def bearer(value: str) -> dict:
        return {"Authorization": f"Bearer {value}"}

    assert set(calls({}).values()) == {401}, "no token"
    assert set(calls(bearer("not-a-token")).values()) == {401}, "garbage token"
    assert set(calls(bearer(token(new_key(), list(ROLES.values())))).values()) == {401}, "signed by another key"
    assert set(calls(bearer(token(key, list(ROLES.values()), expires_in=-60))).values()) == {401}, "expired token"

    as_user = calls(bearer(token(key, [ROLES["user"]])))
    assert as_user["info"] == 200 and as_user["infer"] == 200
    assert as_user["save_label"] == 403 and as_user["train"] == 403, f"a user may not label or train: {as_user}"
    as_annotator = calls(bearer(token(key, [ROLES["user"], ROLES["annotator"]])))
    assert as_annotator["save_label"] == 200
    assert (secured.studies / "labels" / "final" / "spleen_ct.nii.gz").is_file()
