"""The OHIF viewer bundled with MONAI Label, completed for the annotator's loop (no OHIF rebuild).

MONAI Label 0.8.5 serves OHIF 3 under ``/ohif/``; its MONAI Label panel can run models and train, but
nothing in it saves a label (its client's ``save_label`` is never called). This module, installed on
the app served by ``lib.server``, adds:

- ``/ohif/app-config.js``: the bundled configuration followed by ``ohif_static/medsam_ohif.js``, an
  inline OHIF extension that puts *Save Label* and a model/training status line into the panel, and
  keeps a bad server address typed into the panel from crashing the viewer;
- ``PUT /datastore/label`` with ``label.bin`` (what the panel's ``save_label`` sends: the labelmap's
  raw bytes, ``params.label_info`` with the segments' names and values): the bytes are placed into the
  image's grid (the grid the server's own answers use), checked against the viewer's description of
  its volume, renumbered 1..N in ``label_info`` order and handed to MONAI Label's own save path as
  NIfTI, so a DICOMweb datastore stores a DICOM-SEG in the PACS and a local folder ``labels/final``.
  Other uploads go to MONAI Label's endpoint unchanged;
- an ``X-Model-Version`` header on inference answers (``output=image`` carries no ``params``), so the
  viewer can show which adapter version answered;
- with a local ``--studies`` folder and ``--conf ohif_dicomweb URL``: OHIF reads the images from that
  DICOMweb server through ``/ohif-dicomweb/`` (images in the folder named by SeriesInstanceUID).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, unquote

import monailabel.endpoints
import numpy as np
import requests
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import Response
from monailabel.config import settings
from monailabel.endpoints import datastore as datastore_endpoints
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import remove_file
from starlette.requests import Request

from lib.core.volume import Volume, VolumeError, load_volume, temp_label_path, write_label
from lib.serving.infer_route import install_first

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

STATIC = Path(__file__).resolve().parent / "ohif_static"
BUNDLED_CONFIG = Path(monailabel.endpoints.__file__).resolve().parent / "static" / "ohif" / "app-config.js"
RAW_SUFFIX = ".bin"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
GRID_MM_TOLERANCE = 1e-2  # DICOM positions are written with a few decimals
DICOMWEB_ROUTE = "/ohif-dicomweb"

AnyUser = Annotated[User, Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))]
Annotator = Annotated[User, Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))]


# -- the viewer's labelmap in the image's grid ----------------------------------------------------
def viewer_grid_affine(grid: dict[str, Any]) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and voxel-to-RAS affine of a cornerstone volume described by ``dimensions``, ``spacing``,
    ``origin`` (LPS mm) and ``direction`` (9 numbers: the i, j and k axes' unit vectors in LPS)."""
    try:
        dims = tuple(int(v) for v in grid["dimensions"])
        spacing = np.asarray(grid["spacing"], dtype=float).reshape(3)
        origin = np.asarray(grid["origin"], dtype=float).reshape(3)
        direction = np.asarray(grid["direction"], dtype=float).reshape(3, 3)
    except (KeyError, TypeError, ValueError) as e:
        raise HTTPException(
            status_code=422, detail=f"params.ohif_grid must hold dimensions, spacing, origin, direction: {e}"
        ) from None
    if len(dims) != 3 or not np.all(np.isfinite(direction)) or not np.all(np.isfinite(origin)):
        raise HTTPException(status_code=422, detail="params.ohif_grid: expected a 3D grid with finite numbers")
    lps = np.eye(4)
    lps[:3, :3] = direction.T * spacing  # columns: the i, j, k steps
    lps[:3, 3] = origin
    return dims, LPS_TO_RAS @ lps  # type: ignore[return-value]


def viewer_to_image_axes(
    viewer_shape: tuple[int, int, int], viewer_affine: np.ndarray, image: Volume
) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """How the viewer's voxel axes map onto the image's: for each image axis, the viewer axis along
    it and whether it runs the other way. 422 when the viewer's volume is not the image's grid (up to
    axis order and direction) — a label in it could not be placed voxel for voxel."""
    steps_v, steps_i = viewer_affine[:3, :3], image.affine[:3, :3]
    order, flips = [], []
    for b in range(3):
        step = steps_i[:, b]
        tol = 1e-3 * np.abs(step).max()
        match = [a for a in range(3) if np.allclose(np.abs(steps_v[:, a]), np.abs(step), atol=tol)]
        if len(match) != 1 or viewer_shape[match[0]] != image.shape[b]:
            raise HTTPException(
                status_code=422,
                detail=f"the viewer's volume {viewer_shape} is not the server's grid of this image "
                f"{image.shape}: the label cannot be placed voxel for voxel",
            )
        a = match[0]
        order.append(a)
        flips.append(bool(np.dot(steps_v[:, a], step) < 0))
    # the viewer's voxel (0,0,0) must sit on an image voxel corner of the same grid
    corner = np.array([image.shape[b] - 1 if flips[b] else 0 for b in range(3)] + [1.0])
    if not np.allclose(image.affine @ corner, viewer_affine[:, 3], atol=GRID_MM_TOLERANCE):
        raise HTTPException(
            status_code=422, detail="the viewer's volume does not start at a corner of the image's grid"
        )
    return tuple(order), tuple(flips)  # type: ignore[return-value]


def labelmap_in_image_grid(raw: bytes, image: Volume, grid: dict[str, Any] | None) -> np.ndarray:
    """The viewer's labelmap bytes (one uint8 per voxel, i fastest, as the server's raw NRRD answers
    are laid out) as an array in the image's voxel order."""
    viewer_shape = image.shape
    order, flips = (0, 1, 2), (False, False, False)
    if grid is not None:
        viewer_shape, viewer_affine = viewer_grid_affine(grid)
        order, flips = viewer_to_image_axes(viewer_shape, viewer_affine, image)
    expected = int(np.prod(viewer_shape))
    if len(raw) != expected:
        raise HTTPException(
            status_code=422,
            detail=f"label.bin holds {len(raw)} bytes; the image's grid {image.shape} needs {expected} "
            "(one uint8 per voxel)",
        )
    array = np.frombuffer(raw, dtype=np.uint8).reshape(viewer_shape, order="F").transpose(order)
    for axis, flip in enumerate(flips):
        if flip:
            array = np.flip(axis=axis, m=array)
    return np.ascontiguousarray(array)


def renumbered(array: np.ndarray, label_info: Any) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Values renumbered 1..N in ``label_info`` order (names by each entry's ``idx``, the viewer's
    segment index); segments without voxels are left out. 422 for a value without a name."""
    if not isinstance(label_info, list) or not label_info:
        raise HTTPException(status_code=422, detail="params.label_info must list the segments: [{name, idx}, ...]")
    present = set(np.unique(array).tolist()) - {0}
    if not present:
        raise HTTPException(status_code=422, detail="the label is empty: nothing to save")
    out = np.zeros(array.shape, dtype=np.uint8)
    info: list[dict[str, Any]] = []
    named: set[int] = set()
    for entry in label_info:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or type(entry.get("idx")) is not int:
            raise HTTPException(status_code=422, detail=f"label_info entry {entry!r}: expected {{name, idx}}")
        idx = entry["idx"]
        if idx in named:
            raise HTTPException(status_code=422, detail=f"label_info names value {idx} twice")
        named.add(idx)
        if idx not in present:
            continue
        info.append({**entry, "idx": len(info) + 1})
        out[array == idx] = len(info)
    unnamed = sorted(present - named)
    if unnamed:
        raise HTTPException(status_code=422, detail=f"label values {unnamed} have no name in label_info")
    return out, info


def raw_label_as_nifti(image_id: str, raw: bytes, params: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """``label.bin`` written as a NIfTI label in the image's grid and the params to save it with."""
    try:
        image = load_volume(app_instance().datastore().get_image_uri(image_id))
    except VolumeError as e:
        raise HTTPException(status_code=404 if "not found" in str(e) else 415, detail=str(e)) from None
    grid = params.get("ohif_grid")
    array = labelmap_in_image_grid(raw, image, grid if isinstance(grid, dict) else None)
    label, info = renumbered(array, params.get("label_info"))
    path = write_label(label, image.affine, temp_label_path(".nii.gz"))
    saved = {k: v for k, v in params.items() if k != "ohif_grid"}
    saved["label_info"] = info
    return path, saved


# -- routes ----------------------------------------------------------------------------------------
def app_config_script(conf: dict[str, str], studies: str) -> str:
    """The bundled app-config.js, then this app's settings and extension."""
    viewer: dict[str, Any] = {"dicomweb": None}
    if not studies.startswith(("http://", "https://")) and conf.get("ohif_dicomweb"):
        viewer["dicomweb"] = DICOMWEB_ROUTE
    return "\n".join(
        (
            BUNDLED_CONFIG.read_text(),
            f"window.MEDSAM_OHIF = {json.dumps(viewer)};",
            (STATIC / "medsam_ohif.js").read_text(),
        )
    )


router = APIRouter()


@router.get("/ohif/app-config.js", include_in_schema=False)
async def ohif_app_config(user: AnyUser) -> Response:
    body = app_config_script(settings.MONAI_LABEL_APP_CONF or {}, settings.MONAI_LABEL_STUDIES or "")
    return Response(body, media_type="application/javascript", headers={"Cache-Control": "no-store"})


@router.put("/datastore/label", summary="Save Finished Label (also the OHIF panel's raw label.bin)")
def save_label(
    background_tasks: BackgroundTasks,
    image: str,
    label: Annotated[UploadFile, File()],
    user: Annotator,
    params: Annotated[str, Form()] = "{}",
    tag: str = DefaultLabelTag.FINAL.value,
) -> Any:
    if not (label.filename or "").lower().endswith(RAW_SUFFIX):
        return datastore_endpoints.save_label(background_tasks, image, params, tag, label, user.username)
    parsed = json.loads(params) if params and params.strip() else {}
    path, saved = raw_label_as_nifti(image, label.file.read(), parsed)
    background_tasks.add_task(remove_file, str(path))
    with open(path, "rb") as fh:
        converted = UploadFile(file=fh, filename="label.nii.gz")
        return datastore_endpoints.save_label(background_tasks, image, json.dumps(saved), tag, converted, user.username)


def dicomweb_proxy(base: str) -> Callable:
    """A GET route forwarding ``/ohif-dicomweb/<path>`` to the DICOMweb server ``base`` (QIDO/WADO)."""
    auth = None
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        auth = (settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD)

    def proxy(path: str, request: Request, user: AnyUser) -> Response:
        accept = request.headers.get("accept")
        try:
            r = requests.get(
                f"{base.rstrip('/')}/{path}",
                params=list(request.query_params.multi_items()),
                headers={"Accept": accept} if accept else {},
                auth=auth,
                timeout=120,
            )
        except requests.RequestException as e:
            raise HTTPException(status_code=502, detail=f"DICOMweb server {base} unreachable: {e}") from None
        keep = {k: v for k, v in r.headers.items() if k.lower() in ("content-type",)}
        return Response(r.content, status_code=r.status_code, headers=keep)

    return proxy


# -- X-Model-Version on inference answers ----------------------------------------------------------
class AnswerVersions:
    """The model version of the latest answer per (task, image), written by the app after inference
    (in whatever thread ran it) and taken by :class:`ModelVersionHeader` when the answer goes out.
    Two concurrent requests for the same task and image may swap entries; both name the version
    served at that moment."""

    def __init__(self, size: int = 256) -> None:
        self._items: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()
        self.size = size

    def note(self, model: str, image: str, result: Any) -> None:
        version = (result.get("params") or {}).get("model_version") if isinstance(result, dict) else None
        if not version:
            return
        with self._lock:
            self._items[(str(model), str(image))] = str(version)
            self._items.move_to_end((str(model), str(image)))
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def take(self, model: str, image: str) -> str | None:
        with self._lock:
            return self._items.pop((model, image), None)


def note_infer_answer(model: str, image: str, result: Any) -> None:
    """Called by the app with each inference result (see ``MedSamAdapterApp.infer``). The registry
    lives on the served FastAPI app: MONAI Label re-imports the app's modules (``lib.*``) when it
    loads the app, so module globals here are not shared with the middleware."""
    served = sys.modules.get("monailabel.app")
    versions = getattr(getattr(getattr(served, "app", None), "state", None), "answer_versions", None)
    if hasattr(versions, "note"):
        versions.note(model, image, result)


class ModelVersionHeader:
    """ASGI middleware: ``X-Model-Version`` on successful ``/infer/{task}?image=...`` answers."""

    def __init__(self, app: Callable, versions: AnswerVersions) -> None:
        self.app = app
        self.versions = versions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/infer/"):
            await self.app(scope, receive, send)
            return
        model = unquote(path[len("/infer/") :].strip("/"))
        image = next((v for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1")) if k == "image"), "")

        async def send_with_version(message: Message) -> None:
            if message["type"] == "http.response.start" and message.get("status") == 200:
                version = self.versions.take(model, image)
                if version:
                    headers = [*message.get("headers", []), (b"x-model-version", version.encode())]
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_version)


def install(app: FastAPI) -> None:
    """Put this module's routes in front of MONAI Label's (its ``/ohif/{path}`` and
    ``/datastore/label``) and add the version header."""
    conf = settings.MONAI_LABEL_APP_CONF or {}
    studies = settings.MONAI_LABEL_STUDIES or ""
    own = APIRouter()
    own.include_router(router)
    if conf.get("ohif_dicomweb") and not studies.startswith(("http://", "https://")):
        proxy = dicomweb_proxy(conf["ohif_dicomweb"])
        own.add_api_route(DICOMWEB_ROUTE + "/{path:path}", proxy, include_in_schema=False)
    # through include_router, so the routes see the app's dependency overrides (the token check)
    install_first(app, own)
    app.state.answer_versions = AnswerVersions()
    app.add_middleware(ModelVersionHeader, versions=app.state.answer_versions)


__all__ = [
    "install",
    "labelmap_in_image_grid",
    "note_infer_answer",
    "raw_label_as_nifti",
    "renumbered",
    "viewer_grid_affine",
]
