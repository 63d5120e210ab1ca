"""MONAI Label's server application with a guard in front: ``--uvicorn_app lib.server:app``.

``monailabel start_server`` serves ``monailabel.app:app``; its endpoints parse the ``params`` form
field with ``json.loads`` and answer 500 to malformed or non-object JSON, accept uploads of any
size, and turn "image not found" into 500. This module serves the same application (through
``start_server``'s own ``--uvicorn_app`` option, no MONAI Label code changed) with:

- a request-body limit (``--conf max_upload_mb``, default 2048): larger bodies get 413 before any
  endpoint runs, whether or not they announce their length;
- form fields ``params`` and ``info`` checked to be JSON objects (422 otherwise);
- MONAI Label's "not found" exceptions answered with 404 and its invalid-input errors with 422;
- with authentication on (``MONAI_LABEL_AUTH_ENABLE=true``), bearer tokens verified with an explicit
  algorithm list: MONAI Label 0.8.5 calls ``jwt.decode`` without ``algorithms``, which PyJWT 2 rejects
  for every token, so no one could sign in. The fix replaces MONAI Label's ``get_current_user``
  dependency through FastAPI's ``dependency_overrides``; roles are still checked by MONAI Label.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import jwt
from fastapi import Depends, HTTPException
from monailabel.app import app
from monailabel.config import settings
from monailabel.endpoints.user import auth
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from starlette.requests import Request
from starlette.responses import JSONResponse

from lib.core.training import TrainingDataError
from lib.datastore import max_upload_mb
from lib.ohif import install as install_ohif
from lib.serving.infer_route import install as install_serving
from lib.trainers.adapter_train import AdapterTrainTask

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_FIELDS = ("params", "info")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
SPOOL_IN_MEMORY = 8 << 20


def json_field_problem(name: str, value: object) -> str | None:
    """Why a ``params``/``info`` form field would break MONAI Label's endpoint (None when fine)."""
    if not isinstance(value, str):
        return f"form field '{name}' must be text holding a JSON object"
    if not value.strip():
        return None  # MONAI Label treats an empty field as {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        return f"form field '{name}' is not valid JSON: {e}"
    if not isinstance(parsed, dict):
        return f"form field '{name}' must be a JSON object, got {type(parsed).__name__}"
    return None


def train_options_problem(body: bytes) -> str | None:
    """Why a train request's JSON options would fail the round (None otherwise): the train task's own
    parsing (types, ranges, selection metric, adapter design and head), applied to the request alone."""
    try:
        options = json.loads(body) if body.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # MONAI Label's own parsing answers malformed bodies
    if not isinstance(options, dict):
        return None
    try:
        AdapterTrainTask.settings_from_request(options)
    except TrainingDataError as e:
        return str(e)
    return None


class RequestGuard:
    """ASGI middleware: bounded request bodies, checked JSON form fields (see module doc)."""

    def __init__(self, app: Callable, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_body_bytes
            except ValueError:
                await self._reply(scope, receive, send, 400, "invalid Content-Length header")
                return
            if too_big:
                await self._reply(scope, receive, send, 413, self._too_big())
                return
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as body:
            size, more = 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    await self._reply(scope, receive, send, 413, self._too_big())
                    return
                body.write(chunk)
                more = message.get("more_body", False)
            content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
            if scope["path"].rstrip("/") == "/train" or scope["path"].startswith("/train/"):
                body.seek(0)
                problem = train_options_problem(body.read(size))
                if problem:  # refused before MONAI Label starts a round in its subprocess
                    await self._reply(scope, receive, send, 422, problem)
                    return
            if content_type.startswith(FORM_TYPES):
                body.seek(0)
                problem = await self._form_problem(scope, self._replay(body, size, receive))
                if problem:
                    await self._reply(scope, receive, send, 422 if "JSON" in problem else 400, problem)
                    return
            body.seek(0)
            await self.app(scope, self._replay(body, size, receive), send)

    def _too_big(self) -> str:
        return f"request body exceeds the upload limit of {self.max_body_bytes} bytes (--conf max_upload_mb)"

    @staticmethod
    def _replay(body: Any, size: int, receive: Receive) -> Receive:
        done = False

        async def replay() -> Message:
            nonlocal done
            if done:
                return await receive()  # after the body: wait for the client's disconnect
            chunk = body.read(1 << 20)
            done = not chunk or body.tell() >= size
            return {"type": "http.request", "body": chunk, "more_body": not done}

        return replay

    @staticmethod
    async def _form_problem(scope: Scope, receive: Receive) -> str | None:
        request = Request(scope, receive)
        try:
            form = await request.form()
        except Exception as e:  # noqa: BLE001 - any parser failure is a malformed request
            return f"malformed form body: {e}"
        try:
            for name in JSON_FIELDS:
                if name in form:
                    problem = json_field_problem(name, form[name])
                    if problem:
                        return problem
        finally:
            await form.close()
        return None

    @staticmethod
    async def _reply(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)


def user_from_token(token: str) -> auth.User:
    """MONAI Label's token check (signature, expiry; audience not checked) with explicit algorithms
    (``MONAI_LABEL_AUTH_ALGORITHMS``, comma-separated, default RS256 as Keycloak signs)."""
    algorithms = [a.strip() for a in os.environ.get("MONAI_LABEL_AUTH_ALGORITHMS", "RS256").split(",") if a.strip()]
    key = auth.get_public_key(settings.MONAI_LABEL_AUTH_REALM_URI)
    options = {"verify_signature": True, "verify_aud": False, "verify_exp": True}
    payload = jwt.decode(token, key, algorithms=algorithms, options=options)
    roles: Any = payload
    for part in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
        roles = roles.get(part) if isinstance(roles, dict) else None
    return auth.User(
        username=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME),
        email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
        name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
        roles=list(roles or []),
    )


async def verified_user(token: str = Depends(auth.oauth2_scheme)) -> auth.User:
    try:
        return user_from_token(token)
    except jwt.InvalidTokenError as e:
        raise HTTPException(
            status_code=401, detail=f"could not validate credentials: {e}", headers={"WWW-Authenticate": "Bearer"}
        ) from None


async def _not_found(request: Request, exc: MONAILabelException) -> JSONResponse:
    return JSONResponse({"detail": exc.msg}, status_code=404)


async def _monailabel_error(request: Request, exc: MONAILabelException) -> JSONResponse:
    status = 422 if exc.error == MONAILabelError.INVALID_INPUT else 500
    return JSONResponse({"detail": exc.msg}, status_code=status)


async def _bad_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
    return JSONResponse({"detail": f"malformed JSON: {exc}"}, status_code=422)


app.add_middleware(RequestGuard, max_body_bytes=int(max_upload_mb(settings.MONAI_LABEL_APP_CONF) * 1024 * 1024))
app.add_exception_handler(ImageNotFoundException, _not_found)
app.add_exception_handler(LabelNotFoundException, _not_found)
app.add_exception_handler(MONAILabelException, _monailabel_error)
app.add_exception_handler(json.JSONDecodeError, _bad_json)
if settings.MONAI_LABEL_AUTH_ENABLE:
    app.dependency_overrides[auth.get_current_user] = verified_user
# inference in scheduler worker threads, not in the event loop (--conf scheduler false: MONAI Label's own)
install_serving(app, settings.MONAI_LABEL_APP_CONF)
install_ohif(app)  # OHIF: Save Label, status line, raw labelmaps, X-Model-Version (lib/ohif.py)

__all__ = ["app", "RequestGuard", "json_field_problem", "max_upload_mb"]
