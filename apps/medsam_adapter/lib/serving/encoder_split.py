"""The ``openvino_mixed`` encoder runtime: the encoder's early stages in fp32, the rest in bf16.

Measured on the shipped scans (mean / min mask Dice against fp32 masks, 21 prompts): the whole TinyViT
encoder in bf16 changes masks beyond the bar (0.987 / 0.870), and most of that error comes from the early,
high-resolution stages. Round 10 kept the patch embedding and the first two stages in fp32 (0.9957 /
0.966, ~0.77x of fp32's time), which moved the evaluation suite's held-out 3-click Dice by 0.0056; round 11
keeps the first three in fp32 and runs the last stage and the neck in bf16: 0.9992 / 0.9967 at ~0.87x of
fp32's time on a CPU with native bf16 (avx512_bf16), held-out box and click Dice within 0.0005 of fp32's
(README, "Encoder runtimes"). OpenVINO's CPU plugin sets one inference precision per compiled graph, so
the encoder is exported as two graphs (``head`` and ``tail``, each cached and checked like the whole
encoder's graph, the split point in their folder names) and run one after the other.

Only TinyViT encoders (``lite_medsam``) with the ``msa`` design are split; others raise
:class:`RuntimeUnavailable` (the next runtime in line serves).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.adapters import inert_adapters_skipped
from ..core.encoder_stages import EncoderSplitError, encode_back, encode_front, stage_count
from ..core.model import AdaptedSam
from .runtimes import ExportedGraph, OpenVinoEncoder, RuntimeUnavailable, compile_graph, probe_input

HEAD_STAGES = 3  # TinyViT stages (of 4) that stay in fp32, with the patch embedding


def _check_split(model: AdaptedSam) -> None:
    """RuntimeUnavailable unless ``model``'s encoder is a TinyViT of the msa design with more than
    ``HEAD_STAGES`` stages."""
    try:
        stages = stage_count(model)
    except EncoderSplitError as e:
        # depth mixes slice stacks; samus's CNN branch passes the image from the patch embedding to the
        # neck outside the module graph, so a split trace would freeze the probe's image into the tail
        raise RuntimeUnavailable(f"openvino_mixed: {e}") from e
    if not hasattr(model.image_encoder, "layers") or stages <= HEAD_STAGES:
        kind = type(model.image_encoder).__name__
        raise RuntimeUnavailable(f"openvino_mixed splits TinyViT encoders only, not {kind}")


class EncoderHead(nn.Module):
    """Pixel normalisation, patch embedding and the first stages: (1, 3, S, S) -> tokens (1, N, C)."""

    def __init__(self, model: AdaptedSam) -> None:
        super().__init__()
        _check_split(model)
        self.model = model

    def forward(self, image01: Tensor) -> Tensor:
        return encode_front(self.model, image01, HEAD_STAGES)


class EncoderTail(nn.Module):
    """The remaining stages and the neck: tokens (1, N, C) -> embedding (1, 256, 64, 64)."""

    def __init__(self, model: AdaptedSam) -> None:
        super().__init__()
        _check_split(model)
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return encode_back(self.model, tokens, HEAD_STAGES)


class ExportedEncoderPart(ExportedGraph):
    """One part (``head`` or ``tail``) of the encoder as OpenVINO IR, cached like the whole encoder."""

    def __init__(self, model: AdaptedSam, cache_dir: Path, key: str, part: str) -> None:
        self.part = part
        self.stem = f"encoder_{part}"
        self.folder_tag = f"-{part}-s{HEAD_STAGES}"  # the split point: another split, another graph
        super().__init__(model, cache_dir, key)
        self._example: Tensor | None = None

    def example(self) -> Tensor:
        """The part's input for tracing: the probe image, or the head's tokens of it."""
        if self._example is None:
            probe = probe_input(self.model).to(self.model.device)
            with torch.inference_mode():
                self._example = probe if self.part == "head" else EncoderHead(self.model).eval()(probe)
        return self._example

    def input_spec(self) -> list:
        return list(self.example().shape)

    def convert(self, openvino):
        module = (EncoderHead if self.part == "head" else EncoderTail)(self.model).eval()
        example = self.example()
        with inert_adapters_skipped(self.model.image_encoder):
            return openvino.convert_model(module, example_input=example, input=[tuple(example.shape)])


def build_mixed(model: AdaptedSam, cache_dir: Path, key: str) -> tuple[OpenVinoEncoder, bool]:
    """The mixed-precision encoder for ``model`` (parts read from the cache or exported now) and whether
    a part was exported now."""
    head, tail = (ExportedEncoderPart(model, cache_dir, key, p) for p in ("head", "tail"))
    encode = OpenVinoEncoder(compile_graph(head.read(), "fp32"), compile_graph(tail.read(), "bf16"))
    return encode, head.export_s is not None or tail.export_s is not None
