"""Encoder runtimes: the image encoder run by torch (fp32 or autocast) or by an OpenVINO graph exported here.

A profile chooses one with ``[inference] encoder_runtime`` (``--conf encoder_runtime NAME`` overrides):

- ``torch``: the model's own ``encode`` in fp32 eager mode (what training uses; the reference);
- ``torch_bf16`` / ``torch_fp16``: the same under ``torch.autocast`` (fp16: meant for CUDA);
- ``openvino_fp32`` / ``openvino_bf16``: the encoder (adapters and pixel normalisation included) converted
  locally with ``openvino.convert_model``, saved as OpenVINO IR under a cache folder and compiled for the
  CPU with that inference precision (adapters that add exactly zero, untrained ones, are left out);
- ``openvino_mixed``: the TinyViT encoder as two graphs, the patch embedding and the first three stages fp32,
  the last stage and the neck bf16 (:mod:`.encoder_split`; ~0.87x of openvino_fp32's time on a CPU with
  native bf16; masks and the evaluation suite's held-out Dice unchanged within the bars);
- ``auto``: on CUDA ``torch_fp16``; on a CPU with OpenVINO ``openvino_fp32``, or, where the CPU computes
  bf16 natively (avx512_bf16 or AMX), the faster of ``openvino_mixed`` and ``openvino_fp32`` measured on
  this machine (:mod:`.auto_runtime`; bf16 was slower than fp32 on a Zen 4-class CPU with those flags);
  ``torch`` otherwise. Whole-graph bf16 stays opt-in: measured on the shipped scans it changes masks by
  more than the bar (mean Dice against fp32 masks 0.983 torch_bf16, 0.987 openvino_bf16).

Nothing is downloaded. The IR (under :func:`default_cache_dir`) is keyed by a hash of every encoder
tensor (backbone weights and encoder adapters), the adapter settings and the OpenVINO version, written
atomically (a folder renamed into place, files listed with their sha256 in ``manifest.json``), checked
on load and rebuilt when missing, damaged or of another key. Every runtime is checked against torch fp32
on a fixed probe image the first time a process uses it for an encoder; a runtime that cannot be built or
fails the check is logged and the next in line is used (torch fp32 last), so a request never fails
because of the runtime.

Build ahead of time (from ``apps/medsam_adapter``): ``python -m lib.serving.runtimes build``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..core.adapters import inert_adapters_skipped
from ..core.config import ENCODER_RUNTIMES
from ..core.model import AdaptedSam
from . import auto_runtime
from .cuda_graphs import GraphedEncoder
from .encode_batching import EncodeBatcher

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[2]
CACHE_ENV = "MEDSAM_ADAPTER_RUNTIME_CACHE"
GRAPH_VERSION = 2  # changes the cache keys when what an export holds changes (2: inert adapters left out)
KEEP_CACHED = 8  # exported encoders kept on disk (least recently used removed beyond that)
Encode = Callable[[Tensor], Tensor]


class RuntimeUnavailable(RuntimeError):
    """A runtime cannot run here (not installed, wrong device) or failed to build or verify."""


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    engine: str  # torch | openvino
    precision: str  # fp32 | bf16 | fp16 | mixed (early stages fp32, the rest bf16)
    tolerance: float  # largest relative L2 error of the probe embedding against torch fp32


SPECS = {
    "torch": RuntimeSpec("torch", "torch", "fp32", 0.0),
    "torch_bf16": RuntimeSpec("torch_bf16", "torch", "bf16", 0.1),
    "torch_fp16": RuntimeSpec("torch_fp16", "torch", "fp16", 0.01),
    "openvino_fp32": RuntimeSpec("openvino_fp32", "openvino", "fp32", 1e-3),
    "openvino_bf16": RuntimeSpec("openvino_bf16", "openvino", "bf16", 0.1),
    "openvino_mixed": RuntimeSpec("openvino_mixed", "openvino", "mixed", 0.03),
    "cuda_graph": RuntimeSpec("cuda_graph", "cuda_graph", "fp32", 1e-3),
    "cuda_graph_fp16": RuntimeSpec("cuda_graph_fp16", "cuda_graph", "fp16", 0.01),
}
assert set(SPECS) | {"auto"} == set(ENCODER_RUNTIMES)


def default_cache_dir() -> Path:
    """``$MEDSAM_ADAPTER_RUNTIME_CACHE``, else ``medsam_adapter/encoder_runtimes`` in the user's cache folder
    (``$XDG_CACHE_HOME`` or ``~/.cache``): shared by every checkout and copy of the app on this machine, which
    is safe because entries are keyed by the encoder's tensors and the OpenVINO version."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "medsam_adapter" / "encoder_runtimes"


def _openvino():
    """The ``openvino`` module, imported with its usage statistics declined.

    OpenVINO's converter sends usage statistics unless the user opted out. Before the first import, the
    decline is recorded in openvino_telemetry's consent file (what its ``opt_in_out --opt_out`` writes),
    unless the user already chose: nothing about this server leaves the machine.
    """
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

        checker = OptInChecker()
        if checker.consent_file_base_dir() and not os.path.exists(checker.consent_file()):
            checker.update_result(ConsentCheckResult.DECLINED)
    except ImportError:
        pass
    import openvino

    return openvino


def openvino_version() -> str | None:
    """The installed OpenVINO's version, None when it is not installed."""
    try:
        return _openvino().get_version()
    except ImportError:
        return None


def cpu_flags() -> set[str]:
    """The (Linux) CPU's feature flags; empty where /proc/cpuinfo cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def cpu_has_amx() -> bool:
    """Whether this (Linux) CPU exposes AMX with bf16 tiles (where bf16 runs several times faster)."""
    return "amx_bf16" in cpu_flags()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX), where bf16 stages may be faster."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def candidates(name: str, device: torch.device | str = "cpu") -> list[str]:
    """The runtimes to try for a configured name, in order; torch fp32 always comes last."""
    if name not in ENCODER_RUNTIMES:
        raise ValueError(f"unknown encoder runtime {name!r}; known: {list(ENCODER_RUNTIMES)}")
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":  # the fastest of these, measured (lib/serving/auto_runtime.py)
            order = ["cuda_graph_fp16", "cuda_graph", "torch_fp16"]
        elif openvino_version() is not None:
            # both keep the masks; with more than one, RuntimeEncoder serves the faster (lib/serving/auto_runtime.py)
            order = ["openvino_mixed", "openvino_fp32"] if cpu_has_native_bf16() else ["openvino_fp32"]
        else:
            order = []
    else:
        order = [name]
    return [*dict.fromkeys([*order, "torch"])]


def encoder_key(model: AdaptedSam) -> str:
    """Hash of everything that decides the encoder's output: every image-encoder tensor (backbone weights
    and adapters), the pixel normalisation, the adapter settings and the input size."""
    digest = hashlib.blake2b(digest_size=16)
    header = {
        "backbone": model.backbone_name,
        "base_sha256": model.base_sha256,
        "img_size": model.img_size,
        "adapters": model.adapter_settings.as_dict(),
        "normalize": bool(model.normalize_pixels),
        "graph": GRAPH_VERSION,
        "mean": model.pixel_mean.flatten().tolist(),
        "std": model.pixel_std.flatten().tolist(),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for name, tensor in sorted(model.image_encoder.state_dict().items()):
        digest.update(f"|{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def probe_image(size: int) -> Tensor:
    """A fixed grey test image (1, 3, size, size) in [0, 1]: smooth gradients, discs and fine texture."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = 0.3 + 0.2 * torch.sin(6.0 * xx) * torch.cos(4.0 * yy)
    for cy, cx, r, v in ((0.35, 0.4, 0.18, 0.5), (0.65, 0.6, 0.12, -0.25), (0.5, 0.75, 0.07, 0.4)):
        image = image + v * (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2).float()
    image = image + 0.03 * torch.rand(size, size, generator=g)
    return image.clamp(0, 1).expand(1, 3, size, size).contiguous()


def probe_input(model: AdaptedSam) -> Tensor:
    """What ``model.encode`` is checked on: :func:`probe_image`, or for the ``depth`` design a stack of it
    with shifted copies as neighbours (1, D, 3, S, S), so the depth mixing is in the check."""
    image = probe_image(model.img_size)
    depth = model.depth_slices
    if depth == 1:
        return image
    shifts = range(-(depth // 2), depth // 2 + 1)
    return torch.stack([torch.roll(image, 8 * s, dims=-1) for s in shifts], dim=1)


def relative_error(value: Tensor, reference: Tensor) -> float:
    """||value - reference|| / ||reference|| (L2 over all elements)."""
    return float((value.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12))


# -- torch --------------------------------------------------------------------------------------------
def torch_encoder(model: AdaptedSam, precision: str, autocast_cache: bool = True) -> Encode:
    """The model's own encode; bf16/fp16 under ``torch.autocast``, the embedding returned as fp32
    (``autocast_cache=False`` for CUDA graph capture, which must not keep cast weights from the capture)."""
    if precision == "fp32":
        return model.encode
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def encode(image01: Tensor) -> Tensor:
        with torch.autocast(image01.device.type, dtype=dtype, cache_enabled=autocast_cache):
            return model.encode(image01).float()

    return encode


# -- OpenVINO -----------------------------------------------------------------------------------------
class _EncodeModule(nn.Module):
    """``model.encode`` as a module's forward (pixel normalisation + image encoder), for export."""

    def __init__(self, model: AdaptedSam) -> None:
        super().__init__()
        self.model = model

    def forward(self, image01: Tensor) -> Tensor:
        return self.model.encode(image01)


_core = None
_core_lock = threading.Lock()


def _openvino_core():
    global _core
    openvino = _openvino()
    with _core_lock:
        if _core is None:
            _core = openvino.Core()
        return _core


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ExportedGraph:
    """A part of a model exported as OpenVINO IR in ``cache_dir/<backbone>[-<part>]-<key>-ov<version>/``,
    written atomically, checked on load, rebuilt when missing, damaged or of another key. Subclasses say
    what is exported (:meth:`convert`) and what else is saved beside it (:meth:`save_extras`)."""

    stem = "graph"  # <stem>.xml / <stem>.bin
    folder_tag = ""  # in the folder name after the backbone's
    extra_files: tuple[str, ...] = ()

    def __init__(self, model: AdaptedSam, cache_dir: Path, key: str) -> None:
        self.model = model
        self.key = key
        self.version = openvino_version()
        if self.version is None:
            raise RuntimeUnavailable("openvino is not installed (pip install -r requirements.txt)")
        self.cache_dir = Path(cache_dir)
        short = self.version.split("-")[0]
        self.folder = self.cache_dir / f"{model.backbone_name}{self.folder_tag}-{self.key[:24]}-ov{short}"
        self.export_s: float | None = None  # set when this process exported it

    @property
    def files(self) -> tuple[str, ...]:
        return (f"{self.stem}.xml", f"{self.stem}.bin", *self.extra_files)

    def input_spec(self) -> list:
        """The graph's input shapes as recorded in the manifest (-1: dynamic)."""
        raise NotImplementedError

    def convert(self, openvino):
        """The part as an ``openvino.Model`` (``openvino.convert_model`` on a torch module)."""
        raise NotImplementedError

    def save_extras(self, folder: Path) -> None:
        """Write :attr:`extra_files` into ``folder``."""

    def manifest(self) -> dict:
        return {
            "key": self.key,
            "backbone": self.model.backbone_name,
            "base_sha256": self.model.base_sha256,
            "openvino": self.version,
            "torch": torch.__version__,
            "input": self.input_spec(),
        }

    def problem(self) -> str | None:
        """Why the cached IR cannot be used (None: present and intact)."""
        path = self.folder / "manifest.json"
        if not path.is_file():
            return "not built yet"
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return f"unreadable manifest ({e})"
        expected = self.manifest()
        if any(manifest.get(k) != expected[k] for k in ("key", "openvino", "input")):
            return "built for another encoder or OpenVINO version"
        for name in self.files:
            file = self.folder / name
            if not file.is_file() or _sha256(file) != manifest.get("files", {}).get(name):
                return f"{name} is missing or damaged"
        return None

    def read(self):
        """The IR as an ``openvino.Model``: the cached one when intact, else exported now (and cached)."""
        problem = self.problem()
        if problem is not None:
            if problem != "not built yet":
                logger.warning("encoder runtime cache %s: %s; rebuilding it", self.folder, problem)
            self.export()
        else:
            os.utime(self.folder)  # most recently used: kept when old entries are pruned
        return _openvino_core().read_model(str(self.folder / f"{self.stem}.xml"))

    def export(self) -> None:
        """Convert the part with ``openvino.convert_model`` and save its IR atomically."""
        openvino = _openvino()
        start = time.perf_counter()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f".{self.folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            tmp.mkdir()
            if self.model.device.type != "cpu":
                raise RuntimeUnavailable("OpenVINO export needs the model on the CPU")
            with torch.no_grad(), warnings.catch_warnings():
                # shape checks become constants in the trace
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                ov_model = self.convert(openvino)
            openvino.save_model(ov_model, str(tmp / f"{self.stem}.xml"), compress_to_fp16=False)
            self.save_extras(tmp)
            manifest = {**self.manifest(), "files": {n: _sha256(tmp / n) for n in self.files}}
            manifest["export_s"] = round(time.perf_counter() - start, 2)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            _fsync_tree(tmp)
            if self.folder.exists():  # damaged, or written meanwhile by another process
                if self.problem() is None:
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
                shutil.rmtree(self.folder, ignore_errors=True)
            os.replace(tmp, self.folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.export_s = time.perf_counter() - start
        logger.info(
            "exported the %s %s to OpenVINO IR %s in %.1f s", self.model.backbone_name, self.stem, self.folder,
            self.export_s,
        )
        prune_cache(self.cache_dir, keep=KEEP_CACHED)


class ExportedEncoder(ExportedGraph):
    """The image encoder (pixel normalisation and adapters included), with torch fp32's embedding of the
    probe image saved beside it (the reference the runtime is checked against)."""

    stem = "encoder"
    extra_files = ("probe_reference.npy",)

    def __init__(self, model: AdaptedSam, cache_dir: Path, key: str | None = None) -> None:
        super().__init__(model, cache_dir, key or encoder_key(model))

    def input_spec(self) -> list:
        """One slice (1, 3, S, S); for the ``depth`` design one slice stack (1, D, 3, S, S)."""
        depth, size = self.model.depth_slices, self.model.img_size
        return [1, *([depth] if depth > 1 else []), 3, size, size]

    def convert(self, openvino):
        # TinyViT's shape checks become constants in the trace: the graph has a fixed input size
        # untrained (zero) adapters add nothing: the graph leaves them out (the shipped click adapters
        # train only the decoder side, so the served encoder's adapters cost ~8 % of its time for nothing)
        example = probe_input(self.model).to(self.model.device)
        module = _EncodeModule(self.model).eval()
        with inert_adapters_skipped(self.model.image_encoder):
            return openvino.convert_model(module, example_input=example, input=[tuple(example.shape)])

    def save_extras(self, folder: Path) -> None:
        with torch.inference_mode():
            probe = probe_input(self.model).to(self.model.device)
            np.save(folder / "probe_reference.npy", self.model.encode(probe).cpu().numpy())

    def probe_reference(self) -> Tensor:
        """torch fp32's embedding of :func:`probe_input`, saved at export (checked with the IR)."""
        return torch.from_numpy(np.load(self.folder / "probe_reference.npy"))


def prune_cache(cache_dir: Path, keep: int = KEEP_CACHED) -> list[Path]:
    """Remove all but the ``keep`` most recently used exported encoders (and stale temporary folders)."""
    removed = []
    entries = sorted(
        (p for p in Path(cache_dir).iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    day_ago = time.time() - 86400
    for tmp in Path(cache_dir).glob(".*.tmp"):
        if tmp.stat().st_mtime < day_ago:
            shutil.rmtree(tmp, ignore_errors=True)
    return removed


class OpenVinoEncoder:
    """Runs compiled OpenVINO graphs on (B, 3, S, S) batches (``depth``: (B, D, 3, S, S)), one item at a
    time, each graph's output the next one's input (one graph, or ``openvino_mixed``'s two), thread-safe."""

    def __init__(self, *compiled) -> None:
        self._requests = [c.create_infer_request() for c in compiled]
        self._lock = threading.Lock()  # one infer request each: OpenVINO runs one at a time anyway (latency hint)

    def __call__(self, image01: Tensor) -> Tensor:
        items = image01.detach().to("cpu", torch.float32).contiguous().numpy()
        out = []
        with self._lock:
            for item in items:
                value = item[None]
                for request in self._requests:
                    value = request.infer({0: value})[0]
                out.append(torch.from_numpy(value.copy()))
        return torch.cat(out).to(image01.device)


def compile_graph(ov_model, precision: str):
    """The IR compiled for the CPU at ``precision`` with torch's thread count, tuned for latency."""
    config = {
        "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[precision],
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": max(1, torch.get_num_threads()),
    }
    return _openvino_core().compile_model(ov_model, "CPU", config)


def compile_openvino(ov_model, precision: str) -> OpenVinoEncoder:
    """An encoder running the IR compiled by :func:`compile_graph`."""
    return OpenVinoEncoder(compile_graph(ov_model, precision))


# -- choosing and verifying ---------------------------------------------------------------------------
@dataclass
class BuiltRuntime:
    name: str
    encode: Encode
    probe_error: float  # relative L2 error of the probe embedding against torch fp32
    build_s: float  # seconds to export (or load) and compile and check in this process
    exported: bool  # the IR was exported now (not read from the cache)


# compiled runtimes of this process by (encoder key, runtime name): several model versions with the
# same encoder (base and shipped adapters, decoder-only rounds) share one compiled graph
_BUILT: OrderedDict[tuple[str, str], BuiltRuntime] = OrderedDict()
_REFERENCES: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
_BUILT_MAX = 4
_build_lock = threading.RLock()


def build_runtime(model: AdaptedSam, name: str, cache_dir: Path | None = None, key: str | None = None) -> BuiltRuntime:
    """Build runtime ``name`` for ``model``'s encoder and check it against torch fp32 on the probe image.
    Raises :class:`RuntimeUnavailable` when it cannot run here or misses its tolerance."""
    spec = SPECS[name]
    key = key or encoder_key(model)
    memo = (key, name, str(model.device))
    with _build_lock:
        if memo in _BUILT:
            _BUILT.move_to_end(memo)
            return _BUILT[memo]
        start = time.perf_counter()
        exported = False
        if spec.engine == "torch":
            if spec.precision == "fp32":
                built = BuiltRuntime(name, model.encode, 0.0, 0.0, False)
                return built
            encode = torch_encoder(model, spec.precision)
        elif spec.engine == "cuda_graph":
            if model.device.type != "cuda":
                raise RuntimeUnavailable(f"{name} needs CUDA; the model is on {model.device}")
            probe = probe_input(model).to(model.device)
            try:
                encode = GraphedEncoder(
                    torch_encoder(model, spec.precision, autocast_cache=False), tuple(probe.shape[1:]), model.device
                )
                with torch.inference_mode():
                    encode.capture([1], strict=True)  # the single-slice graph, now
            except Exception as e:  # noqa: BLE001 - capture failed: say why, let the caller fall back
                raise RuntimeUnavailable(f"{name}: CUDA graph capture failed: {type(e).__name__}: {e}") from e
        else:
            if model.device.type != "cpu":
                raise RuntimeUnavailable(f"{name} runs on the CPU; the model is on {model.device}")
            try:
                if spec.precision == "mixed":  # two graphs, fp32 then bf16 (lib/serving/encoder_split.py)
                    from .encoder_split import build_mixed

                    encode, exported = build_mixed(model, cache_dir or default_cache_dir(), key)
                else:
                    exported_encoder = ExportedEncoder(model, cache_dir or default_cache_dir(), key)
                    encode = compile_openvino(exported_encoder.read(), spec.precision)
                    exported = exported_encoder.export_s is not None
                    _REFERENCES.setdefault(memo[::2], exported_encoder.probe_reference())
            except RuntimeUnavailable:
                raise
            except Exception as e:  # conversion or compilation failed: say why, let the caller fall back
                raise RuntimeUnavailable(f"{name}: export/compile failed: {type(e).__name__}: {e}") from e
        probe = probe_input(model).to(model.device)
        reference = _REFERENCES.get(memo[::2])
        if reference is None:
            with torch.inference_mode():
                reference = model.encode(probe)
            _REFERENCES[memo[::2]] = reference
            while len(_REFERENCES) > _BUILT_MAX:
                _REFERENCES.popitem(last=False)
        with torch.inference_mode():
            value = encode(probe)
        error = relative_error(value, reference) if value.shape == reference.shape else float("inf")
        if not error <= spec.tolerance:  # also catches NaN
            raise RuntimeUnavailable(
                f"{name}: probe embedding differs from torch fp32 by {error:.4f} (relative L2), "
                f"tolerance {spec.tolerance}"
            )
        built = BuiltRuntime(name, encode, error, time.perf_counter() - start, exported)
        _BUILT[memo] = built
        while len(_BUILT) > _BUILT_MAX:
            _BUILT.popitem(last=False)
        return built


def forget_runtime(model: AdaptedSam, name: str, key: str) -> None:
    """Drop a built runtime from this process's memo (auto's slower candidate: its graph is freed)."""
    with _build_lock:
        _BUILT.pop((key, name, str(model.device)), None)


class RuntimeEncoder:
    """The ``encode`` a served model version uses: the first of the configured runtime's candidates that
    builds and verifies, prepared on first use (thread-safe; cheap to construct), torch fp32 as the last
    resort. The model's encoder must not change afterwards (served model versions are immutable).
    ``max_batch`` above 1 runs concurrent callers' inputs as one batch (:mod:`.encode_batching`)."""

    def __init__(
        self, model: AdaptedSam, runtime: str = "auto", cache_dir: Path | None = None, max_batch: int = 1
    ) -> None:
        self.model = model
        self.runtime = runtime
        self.cache_dir = cache_dir
        self._built: BuiltRuntime | None = None
        self._lock = threading.Lock()
        self.failures: dict[str, str] = {}
        self.batcher = EncodeBatcher(lambda x: self.prepare().encode(x), max_batch)

    @property
    def name(self) -> str | None:
        """The runtime in use (None until the first encode or :meth:`prepare`)."""
        return self._built.name if self._built else None

    def prepare(self) -> BuiltRuntime:
        """Build (or load) the runtime now; returns what is used."""
        built = self._built
        if built is not None:
            return built
        with self._lock:
            if self._built is not None:
                return self._built
            key = encoder_key(self.model)
            names = candidates(self.runtime, self.model.device)
            if self.runtime == "auto" and len(names) > 2:  # several runtimes that keep masks: the fastest
                self._built = self._fastest(names[:-1], key)
            for name in names if self._built is None else ():
                self._built = self._try(name, key)
                if self._built is not None:
                    break
            assert self._built is not None  # torch fp32 always builds
            if isinstance(self._built.encode, GraphedEncoder) and self.batcher.max_batch > 1:
                self._built.encode.capture(range(2, self.batcher.max_batch + 1))  # every batch the batcher runs
            if self.runtime not in ("auto", self._built.name):
                logger.error("encoder runtime %s was asked for; using %s instead", self.runtime, self._built.name)
            logger.info(
                "%s encoder runs on %s (probe error %.2g, ready in %.1f s%s)",
                self.model.backbone_name,
                self._built.name,
                self._built.probe_error,
                self._built.build_s,
                ", exported now" if self._built.exported else "",
            )
            return self._built

    def __call__(self, image01: Tensor) -> Tensor:
        return self.batcher(image01)

    def _try(self, name: str, key: str) -> BuiltRuntime | None:
        try:
            return build_runtime(self.model, name, self.cache_dir, key)
        except RuntimeUnavailable as e:
            self.failures[name] = str(e)
            logger.warning("encoder runtime %s unavailable (%s); trying the next one", name, e)
            return None

    def _fastest(self, names: list[str], key: str) -> BuiltRuntime | None:
        """The fastest of ``names`` that build, measured on the probe image, or the one remembered as
        fastest for this encoder on this machine (lib/serving/auto_runtime.py). None: none builds."""
        cache_dir = self.cache_dir or default_cache_dir()
        tag = auto_runtime.machine_tag(openvino_version(), self.model.device)
        known = auto_runtime.remembered(cache_dir, key, tag)
        if known in names and (built := self._try(known, key)) is not None:
            return built
        built = [b for b in (self._try(name, key) for name in names) if b is not None]
        if len(built) < 2:
            return built[0] if built else None
        winner, timings, share = auto_runtime.fastest(built, probe_input(self.model).to(self.model.device))
        for other in built:
            if other is not winner:
                forget_runtime(self.model, other.name, key)
        logger.info(
            "auto: encoder runtimes measured %s ms (%.0f%% of the CPU); serving %s", timings, 100 * share, winner.name
        )
        if share >= auto_runtime.MIN_CPU_SHARE:
            auto_runtime.remember(cache_dir, key, tag, winner.name, timings)
        else:
            logger.warning("auto: other work held the CPU while timing; not remembered, timed again next start")
        return winner


# -- command line -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``python -m lib.serving.runtimes build``: export and check each profile's encoder ahead of time."""
    from ..core.config import load_profiles
    from ..core.engine import InteractiveSegmenter
    from .decoder_runtime import RuntimeDecoder

    parser = argparse.ArgumentParser(prog="python -m lib.serving.runtimes", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the encoder and decoder runtimes of the served model versions now")
    build.add_argument("--models", default="lite_medsam", help="comma-separated profile names (configs/)")
    build.add_argument("--runtime", default=None, help="override the profiles' encoder_runtime")
    build.add_argument(
        "--cache-dir", type=Path, default=None, help=f"default: ${CACHE_ENV} or ~/.cache/medsam_adapter/..."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    profiles = load_profiles(APP_DIR / "configs")
    status = 0
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        profile = profiles[name]
        runtime = args.runtime or profile.inference.encoder_runtime
        segmenter = InteractiveSegmenter(profile, adapter_dir=APP_DIR / "model" / name / "adapters", device="cpu")
        for loaded in {id(m): m for m in (segmenter.current(), segmenter.bare_model())}.values():
            encoder = RuntimeEncoder(loaded.model, runtime, args.cache_dir)
            built = encoder.prepare()
            print(
                f"{name} {loaded.name}: {built.name} (asked {runtime}), probe error {built.probe_error:.2g}, "
                f"{built.build_s:.1f} s{' (exported)' if built.exported else ' (from cache)'}"
            )
            if runtime != "auto" and built.name != runtime:
                status = 1
            decoder = RuntimeDecoder(loaded.model, profile.inference.decoder_runtime, args.cache_dir)
            used = decoder.prepare()
            print(f"{name} {loaded.name} decoder: {used}" + (f" ({decoder.failure})" if decoder.failure else ""))
            if decoder.wanted and used != "openvino_fp32":
                status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
