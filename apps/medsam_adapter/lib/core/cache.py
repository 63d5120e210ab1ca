"""EmbeddingCache: image-encoder outputs, LRU-bounded in megabytes, safe under concurrent requests."""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_write


def content_key(image: np.ndarray, *parts: object) -> str:
    """Stable key of an array's content plus any settings that change what is computed from it."""
    digest = hashlib.blake2b(digest_size=20)
    arr = np.ascontiguousarray(image)
    digest.update(f"{arr.shape}|{arr.dtype}|".encode())
    digest.update(arr.tobytes())
    digest.update("|".join(map(str, parts)).encode())
    return digest.hexdigest()


class EmbeddingCache:
    """Maps (encoder fingerprint, content key) to an embedding tensor.

    Concurrent requests for the same key compute it once; entries of other encoder fingerprints are
    dropped with :meth:`retain_only` when adapters change.
    """

    def __init__(self, max_mb: float) -> None:
        self.max_bytes = int(max_mb * 1e6)
        self._items: OrderedDict[tuple[str, Hashable], Tensor] = OrderedDict()
        self._pending: dict[tuple[str, Hashable], threading.Lock] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, fingerprint: str, key: Hashable, compute: Callable[[], Tensor]) -> tuple[Tensor, bool]:
        """The cached embedding, or ``compute()`` stored under the key. Returns (embedding, was_cached)."""
        full = (fingerprint, key)
        with self._lock:
            if full in self._items:
                self._items.move_to_end(full)
                self.hits += 1
                return self._items[full], True
            key_lock = self._pending.setdefault(full, threading.Lock())
        with key_lock:
            with self._lock:
                if full in self._items:  # computed by a concurrent request meanwhile
                    self._items.move_to_end(full)
                    self.hits += 1
                    return self._items[full], True
            value = compute().detach()
            self._put(full, value)
        with self._lock:
            self._pending.pop(full, None)
            self.misses += 1
        return value, False

    def contains(self, fingerprint: str, key: Hashable) -> bool:
        """Whether the entry is cached (does not count as a use)."""
        with self._lock:
            return (fingerprint, key) in self._items

    def _put(self, full: tuple[str, Hashable], value: Tensor) -> None:
        size = value.element_size() * value.nelement()
        with self._lock:
            if size > self.max_bytes:
                return
            self._items[full] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.element_size() * old.nelement()

    def retain_only(self, fingerprint: str) -> int:
        """Drop every entry computed with another encoder; returns how many were dropped."""
        with self._lock:
            stale = [k for k in self._items if k[0] != fingerprint]
            for k in stale:
                old = self._items.pop(k)
                self._bytes -= old.element_size() * old.nelement()
        return len(stale)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


class StoredEmbeddingCache(EmbeddingCache):
    """An :class:`EmbeddingCache` that also keeps every embedding in a folder, one file per (encoder
    fingerprint, content key), so repeated evaluation runs encode each slice once. Not for serving:
    the folder is unbounded."""

    def __init__(self, max_mb: float, folder: str | Path) -> None:
        super().__init__(max_mb)
        self.folder = Path(folder)

    def get_or_compute(self, fingerprint: str, key: Hashable, compute: Callable[[], Tensor]) -> tuple[Tensor, bool]:
        path = self.folder / re.sub(r"[^A-Za-z0-9_.-]", "_", fingerprint) / f"{key}.pt"

        def load_or_compute() -> Tensor:
            if path.is_file():
                try:
                    return torch.load(path, map_location="cpu")
                except Exception:  # noqa: BLE001 - a damaged file is recomputed
                    pass
            value = compute().detach().cpu()
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as fh:
                torch.save(value, fh)
            return value

        return super().get_or_compute(fingerprint, key, load_or_compute)
