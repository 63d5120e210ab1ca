"""``auto``'s choice among encoder runtimes that all keep the masks: the fastest, measured on this machine.

Whether bf16 stages pay depends on the CPU, not on its flags alone: ``openvino_mixed`` took 208 ms against
``openvino_fp32``'s 240 on a Zen 5 EPYC (avx512_bf16), while on a Zen 4-class EPYC with the same flags
OpenVINO's bf16 was slower than its fp32 (609 against 425 ms, whole graph). So ``auto`` times its
candidates on the probe image (one warm-up each, then the median of :data:`REPEATS` interleaved encodes)
and serves the fastest. The choice is remembered in the runtime cache folder (``auto_choice.json``) per encoder key, CPU
model, thread count and OpenVINO version, so later processes build only the winner. A choice timed while other
work held the CPU (the encodes got less than :data:`MIN_CPU_SHARE` of the threads they run on) is served but
not remembered: under load the ranking can flip (mixed 701 ms against fp32 364 ms beside a test run on
the Zen 5 machine, where alone it is the faster), so the next process times again.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..core.atomic import atomic_write

logger = logging.getLogger(__name__)

REPEATS = 5
CHOICES_FILE = "auto_choice.json"
MIN_CPU_SHARE = 0.75


def cpu_model() -> str:
    """The CPU's model name, family and model numbers (``/proc/cpuinfo``: the name alone can be as vague as
    "AMD EPYC" across generations), else what ``platform`` knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def machine_tag(engine_version: str | None, device: torch.device | str = "cpu") -> str:
    """What a measured choice holds for: CPU model, torch threads (the runtimes' thread count), engine version;
    on CUDA the GPU's name and torch's version instead of the thread count and OpenVINO."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{cpu_model()}|cuda={torch.cuda.get_device_name(device)}|torch={torch.__version__}"
    return f"{cpu_model()}|threads={torch.get_num_threads()}|openvino={engine_version}"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remembered(cache_dir: Path, key: str, tag: str) -> str | None:
    """The runtime measured fastest earlier for this encoder key on this machine, if any."""
    entry = _read(Path(cache_dir) / CHOICES_FILE).get(f"{key}|{tag}")
    return entry.get("runtime") if isinstance(entry, dict) else None


def remember(cache_dir: Path, key: str, tag: str, runtime: str, timings_ms: dict[str, float]) -> None:
    """Record a measured choice (atomically; a failure to write is logged, the choice still serves)."""
    path = Path(cache_dir) / CHOICES_FILE
    choices = _read(path)
    choices[f"{key}|{tag}"] = {"runtime": runtime, "ms": {k: round(v, 1) for k, v in timings_ms.items()}}
    try:
        with atomic_write(path, "w") as fh:
            json.dump(choices, fh, indent=1, sort_keys=True)
    except OSError as e:
        logger.warning("could not record the encoder runtime choice in %s: %s", path, e)


def fastest(runtimes: Sequence, probe: Tensor, repeats: int = REPEATS) -> tuple[object, dict[str, float], float]:
    """The fastest of built runtimes (objects with ``name`` and ``encode``) on ``probe``, every median in ms,
    and the share of the CPU the timed encodes got (:func:`cpu_share`): one warm-up each, then ``repeats``
    rounds that run each once in turn (interleaved, so a change in the machine's load while measuring hits
    every runtime alike)."""
    times: dict[str, list[float]] = {r.name: [] for r in runtimes}
    cuda = probe.device.type == "cuda"
    with torch.inference_mode():
        for r in runtimes:
            r.encode(probe)
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        for _ in range(repeats):
            for r in runtimes:
                start = time.perf_counter()
                r.encode(probe)
                if cuda:  # kernels run asynchronously: time them to the end
                    torch.cuda.synchronize(probe.device)
                times[r.name].append((time.perf_counter() - start) * 1e3)
        # on a GPU the host mostly waits: its CPU share says nothing about other work
        share = 1.0 if cuda else cpu_share(time.process_time() - cpu_start, time.perf_counter() - wall_start)
    timings = {name: statistics.median(values) for name, values in times.items()}
    return min(runtimes, key=lambda r: timings[r.name]), timings, share


def cpu_share(cpu_s: float, wall_s: float, threads: int | None = None) -> float:
    """The share of ``threads`` cores (default torch's thread count, which the runtimes use) that this
    process used over ``wall_s`` seconds, from its CPU time: near 1 alone on the machine, lower when other
    work took cores from it."""
    threads = threads or torch.get_num_threads()
    return cpu_s / max(wall_s * threads, 1e-9)
