"""The image encoder as a front and a back at a stage boundary (plain PyTorch).

Training only the last stages' adapters needs the front's output once per slice: it is computed once and
kept, and each step runs the back alone, forward and backward. On a CPU that is a fraction of a full
encoder-side step (training TinyViT's last stage and neck costs about a quarter of a whole encoder step).
The front's adapters are frozen, so the kept outputs stay exact.

Stages: TinyViT's ``layers`` (LiteMedSAM: a conv stage and three transformer stages) or a ViT's
``blocks`` (SAM, MedSAM). Only the ``msa`` design splits: ``depth`` mixes slice stacks across the
blocks, and ``samus`` hands the input image from the patch embedding to the neck outside the stages.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from .model import AdaptedSam


class EncoderSplitError(ValueError):
    """The encoder cannot be split there (design, encoder kind or stage count)."""


def _parts(model: AdaptedSam) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    if model.adapter_settings.encoder and model.adapter_settings.design != "msa":
        raise EncoderSplitError(
            f"only the msa design's encoder splits into a kept front and a trained back, not "
            f"{model.adapter_settings.design!r}"
        )
    encoder = model.image_encoder
    stages = getattr(encoder, "layers", None) or getattr(encoder, "blocks", None)
    if not isinstance(stages, nn.ModuleList):
        raise EncoderSplitError(f"{type(encoder).__name__} has no stages (layers or blocks) to split at")
    return encoder.patch_embed, stages, encoder.neck


def stage_count(model: AdaptedSam) -> int:
    """How many stages the encoder has (the back may start after any of them but the last)."""
    return len(_parts(model)[1])


def check_front(model: AdaptedSam, front_stages: int) -> None:
    """EncoderSplitError unless ``front_stages`` leaves at least one stage to train."""
    n = stage_count(model)
    if not 0 < front_stages < n:
        raise EncoderSplitError(f"the kept front must be 1 to {n - 1} of the encoder's {n} stages, got {front_stages}")


def front_prefixes(model: AdaptedSam, front_stages: int) -> tuple[str, ...]:
    """Parameter-name prefixes of the front (patch embedding and the first ``front_stages`` stages): only
    adapters under them change what :func:`encode_front` returns."""
    check_front(model, front_stages)
    patch_embed, stages, _ = _parts(model)
    names = {id(m): n for n, m in model.named_modules()}
    return tuple(f"{names[id(m)]}." for m in (patch_embed, *stages[:front_stages]))


def encode_front(model: AdaptedSam, image01: Tensor, front_stages: int) -> Tensor:
    """Pixel normalisation, patch embedding and the first ``front_stages`` stages of (B, 3, S, S) images."""
    check_front(model, front_stages)
    patch_embed, stages, _ = _parts(model)
    x = patch_embed(model.normalized(image01))
    pos = getattr(model.image_encoder, "pos_embed", None)
    if isinstance(pos, Tensor):  # ViT: absolute position embedding after the patch embedding
        x = x + pos
    for stage in stages[:front_stages]:
        x = stage(x)
    return x


def encode_back(model: AdaptedSam, front: Tensor, front_stages: int) -> Tensor:
    """The image embedding from :func:`encode_front`'s output: the remaining stages and the neck."""
    check_front(model, front_stages)
    _, stages, neck = _parts(model)
    x = front
    for stage in stages[front_stages:]:
        x = stage(x)
    if x.dim() == 3:  # TinyViT: tokens (B, N, C) on a square grid
        b, n, c = (int(v) for v in x.shape)  # constants in a trace: an exported graph has a fixed input size
        side = math.isqrt(n)
        x = x.view(b, side, side, c)
    return neck(x.permute(0, 3, 1, 2))


def freeze_front(model: AdaptedSam, front_stages: int) -> int:
    """Stop gradients for every parameter of the front (its adapters stay as they are); returns how many."""
    check_front(model, front_stages)
    patch_embed, stages, _ = _parts(model)
    frozen = 0
    for module in (patch_embed, *stages[:front_stages]):
        for p in module.parameters():
            frozen += p.numel() if p.requires_grad else 0
            p.requires_grad_(False)
    return frozen
