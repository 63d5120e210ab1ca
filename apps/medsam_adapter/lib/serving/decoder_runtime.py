"""Decoder runtimes: the mask decoder of a served model version run by torch or by an OpenVINO graph.

A click on a cached slice is one mask-decoder pass; on a 2-core CPU OpenVINO runs LiteMedSAM's decoder
(adapters included) about 2.5x faster than torch eager. The prompt encoder stays in torch (a fraction of
a millisecond); the graph takes its sparse and dense embeddings with dynamic batch and token counts.

``[inference] decoder_runtime``: ``auto`` (OpenVINO fp32 on a CPU where it is installed, else torch),
``torch``, ``openvino_fp32`` or ``openvino_bf16`` (bf16 inference precision where the CPU computes bf16
natively, avx512_bf16 or AMX, fp32 elsewhere; checked against torch with a looser tolerance). A model
version answers every prompt the graph covers through it, from its first prompt on (so its answers never
change with timing); what the graph does not cover (three masks, a batch of embeddings, gradients, CUDA)
and a graph that cannot be built or fails its check go to torch.
The IR is cached on disk and checked like the encoder's (:class:`~.runtimes.ExportedGraph`); the compiled
graph is checked against torch on probe prompts before it answers anything. The server builds the graphs
of the served and bare versions in the background at startup (``InteractiveSegmenter.warm_up``), and a
training round exports its decoder's IR before it publishes, so a click seldom waits for a build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.adapters import inert_adapters_skipped
from ..core.model import AdaptedSam, Decoded
from .runtimes import (
    GRAPH_VERSION,
    ExportedGraph,
    RuntimeUnavailable,
    _openvino_core,
    cpu_has_native_bf16,
    default_cache_dir,
    openvino_version,
    relative_error,
)

logger = logging.getLogger(__name__)

TOLERANCE = 1e-3  # largest relative L2 error of the probe prompts' logits against torch
BF16_TOLERANCE = 2e-2  # ... for the bf16 graph (the shipped served, bare and lone-click decoders: 0.0055-0.0073)


def decoder_key(model: AdaptedSam) -> str:
    """Hash of everything that decides the mask decoder's output: its tensors (adapters included) and
    the adapter settings."""
    digest = hashlib.blake2b(digest_size=16)
    header = {"backbone": model.backbone_name, "base_sha256": model.base_sha256,
              "adapters": model.adapter_settings.as_dict(), "part": "mask_decoder", "graph": GRAPH_VERSION}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for name, tensor in sorted(model.mask_decoder.state_dict().items()):
        digest.update(f"|{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _DecodeModule(nn.Module):
    """The mask decoder with one mask out, as a module's forward of plain tensors (for export)."""

    def __init__(self, model: AdaptedSam) -> None:
        super().__init__()
        self.mask_decoder = model.mask_decoder

    def forward(self, embedding: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
        return self.mask_decoder(
            image_embeddings=embedding, image_pe=image_pe, sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=False,
        )


def probe_prompts(model: AdaptedSam) -> list[tuple[Tensor, dict]]:
    """Fixed test prompts on a fixed embedding: two clicks with previous logits, and four boxes at once."""
    g = torch.Generator().manual_seed(0)
    channels = model.prompt_encoder.embed_dim
    h, w = model.prompt_encoder.image_embedding_size
    embedding = torch.randn(1, channels, h, w, generator=g)
    size = float(model.img_size)
    clicks = (torch.tensor([[[0.4 * size, 0.5 * size], [0.7 * size, 0.2 * size]]]), torch.tensor([[1, 0]]))
    previous = torch.randn(1, 1, *model.low_res_size, generator=g) * 4
    boxes = torch.tensor([[0.1, 0.1, 0.3, 0.4], [0.2, 0.2, 0.8, 0.7], [0.0, 0.0, 1.0, 1.0], [0.5, 0.4, 0.6, 0.5]])
    return [
        (embedding, {"points": clicks, "mask_logits": previous}),
        (embedding, {"boxes": boxes * (size - 1)}),
    ]


class ExportedDecoder(ExportedGraph):
    """The mask decoder (adapters included, one mask out) with dynamic prompt batch and token counts."""

    stem = "decoder"
    folder_tag = "-decoder"

    def __init__(self, model: AdaptedSam, cache_dir: Path, key: str | None = None) -> None:
        super().__init__(model, cache_dir, key or decoder_key(model))

    def _shapes(self) -> tuple[int, int, int]:
        h, w = self.model.prompt_encoder.image_embedding_size
        return self.model.prompt_encoder.embed_dim, h, w

    def input_spec(self) -> list:
        c, h, w = self._shapes()
        return [[1, c, h, w], [1, c, h, w], [-1, -1, c], [-1, c, h, w]]

    def convert(self, openvino):
        embedding, prompts = probe_prompts(self.model)[0]
        sparse, dense = self.model.encode_prompts(prompts["points"], None, prompts["mask_logits"])
        example = (embedding, self.model.prompt_encoder.get_dense_pe(), sparse, dense)
        shapes = [openvino.PartialShape(s) for s in self.input_spec()]
        with inert_adapters_skipped(self.model.mask_decoder):  # the bare model's: they add nothing
            return openvino.convert_model(_DecodeModule(self.model).eval(), example_input=example, input=shapes)


class OpenVinoDecoder:
    """A compiled decoder graph; each concurrent caller gets its own infer request (kept for reuse)."""

    def __init__(self, compiled) -> None:
        self.compiled = compiled
        self._idle: list = []
        self._lock = threading.Lock()

    def __call__(self, embedding: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
        with self._lock:
            request = self._idle.pop() if self._idle else self.compiled.create_infer_request()
        try:
            inputs = [t.detach().to("cpu", torch.float32).contiguous().numpy() for t in (embedding, image_pe, sparse,
                                                                                           dense)]
            result = request.infer(dict(enumerate(inputs)), share_inputs=True)  # no copies of the inputs
            return torch.from_numpy(result[0].copy()), torch.from_numpy(result[1].copy())
        finally:
            with self._lock:
                self._idle.append(request)


def compile_decoder(ov_model, precision: str = "f32") -> OpenVinoDecoder:
    """The decoder IR compiled for the CPU at ``precision`` (``f32`` or ``bf16``), tuned for latency."""
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": max(1, torch.get_num_threads())}
    return OpenVinoDecoder(_openvino_core().compile_model(ov_model, "CPU", config))


def export_ahead(model: AdaptedSam, runtime: str = "auto", cache_dir: Path | None = None) -> None:
    """Export ``model``'s decoder IR into the cache now (a training round, before it publishes), so the
    server only compiles it when it loads the new version. Failures are logged: torch will answer."""
    if not RuntimeDecoder(model, runtime, cache_dir).wanted:
        return
    try:
        with torch.no_grad():
            ExportedDecoder(model, cache_dir or default_cache_dir()).read()
    except Exception as e:  # noqa: BLE001 - an optimisation only
        logger.warning("decoder IR not exported ahead: %s: %s", type(e).__name__, e)


class RuntimeDecoder:
    """``AdaptedSam.decode`` for a served model version, through its OpenVINO graph (built and checked at
    first use, or ahead by :meth:`prepare`), through torch for what the graph does not cover or when it
    cannot be built. The model's decoder must not change afterwards (served model versions are immutable)."""

    def __init__(self, model: AdaptedSam, runtime: str = "auto", cache_dir: Path | None = None) -> None:
        self.model = model
        self.runtime = runtime
        self.cache_dir = cache_dir
        self._graph: OpenVinoDecoder | None = None
        self._done = False  # built, failed or not wanted: decided once
        self._lock = threading.Lock()
        self.failure: str | None = None
        self.build_s: float | None = None
        self._image_pe: Tensor | None = None  # the prompt encoder's dense positional encoding (constant)
        # the graph's inference precision: bf16 for openvino_bf16 on a CPU with native bf16, else f32
        self.precision = "bf16" if runtime == "openvino_bf16" and cpu_has_native_bf16() else "f32"

    @property
    def wanted(self) -> bool:
        """Whether this model version should get a graph at all."""
        if self.runtime == "torch" or self.model.device.type != "cpu":
            return False
        return self.runtime.startswith("openvino_") or openvino_version() is not None

    @property
    def name(self) -> str:
        """The runtime answering now: ``openvino_fp32`` or ``openvino_bf16`` once the graph is ready, else
        ``torch``."""
        if self._graph is None:
            return "torch"
        return "openvino_bf16" if self.precision == "bf16" else "openvino_fp32"

    def graph(self) -> OpenVinoDecoder | None:
        """The checked graph, built now if need be (callers arriving meanwhile wait for it); None: torch."""
        if not self._done:
            with self._lock:
                if not self._done:
                    self._build()
                    self._done = True
        return self._graph

    def prepare(self) -> str:
        """Build (or load) and check the graph now; returns the runtime in use."""
        self.graph()
        return self.name

    def _build(self) -> None:
        if not self.wanted:
            return
        start = time.perf_counter()
        try:
            exported = ExportedDecoder(self.model, self.cache_dir or default_cache_dir())
            with torch.no_grad():
                graph = compile_decoder(exported.read(), self.precision)
                error = max(relative_error(self._run(graph, emb, **p).low_res_logits,
                                           self.model.decode(emb, **p).low_res_logits)
                            for emb, p in probe_prompts(self.model))
            if not error <= (BF16_TOLERANCE if self.precision == "bf16" else TOLERANCE):
                raise RuntimeUnavailable(f"probe logits differ from torch by {error:.2g} (relative L2)")
        except Exception as e:  # export, compile or check failed: torch keeps answering
            self.failure = f"{type(e).__name__}: {e}"
            logger.warning("%s decoder stays on torch: %s", self.model.backbone_name, self.failure)
            return
        self.build_s = time.perf_counter() - start
        self._graph = graph
        logger.info("%s decoder runs on OpenVINO %s (probe error %.2g, ready in %.1f s)",
                    self.model.backbone_name, self.precision, error, self.build_s)

    def _run(self, graph: OpenVinoDecoder, embedding: Tensor, points=None, boxes=None, mask_logits=None) -> Decoded:
        sparse, dense = self.model.encode_prompts(points, boxes, mask_logits)
        if self._image_pe is None:
            self._image_pe = self.model.prompt_encoder.get_dense_pe().detach().to("cpu", torch.float32).contiguous()
        low_res, iou = graph(embedding, self._image_pe, sparse, dense)
        return Decoded(low_res.to(embedding.device), iou.to(embedding.device))

    def __call__(
        self,
        embedding: Tensor,
        points: tuple[Tensor, Tensor] | None = None,
        boxes: Tensor | None = None,
        mask_logits: Tensor | None = None,
        multimask: bool = False,
    ) -> Decoded:
        covered = not multimask and embedding.shape[0] == 1 and not torch.is_grad_enabled()
        graph = self.graph() if covered else None
        if graph is None:
            return self.model.decode(embedding, points=points, boxes=boxes, mask_logits=mask_logits,
                                     multimask=multimask)
        with torch.no_grad():
            return self._run(graph, embedding, points, boxes, mask_logits)

