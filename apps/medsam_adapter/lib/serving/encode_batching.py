"""Encodes of concurrent requests run as one batch (dynamic batching, for GPUs).

On a GPU a single 256x256 slice leaves most of the chip idle: a batch of 8 costs little more than
one. When several clients open new slices at once (or prefetch and a first prompt meet), each worker
thread calls the encoder with its own slice; :class:`EncodeBatcher` lets the first caller run and
gathers whatever arrives while it runs into the next call, up to ``max_batch`` items. Nobody waits for
companions: a lone request runs at once, so batching adds no latency, it only stops requests from queueing
one by one behind each other. Inputs are joined along the batch dimension only when the rest of their
shape matches (slices with slices, ``depth`` slice stacks with stacks); each caller gets its own rows back,
or the exception of the batch it was in.

Plain PyTorch, no serving framework: :class:`lib.serving.runtimes.RuntimeEncoder` uses it when
``[inference] encode_batch`` (``--conf encode_batch``) asks for batches above 1 (auto: 8 on CUDA, off on a
CPU, where the cores are already busy with one slice and batching only adds memory).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

Encode = Callable[[Tensor], Tensor]
AUTO_BATCH_CUDA = 8  # encode_batch = 0 (auto) on CUDA


def batch_size_for(setting: int, device: torch.device | str) -> int:
    """The encoder batch a setting means on ``device``: 0 (auto) is 8 on CUDA and 1 (no batching) elsewhere."""
    if setting < 0:
        raise ValueError(f"encode_batch must be 0 (auto) or a positive number, got {setting}")
    if setting:
        return setting
    return AUTO_BATCH_CUDA if torch.device(device).type == "cuda" else 1


@dataclass(eq=False)
class _Request:
    image01: Tensor
    done: bool = False
    result: Tensor | None = None
    error: BaseException | None = None
    signature: tuple = field(init=False)

    def __post_init__(self) -> None:
        x = self.image01
        self.signature = (tuple(x.shape[1:]), x.dtype, x.device)


class EncodeBatcher:
    """Calls ``encode`` for concurrent callers with their inputs joined (see the module doc). Thread-safe."""

    def __init__(self, encode: Encode, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.encode = encode
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._busy = False
        self.calls = 0  # encoder calls made
        self.items = 0  # inputs encoded (items / calls: the mean batch)

    def __call__(self, image01: Tensor) -> Tensor:
        if self.max_batch == 1:
            return self._run_direct(image01)
        request = _Request(image01)
        with self._cond:
            self._pending.append(request)
            while not request.done and self._busy:
                self._cond.wait()
            if not request.done:  # nothing runs: this caller runs the next batch, its own input first
                batch = self._take(request)
                self._busy = True
        if not request.done:
            self._run(batch)
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _run_direct(self, image01: Tensor) -> Tensor:
        with self._cond:
            self.calls += 1
            self.items += int(image01.shape[0])
        return self.encode(image01)

    def _take(self, first: _Request) -> list[_Request]:
        """``first`` and the oldest waiting inputs of its shape, up to ``max_batch`` items in all."""
        batch, size = [first], int(first.image01.shape[0])
        for other in self._pending:
            if other is first or other.signature != first.signature:
                continue
            n = int(other.image01.shape[0])
            if size + n > self.max_batch:
                break
            batch.append(other)
            size += n
        taken = set(map(id, batch))
        self._pending = [r for r in self._pending if id(r) not in taken]
        return batch

    def _run(self, batch: list[_Request]) -> None:
        try:
            joined = batch[0].image01 if len(batch) == 1 else torch.cat([r.image01 for r in batch])
            with torch.inference_mode():
                out = self.encode(joined)
            # copies, not views: a cached embedding must not keep the whole batch's output alive
            rows = [v.clone() for v in out.split([int(r.image01.shape[0]) for r in batch])] if len(batch) > 1 else [out]
            for request, value in zip(batch, rows, strict=True):
                request.result = value
        except BaseException as e:  # noqa: BLE001 - every caller of the batch gets it
            for request in batch:
                request.error = e
        with self._cond:
            self.calls += 1
            self.items += sum(int(r.image01.shape[0]) for r in batch)
            for request in batch:
                request.done = True
            self._busy = False
            self._cond.notify_all()
