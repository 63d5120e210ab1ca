"""Inference off the event loop: priority classes, round-robin between clients, bounded queues.

Jobs are plain callables run by worker threads. A job waits in the queue of its priority class;
within a class every client has its own FIFO and the clients take turns (round robin), so one
client's burst never starves another. Workers always take the most urgent class first:

    CLICK         a correction on a slice whose embedding is cached (decoder only, tens of ms)
    FIRST_PROMPT  a prompt on a slice that needs its encoder pass, or an object's lone first click
                  (its scale candidates: several decoder passes)
    VOLUME        3D propagation, DeepEdit and automatic (every slice)
    PREFETCH      background encodes of slices a client is likely to open next

``general_workers`` threads take any class, but whole-volume (VOLUME) jobs occupy at most
``general_workers - 1`` of them (at least one), so a 3D propagation leaves a worker for other
clients' first prompts; the optional click lane is one more thread that only takes CLICK jobs, so a
cached click never waits behind a running encoder pass or 3D propagation. A PREFETCH job starts only
when nothing else runs or waits (real requests pause the prefetch; a running encode is not
interrupted). General workers run at a lower OS priority than the click lane (``worker_nice``,
Linux per-thread niceness, inherited by the compute threads they start), so when encodes and clicks
compete for the cores, the clicks get them first. Queues are bounded: a full interactive queue (or a client's own
share of it) rejects the job with :class:`Overloaded` (HTTP 503 with Retry-After), a full prefetch
queue drops its oldest job. Plain Python, no web framework: the HTTP side is ``infer_route``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import IntEnum
from functools import partial
from typing import Any

from ..conf_values import conf_flag, conf_int

logger = logging.getLogger(__name__)


class lower_thread_priority:  # noqa: N801 - used like a function
    """Raise the calling thread's niceness by ``by`` (Linux: per thread; threads and processes it starts
    later inherit it). Does nothing where that is not possible. As a context manager, the thread's
    niceness is put back on exit (its children keep theirs)."""

    def __init__(self, by: int) -> None:
        self.before: int | None = None
        if by <= 0:
            return
        try:
            self.tid = threading.get_native_id()
            self.before = os.getpriority(os.PRIO_PROCESS, self.tid)
            os.setpriority(os.PRIO_PROCESS, self.tid, min(19, self.before + by))
        except (AttributeError, OSError):
            self.before = None

    def __enter__(self) -> lower_thread_priority:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.before is not None:
            # lowering niceness back may need privileges: then it stays lower, which is harmless
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, self.tid, self.before)


class Priority(IntEnum):
    CLICK = 0
    FIRST_PROMPT = 1
    VOLUME = 2
    PREFETCH = 3


INTERACTIVE = (Priority.CLICK, Priority.FIRST_PROMPT, Priority.VOLUME)


class Overloaded(RuntimeError):
    """The queue is full; ``retry_after`` is a guess in whole seconds of when there will be room."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServingConfigError(ValueError):
    """A ``--conf`` serving option has a value that cannot be used."""


@dataclass(frozen=True)
class SchedulerSettings:
    """``--conf`` options of the serving layer, parsed once (see :meth:`from_conf`)."""

    enabled: bool = True  # scheduler: false serves MONAI Label's own /infer (serial, in the event loop)
    general_workers: int = 2  # scheduler_workers: threads that run any job (VOLUME jobs on all but one)
    click_lane: bool = True  # scheduler_click_lane: one more thread for decoder-only clicks
    queue_limit: int = 32  # scheduler_queue_limit: interactive jobs waiting, all clients together
    client_queue_limit: int = 8  # scheduler_client_queue_limit: interactive jobs waiting per client
    prefetch_slices: int = 2  # prefetch_slices: neighbours encoded each side of a prompted slice (0: off)
    prefetch_queue_limit: int = 64  # prefetch_queue_limit: background jobs waiting (oldest dropped)
    prefetch_on_open: bool = False  # prefetch_on_open: a client's first prompt on an image encodes it all
    torch_threads: int = 0  # scheduler_torch_threads: torch intra-op threads (0: leave torch's default)
    worker_nice: int = 5  # scheduler_worker_nice: general workers' niceness above the click lane's (0: same)

    @classmethod
    def from_conf(cls, conf: dict[str, str] | None) -> SchedulerSettings:
        conf = dict(conf or {})
        d = cls()
        flag = partial(conf_flag, conf, error=ServingConfigError)
        whole = partial(conf_int, conf, error=ServingConfigError)
        return cls(
            enabled=flag("scheduler", d.enabled),
            general_workers=whole("scheduler_workers", d.general_workers, 1, 64),
            click_lane=flag("scheduler_click_lane", d.click_lane),
            queue_limit=whole("scheduler_queue_limit", d.queue_limit, 1, 100_000),
            client_queue_limit=whole("scheduler_client_queue_limit", d.client_queue_limit, 1, 100_000),
            prefetch_slices=whole("prefetch_slices", d.prefetch_slices, 0, 64),
            prefetch_queue_limit=whole("prefetch_queue_limit", d.prefetch_queue_limit, 1, 100_000),
            prefetch_on_open=flag("prefetch_on_open", d.prefetch_on_open),
            torch_threads=whole("scheduler_torch_threads", d.torch_threads, 0, 1024),
            worker_nice=whole("scheduler_worker_nice", d.worker_nice, 0, 19),
        )


@dataclass
class Job:
    fn: Callable[[], Any]
    priority: Priority
    client: str
    key: Hashable | None = None  # background jobs: one queued job per key
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


class InferenceScheduler:
    """Worker threads fed from per-class, per-client queues (see the module doc). Threads start with
    the first job, not in the constructor."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self._queues: dict[Priority, OrderedDict[str, deque[Job]]] = {p: OrderedDict() for p in Priority}
        self._background_keys: dict[Hashable, Job] = {}
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._running: dict[Priority, int] = {p: 0 for p in Priority}
        self._closed = False
        self._service_s: dict[Priority, float] = {p: 0.5 for p in Priority}  # moving average, for Retry-After
        self.counts = {"done": 0, "failed": 0, "rejected": 0, "dropped": 0}

    # -- submitting -------------------------------------------------------------------------------
    def submit(self, priority: Priority, client: str, fn: Callable[[], Any], key: Hashable | None = None) -> Future:
        """Queue ``fn``; its future holds the result or the exception. Raises :class:`Overloaded` when
        an interactive queue is full. Background jobs with a ``key`` already queued are not added twice."""
        job = Job(fn, Priority(priority), client, key)
        with self._cond:
            if self._closed:
                raise Overloaded("the server is shutting down", 5)
            self._start_threads()
            if job.priority == Priority.PREFETCH:
                if key is not None and key in self._background_keys:
                    return self._background_keys[key].future
                while self._waiting((Priority.PREFETCH,)) >= self.settings.prefetch_queue_limit:
                    self._drop_oldest_background()
                if key is not None:
                    self._background_keys[key] = job
            else:
                waiting = self._waiting(INTERACTIVE)
                mine = sum(len(q.get(client, ())) for p, q in self._queues.items() if p in INTERACTIVE)
                if waiting >= self.settings.queue_limit or mine >= self.settings.client_queue_limit:
                    self.counts["rejected"] += 1
                    which = "the server's" if waiting >= self.settings.queue_limit else f"client {client!r}'s"
                    raise Overloaded(
                        f"{which} inference queue is full ({waiting} waiting); try again shortly",
                        self._retry_after(waiting),
                    )
            self._queues[job.priority].setdefault(client, deque()).append(job)
            self._cond.notify_all()
        return job.future

    def drop_background(self, client: str | None = None) -> int:
        """Remove queued background jobs (of one client, or all); returns how many were dropped."""
        with self._cond:
            queues = self._queues[Priority.PREFETCH]
            clients = [client] if client is not None else list(queues)
            dropped = 0
            for c in clients:
                for job in queues.pop(c, ()):
                    self._forget(job)
                    job.future.cancel()
                    dropped += 1
            self.counts["dropped"] += dropped
            return dropped

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "waiting": {p.name.lower(): self._waiting((p,)) for p in Priority},
                "running": {p.name.lower(): n for p, n in self._running.items()},
                "workers": self.settings.general_workers + int(self.settings.click_lane),
                **self.counts,
            }

    def close(self) -> None:
        """Stop taking jobs; queued ones are cancelled, running ones finish."""
        with self._cond:
            self._closed = True
            for queues in self._queues.values():
                for jobs in queues.values():
                    for job in jobs:
                        job.future.cancel()
                queues.clear()
            self._background_keys.clear()
            self._cond.notify_all()

    # -- internals (call with self._cond held) ---------------------------------------------------
    def _waiting(self, priorities: tuple[Priority, ...]) -> int:
        return sum(len(jobs) for p in priorities for jobs in self._queues[p].values())

    def _retry_after(self, waiting: int) -> int:
        per_job = max(self._service_s[p] for p in INTERACTIVE)
        return max(1, math.ceil(waiting * per_job / self.settings.general_workers))

    def _forget(self, job: Job) -> None:
        if job.key is not None and self._background_keys.get(job.key) is job:
            del self._background_keys[job.key]

    def _drop_oldest_background(self) -> None:
        queues = self._queues[Priority.PREFETCH]
        oldest = min(queues, key=lambda c: queues[c][0].queued_at)
        job = queues[oldest].popleft()
        if not queues[oldest]:
            del queues[oldest]
        self._forget(job)
        job.future.cancel()
        self.counts["dropped"] += 1

    def _take(self, click_lane: bool) -> Job | None:
        allowed = (Priority.CLICK,) if click_lane else tuple(Priority)
        for priority in allowed:
            queues = self._queues[priority]
            if not queues:
                continue
            if priority == Priority.VOLUME and self._running[Priority.VOLUME] >= max(
                1, self.settings.general_workers - 1
            ):
                continue  # keep a worker for prompts
            if priority == Priority.PREFETCH and (any(self._running.values()) or self._waiting(INTERACTIVE)):
                return None  # background work waits until the server is idle
            client, jobs = next(iter(queues.items()))
            job = jobs.popleft()
            if jobs:
                queues.move_to_end(client)  # round robin: this client goes behind the others
            else:
                del queues[client]
            self._forget(job)
            return job
        return None

    def _start_threads(self) -> None:
        if self._threads:
            return
        lanes = [False] * self.settings.general_workers + ([True] if self.settings.click_lane else [])
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        for n, click_lane in enumerate(lanes):
            name = "infer-click" if click_lane else f"infer-{n}"
            thread = threading.Thread(target=self._work, args=(click_lane,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _work(self, click_lane: bool) -> None:
        if not click_lane and self.settings.worker_nice:
            lower_thread_priority(self.settings.worker_nice)
        while True:
            with self._cond:
                job = self._take(click_lane)
                while job is None and not self._closed:
                    self._cond.wait()
                    job = self._take(click_lane)
                if job is None:
                    return
                self._running[job.priority] += 1
            started = time.perf_counter()
            outcome = "cancelled"
            try:
                if job.future.set_running_or_notify_cancel():
                    try:
                        job.future.set_result(job.fn())
                        outcome = "done"
                    except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                        job.future.set_exception(e)
                        outcome = "failed"
            finally:
                with self._cond:
                    self._running[job.priority] -= 1
                    took = time.perf_counter() - started
                    self._service_s[job.priority] = 0.8 * self._service_s[job.priority] + 0.2 * took
                    if outcome != "cancelled":
                        self.counts[outcome] += 1
                    self._cond.notify_all()
