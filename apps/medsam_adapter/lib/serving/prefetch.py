"""Background encodes into the embedding cache, so that moving to another slice feels like a click.

- After a prompt on slice k a client's neighbours are queued (k+1, k+2, ... in the direction the client
  is moving, then the other side; ``prefetch_slices`` each way) at the scheduler's lowest priority. A
  newer prompt of the same client replaces its queued neighbours; real requests always go first.
- A whole volume or a slice range can be precomputed (``POST /prefetch/{model}?image=...``, or the first
  prompt on an image with ``--conf prefetch_on_open true``); ``GET /prefetch/{model}?image=...`` shows
  its progress. One slice is one background job, so real requests slip in between slices. A range never
  takes more than half the embedding cache (the rest stays for the slices annotators work on); the cache
  itself never holds more than its budget (:class:`lib.core.cache.EmbeddingCache` evicts LRU).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from lib.core.engine import InteractiveSegmenter

from .scheduler import InferenceScheduler, Overloaded, Priority

logger = logging.getLogger(__name__)
RANGE_SHARE_OF_CACHE = 0.5
MAX_TRACKED = 256  # progress records and per-client positions kept (oldest forgotten)


def neighbour_order(k: int, previous: int | None, depth: int, size: int) -> list[int]:
    """Slices to encode after a prompt on ``k``: ahead in the direction of travel (from ``previous``)
    first, then behind; alternating when there is no direction. Only slices inside ``[0, size)``."""
    ahead = [k + d for d in range(1, depth + 1)]
    behind = [k - d for d in range(1, depth + 1)]
    if previous is not None and previous > k:
        order = behind + ahead
    elif previous is not None and previous < k:
        order = ahead + behind
    else:
        order = [s for pair in zip(ahead, behind, strict=True) for s in pair]
    return [s for s in order if 0 <= s < size]


def _encode(segmenter: InteractiveSegmenter, path: str, k: int, window: str | None) -> bool:
    start = time.perf_counter()
    encoded = segmenter.prefetch(path, k, window)
    if encoded:
        logger.info("prefetched slice %d of %s in %.0f ms", k, path, (time.perf_counter() - start) * 1e3)
    return encoded


@dataclass
class RangeProgress:
    """Progress of one precomputed range, as ``GET /prefetch/{model}`` reports it."""

    model: str
    image: str
    first: int
    last: int
    total: int
    done: int = 0  # slices handled (encoded now or found cached)
    encoded: int = 0  # of those, encoded by this range
    state: str = "queued"  # queued | running | done | limited (cache share used) | failed | stopped | replaced
    detail: str = ""
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fraction"] = round(self.done / self.total, 3) if self.total else 1.0
        return out


class Prefetcher:
    """Queues background encodes on an :class:`InferenceScheduler` and tracks precomputed ranges."""

    def __init__(self, scheduler: InferenceScheduler, depth: int) -> None:
        self.scheduler = scheduler
        self.depth = depth
        self._lock = threading.Lock()
        self._last_slice: OrderedDict[tuple[str, str], int] = OrderedDict()  # (client, image) -> k
        self._ranges: OrderedDict[tuple[str, str], RangeProgress] = OrderedDict()  # (model, image)

    def after_prompt(
        self, segmenter: InteractiveSegmenter, client: str, image: str, path: str, k: int, window: str | None
    ) -> int:
        """Replace the client's queued neighbours with those of slice ``k``; returns how many were queued."""
        volume = segmenter.volumes.peek(path)
        with self._lock:
            previous = self._last_slice.pop((client, image), None)
            self._last_slice[(client, image)] = k
            while len(self._last_slice) > MAX_TRACKED:
                self._last_slice.popitem(last=False)
        if volume is None or self.depth <= 0 or segmenter.embeddings.max_bytes <= 0:
            return 0  # nothing to keep the encodes in (embedding_cache_mb 0)
        owner = f"neighbours:{client}"
        self.scheduler.drop_background(owner)
        queued = 0
        for s in neighbour_order(k, previous, self.depth, volume.shape[2]):
            if segmenter.has_embedding(path, s, window):
                continue
            key = ("slice", id(segmenter), path, s, window)
            self.scheduler.submit(Priority.PREFETCH, owner, partial(_encode, segmenter, path, s, window), key)
            queued += 1
        return queued

    def precompute(
        self,
        segmenter: InteractiveSegmenter,
        model: str,
        image: str,
        path: str,
        first: int | None = None,
        last: int | None = None,
        window: str | None = None,
    ) -> RangeProgress:
        """Queue every slice of ``first..last`` (default: the whole volume) unless that range is queued
        or running already; returns its progress record."""
        volume = segmenter.volumes.get(path)
        size = volume.shape[2]
        first = 0 if first is None else max(0, min(first, size - 1))
        last = size - 1 if last is None else max(first, min(last, size - 1))
        with self._lock:
            current = self._ranges.get((model, image))
            if current and current.state in ("queued", "running") and (current.first, current.last) == (first, last):
                return current
            if current and current.state in ("queued", "running"):
                current.state, current.finished = "replaced", time.time()  # its chain stops at the next step
            progress = RangeProgress(model, image, first, last, total=last - first + 1)
            self._ranges[(model, image)] = progress
            self._ranges.move_to_end((model, image))
            while len(self._ranges) > MAX_TRACKED:
                self._ranges.popitem(last=False)
        middle = (first + last) // 2  # from the middle outwards: where the object most likely is
        order = [middle] + [s for s in neighbour_order(middle, None, size, size) if first <= s <= last]
        self._next_step(segmenter, progress, path, order, 0, window)
        return progress

    def _next_step(
        self, segmenter: InteractiveSegmenter, progress: RangeProgress, path: str, order: list[int], i: int, window
    ) -> None:
        """Queue slice ``order[i]`` of a range; when it has run, the next one is queued (one job per range
        waits at a time, so a long range neither floods the queue nor loses its order)."""
        if i >= len(order) or progress.state not in ("queued", "running"):
            return

        def step() -> None:
            self._encode_range_slice(segmenter, progress, path, order[i], window)
            self._next_step(segmenter, progress, path, order, i + 1, window)

        def dropped(future) -> None:
            if future.cancelled() and progress.state in ("queued", "running"):
                progress.state, progress.finished = "stopped", time.time()
                progress.detail = "dropped from the background queue (server busy or shutting down); start it again"

        try:
            future = self.scheduler.submit(Priority.PREFETCH, f"range:{progress.model}:{progress.image}", step)
        except Overloaded:  # only on shutdown: background jobs are never refused otherwise
            progress.state, progress.finished, progress.detail = "stopped", time.time(), "the server is shutting down"
            return
        future.add_done_callback(dropped)

    @staticmethod
    def _encode_range_slice(
        segmenter: InteractiveSegmenter, progress: RangeProgress, path: str, s: int, window: str | None
    ) -> None:
        if progress.state not in ("queued", "running"):
            return
        progress.state = "running"
        try:
            cache = segmenter.embeddings
            # a slice may need two embeddings (shipped adapters that change the encoder, and the base model's)
            per_slice = cache.nbytes / len(cache) * len(segmenter.slice_versions()) if len(cache) else 0.0
            if per_slice and (progress.encoded + 1) * per_slice > cache.max_bytes * RANGE_SHARE_OF_CACHE:
                progress.state = "limited"
                progress.detail = (
                    f"stopped after {progress.encoded} encoded slices: a range may fill at most "
                    f"{RANGE_SHARE_OF_CACHE:.0%} of the embedding cache ({cache.max_bytes / 1e6:.0f} MB)"
                )
                progress.finished = time.time()
                return
            progress.encoded += int(_encode(segmenter, path, s, window))
            progress.done += 1
            if progress.done >= progress.total:
                progress.state = "done"
                progress.finished = time.time()
        except Exception as e:  # noqa: BLE001 - reported through the progress record
            progress.state, progress.detail, progress.finished = "failed", str(e), time.time()
            logger.exception("precomputing %s slice %d failed", progress.image, s)

    def progress(self, model: str, image: str) -> RangeProgress | None:
        with self._lock:
            return self._ranges.get((model, image))

    def recent(self, count: int) -> list[RangeProgress]:
        """The ``count`` most recently started ranges, newest first."""
        with self._lock:
            return list(reversed(self._ranges.values()))[:count]

    def seen(self, model: str, image: str) -> bool:
        with self._lock:
            return (model, image) in self._ranges
