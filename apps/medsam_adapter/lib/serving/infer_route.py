"""``POST /infer/{model}`` run by the scheduler instead of inside the event loop; ``/prefetch/{model}``.

MONAI Label 0.8.5 runs inference synchronously inside its ``async`` endpoint, so while one request
infers, every other request (clicks of other annotators, ``/info`` polling, label saves) waits. This
module registers its own ``/infer/{model}`` route ahead of MONAI Label's, with the same parameters and
the same role check, and hands MONAI Label's own request handling
(:func:`monailabel.endpoints.infer.run_inference`: parsing, ``app.infer``, the multipart / file / JSON
answer) to :class:`~lib.serving.scheduler.InferenceScheduler` worker threads. Answers are what MONAI
Label's endpoint gives; only where and when they are computed changes. ``--conf scheduler false``
leaves MONAI Label's endpoint in place (the serial path).

Priority of a request: a 2D prompt on a slice whose embedding is cached is a CLICK, any other 2D
prompt a FIRST_PROMPT, as is a lone foreground click (the first click on an object, answered with its
scale candidates: several decoder passes), 3D / DeepEdit / automatic tasks VOLUME. Clients are told apart by the
``client_id`` the clients send (3D Slicer does), else the signed-in user, else the remote address.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, File, Form, HTTPException, UploadFile
from monailabel.config import settings
from monailabel.endpoints.infer import ResultType, run_inference
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from lib.core.engine import InteractiveSegmenter
from lib.core.prompts import PromptError, choose_slice, parse_prompts, parse_slice
from lib.infers.tasks import WINDOWS

from .prefetch import Prefetcher
from .scheduler import InferenceScheduler, Overloaded, Priority, SchedulerSettings

logger = logging.getLogger(__name__)
MAX_PATHS = 4096
# FastAPI parameter declarations, as MONAI Label's endpoint declares them
USER = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
PARAMS_FIELD = Form("{}")
NO_FILE = File(None)


def is_lone_click(data: dict) -> bool:
    """One foreground click and nothing else (no background click, no box): an object's first click."""
    fg, bg = data.get("foreground") or [], data.get("background") or []
    return isinstance(fg, list) and len(fg) == 1 and not bg and not data.get("roi")


@dataclass
class Plan:
    """What the scheduler needs to know about one infer request."""

    priority: Priority
    client: str
    task: Any  # the app's MedSamInferTask, None for other tasks
    data: dict


def request_params(params: str | None) -> dict:
    """The request's ``params`` form field as MONAI Label reads it ({} when empty or not an object)."""
    try:
        value = json.loads(params) if params else {}
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def window_option(data: dict) -> str | None:
    value = data.get("window", "auto")
    if isinstance(value, list):
        value = value[0] if value else "auto"
    return None if value in (None, "", "auto") else str(value)


def prompt_slice(segmenter: InteractiveSegmenter, path: str, data: dict, three_d: bool) -> int | None:
    """The slice a prompted request acts on, when its volume is loaded and its prompts are valid."""
    volume = segmenter.volumes.peek(path)
    if volume is None:
        return None
    try:
        prompts = parse_prompts(data, volume.shape)
        requested = None if three_d else parse_slice(data.get("slice"), volume.shape, 2)
        return choose_slice(prompts, requested, 2)
    except (PromptError, TypeError, ValueError, KeyError):
        return None


def is_prompted(task: Any) -> bool:
    """``medsam_2d`` / ``medsam_3d`` (PromptedTask): clicks and/or a box for one object."""
    return task is not None and isinstance(getattr(task, "three_d", None), bool)


class Serving:
    """The scheduler, the prefetcher and what they remember about images (paths by image id)."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.scheduler = InferenceScheduler(settings)
        self.prefetcher = Prefetcher(self.scheduler, settings.prefetch_slices)
        self._paths: OrderedDict[str, str] = OrderedDict()  # image id -> file, learnt in worker threads
        self._lock = threading.Lock()

    @staticmethod
    def task(model: str) -> Any:
        """The app's MedSAM task named ``model`` (None for others). Duck-typed: MONAI Label unloads and
        re-imports ``lib`` when it loads main.py, so the app's task classes are not the ones imported here."""
        task = getattr(app_instance(), "_infers", {}).get(model)
        return task if hasattr(task, "segmenter") else None

    def path(self, image: str) -> str | None:
        with self._lock:
            return self._paths.get(image)

    def resolve(self, image: str) -> str | None:
        """The image's file (may download a DICOM series: call from a worker thread)."""
        path = self.path(image)
        if path is None:
            path = app_instance().datastore().get_image_uri(image) or None
            if path:
                with self._lock:
                    self._paths[image] = path
                    while len(self._paths) > MAX_PATHS:
                        self._paths.popitem(last=False)
        return path

    def plan(self, model: str, image: str, params: str, uploaded: bool, user: User | None, request: Request) -> Plan:
        """Priority class and client of a request, from what is known without loading anything."""
        data = request_params(params)
        client = data.get("client_id")
        if not isinstance(client, (str, int)) or isinstance(client, bool) or client == "":
            username = getattr(user, "username", None) if settings.MONAI_LABEL_AUTH_ENABLE else None
            client = username or (request.client.host if request.client else "")
        task = self.task(model)
        priority = Priority.FIRST_PROMPT
        if is_prompted(task) and not task.three_d:
            path = self.path(image) if image and not uploaded else None
            k = prompt_slice(task.segmenter, path, data, False) if path else None
            if k is not None and task.segmenter.has_embedding(path, k, window_option(data)):
                # a lone click also answers its scale candidates (~8x a correction's decoder work): it is
                # an object's first prompt, and the click lane stays free for the corrections
                priority = Priority.FIRST_PROMPT if is_lone_click(data) else Priority.CLICK
        elif task is not None:
            priority = Priority.VOLUME
        return Plan(priority, str(client), task, data)

    def status(self) -> dict:
        """What ``/info`` shows under ``serving``: queues, counts and the latest precomputed ranges."""
        return {
            "scheduler": self.scheduler.stats(),
            "prefetch_slices": self.settings.prefetch_slices,
            "ranges": [p.as_dict() for p in self.prefetcher.recent(16)],
        }

    def after(self, plan: Plan, model: str, image: str) -> None:
        """After a prompted request on a datastore image: queue the neighbours (and the whole image on
        a first prompt with ``prefetch_on_open``). Runs in the worker thread."""
        task = plan.task
        if not is_prompted(task) or not image:
            return
        path = self.resolve(image)
        if not path:
            return
        window = window_option(plan.data)
        if self.settings.prefetch_on_open and not self.prefetcher.seen(model, image):
            self.prefetcher.precompute(task.segmenter, model, image, path, window=window)
        if not task.three_d:
            k = prompt_slice(task.segmenter, path, plan.data, False)
            if k is not None:
                self.prefetcher.after_prompt(task.segmenter, plan.client, image, path, k, window)


def serving_status() -> dict | None:
    """The served app's :meth:`Serving.status` (None without the scheduler). Looked up on the served
    FastAPI app: MONAI Label re-imports ``lib`` when it loads main.py, so module globals are not shared."""
    served = sys.modules.get("monailabel.app")
    serving = getattr(getattr(getattr(served, "app", None), "state", None), "serving", None)
    return serving.status() if hasattr(serving, "status") else None


def install_first(app: FastAPI, router: APIRouter) -> None:
    """Include ``router`` so its routes are matched before every existing route."""
    before = len(app.router.routes)
    app.include_router(router)
    added = app.router.routes[before:]
    del app.router.routes[before:]
    app.router.routes[0:0] = added


def install(app: FastAPI, conf: dict[str, str] | None) -> Serving | None:
    """Put the scheduled ``/infer/{model}`` and ``/prefetch/{model}`` routes in front of MONAI Label's
    (None and nothing changed with ``--conf scheduler false``)."""
    serving_settings = SchedulerSettings.from_conf(conf)
    if not serving_settings.enabled:
        return None
    serving = Serving(serving_settings)
    router = APIRouter()

    @router.post("/infer/{model}", include_in_schema=False)
    async def scheduled_inference(
        request: Request,
        response: Response,
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = PARAMS_FIELD,
        file: UploadFile = NO_FILE,
        label: UploadFile = NO_FILE,
        output: ResultType | None = None,
        user: User = USER,
    ) -> Any:
        plan = serving.plan(model, image, params, file is not None or bool(session_id), user, request)
        handle = partial(run_inference, background_tasks, model, image, session_id, params, file, label, output)
        timing: dict[str, float] = {"submitted": time.perf_counter()}

        def job() -> Any:
            timing["started"] = time.perf_counter()
            result = handle()
            timing["ran"] = time.perf_counter() - timing["started"]
            try:
                serving.after(plan, model, image)
            except Exception:  # noqa: BLE001 - prefetch is an optimisation; the answer stands
                logger.exception("queueing prefetch after %s on %s failed", model, image)
            return result

        try:
            future = serving.scheduler.submit(plan.priority, plan.client, job)
        except Overloaded as e:
            raise HTTPException(status_code=503, detail=str(e), headers={"Retry-After": str(e.retry_after)}) from None
        result = await asyncio.wrap_future(future)
        # where the time went, for clients and benchmarks (the body is MONAI Label's own answer)
        server_timing = (
            f"queue;dur={(timing['started'] - timing['submitted']) * 1e3:.1f}, "
            f"infer;dur={timing['ran'] * 1e3:.1f}, class;desc={plan.priority.name.lower()}"
        )
        (result if isinstance(result, Response) else response).headers["Server-Timing"] = server_timing
        return result

    def prefetch_task(model: str) -> Any:
        task = serving.task(model)
        if task is None:
            raise HTTPException(status_code=404, detail=f"no MedSAM task named {model!r}")
        return task

    def status(model: str, image: str) -> dict:
        task = prefetch_task(model)
        progress = serving.prefetcher.progress(model, image) if image else None
        cache = task.segmenter.embeddings
        return {
            "model": model,
            "image": image or None,
            "range": progress.as_dict() if progress else None,
            "embedding_cache": {"bytes": cache.nbytes, "max_bytes": cache.max_bytes, "entries": len(cache)},
            "scheduler": serving.scheduler.stats(),
        }

    @router.get("/prefetch/{model}", include_in_schema=False)
    async def prefetch_status(model: str, image: str = "", user: User = USER) -> dict:
        return status(model, image)

    @router.post("/prefetch/{model}", status_code=202, include_in_schema=False)
    async def prefetch_range(
        model: str,
        image: str,
        first: int | None = None,
        last: int | None = None,
        window: str = "auto",
        user: User = USER,
    ) -> dict:
        """Encode slices ``first..last`` of ``image`` (default: all) in the background."""
        task = prefetch_task(model)
        if image not in app_instance().datastore().list_images():
            raise HTTPException(status_code=404, detail=f"unknown image {image!r}")
        path = await run_in_threadpool(serving.resolve, image)
        if not path:
            raise HTTPException(status_code=404, detail=f"image {image!r} has no file")
        if window not in WINDOWS:
            raise HTTPException(status_code=422, detail=f"window {window!r} is not one of {WINDOWS}")
        if first is not None and last is not None and last < first:
            raise HTTPException(status_code=422, detail=f"last ({last}) must not be below first ({first})")
        precompute = serving.prefetcher.precompute
        await run_in_threadpool(
            precompute, task.segmenter, model, image, path, first, last, window_option({"window": window})
        )
        return status(model, image)

    install_first(app, router)
    app.state.serving = serving
    logger.info("inference scheduler on: %s", serving_settings)
    return serving
