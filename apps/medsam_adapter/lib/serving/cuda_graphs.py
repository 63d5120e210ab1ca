"""The encoder replayed from CUDA graphs: one captured per batch size, at that size's first use.

On a GPU a 256x256 TinyViT encode is bound by kernel launches, not arithmetic: eager torch spent 8.5 ms per
slice on an H200 (fp16 autocast 11.0 ms, its casts being more launches), against 4.5 / 2.6 ms per slice
in a batch of 8 (``benchmarks/bench_gpu.py``). A CUDA graph launches the whole encoder at once. Inputs are
copied into the graph's fixed input buffer and the output copied out, under a lock (one replay at a time);
inputs of another per-item shape run eagerly. Each graph has its own memory pool (no sharing to reason
about; a TinyViT graph's pool is small next to a GPU's memory). Capture runs in ``thread_local`` error
mode, so the server's other threads may keep using the GPU while a new model version captures (hot reload).
The first capture's failure is the caller's to handle (:func:`lib.serving.runtimes.build_runtime` reports
the runtime unavailable and the next one serves); a later batch size that cannot be captured runs eagerly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch
from torch import Tensor

logger = logging.getLogger(__name__)
Encode = Callable[[Tensor], Tensor]
WARM_UP = 3  # eager runs on a side stream before capture (cuDNN algorithm choice, allocator pools)


class GraphedEncoder:
    """``encode`` for inputs of ``item_shape`` (without the batch dimension), replayed from CUDA graphs."""

    def __init__(self, encode: Encode, item_shape: tuple[int, ...], device: torch.device) -> None:
        if torch.device(device).type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.encode = encode
        self.item_shape = tuple(item_shape)
        self.device = torch.device(device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        self._lock = threading.Lock()
        self._eager: set[int] = set()  # batch sizes whose capture failed

    def __call__(self, image01: Tensor) -> Tensor:
        x = image01.to(self.device, torch.float32)
        if tuple(x.shape[1:]) != self.item_shape:
            return self.encode(x)
        batch = int(x.shape[0])
        with self._lock:
            if batch not in self._graphs and batch not in self._eager:
                self._capture_or_run_eagerly(batch)
            entry = self._graphs.get(batch)
            if entry is not None:
                graph, static_in, static_out = entry
                static_in.copy_(x)
                graph.replay()
                return static_out.clone()
        return self.encode(x)

    def capture(self, batches: range | list[int], strict: bool = False) -> None:
        """Capture the graphs of these batch sizes now (not at their first use). ``strict``: a failed capture
        raises (the runtime's first graph); otherwise that size is logged and runs eagerly."""
        with self._lock:
            for batch in batches:
                if batch in self._graphs or batch in self._eager:
                    continue
                if strict:
                    self._capture(batch)
                else:
                    self._capture_or_run_eagerly(batch)

    def _capture_or_run_eagerly(self, batch: int) -> None:
        try:
            self._capture(batch)
        except Exception:  # noqa: BLE001 - this size runs eagerly; the answer is the same
            logger.warning("CUDA graph capture for batch %d failed; it runs eagerly", batch, exc_info=True)
            self._eager.add(batch)

    def _capture(self, batch: int) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        static_in = torch.zeros((batch, *self.item_shape), device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(WARM_UP):
                self.encode(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self.encode(static_in)
        self._graphs[batch] = (graph, static_in, static_out)
        return self._graphs[batch]
