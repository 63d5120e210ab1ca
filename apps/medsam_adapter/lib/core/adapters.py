"""Adapters added to a backbone by wrapping its sub-modules: the Medical SAM Adapter design (``msa``,
bottleneck adapters) here, SAMUS's encoder parts (``samus``) in :mod:`.samus`.

The backbone's own classes are never modified: a block's ``attn``/``mlp`` attribute is replaced by a
wrapper module that calls the original and adds the adapter's output. Up-projections start at zero,
so a freshly adapted model computes exactly what the base model computes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import AdapterSettings


class Wrapped(nn.Module):
    """A wrapper around a backbone sub-module (``inner``). With ``checkpointed`` set (training the encoder's
    adapters with less memory: :func:`set_checkpointing`) its activations are recomputed in the backward
    pass instead of kept; the result is the same."""

    checkpointed = False

    def __call__(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        if self.checkpointed and torch.is_grad_enabled():
            return checkpoint(super().__call__, *args, use_reentrant=False, **kwargs)
        return super().__call__(*args, **kwargs)


def set_checkpointing(module: nn.Module, on: bool) -> int:
    """Turn activation checkpointing of every :class:`Wrapped` inside ``module`` on or off; returns how many."""
    wrapped = [m for m in module.modules() if isinstance(m, Wrapped)]
    for m in wrapped:
        m.checkpointed = on
    return len(wrapped)


class BottleneckAdapter(nn.Module):
    """down-projection -> GELU -> up-projection (zero-initialised)."""

    def __init__(self, dim: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = max(1, round(dim * ratio))
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.act(self.down(x)))

    def inert(self) -> bool:
        """Whether the adapter adds exactly zero whatever its input (up-projection all zero: untrained)."""
        return not (self.up.weight.any() or self.up.bias.any())


class SerialAdapter(Wrapped):
    """``y = f(...); y + adapter(y)`` — an adapter on the output of ``f``."""

    skip_adapter = False  # set by :func:`inert_adapters_skipped` only

    def __init__(self, inner: nn.Module, dim: int, ratio: float) -> None:
        super().__init__()
        self.inner = inner
        self.adapter = BottleneckAdapter(dim, ratio)

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        y = self.inner(*args, **kwargs)
        return y if self.skip_adapter else y + self.adapter(y)


class ParallelAdapter(Wrapped):
    """``f(x) + scale * adapter(x)`` — an adapter beside ``f``."""

    skip_adapter = False  # set by :func:`inert_adapters_skipped` only

    def __init__(self, inner: nn.Module, dim: int, ratio: float, scale: float) -> None:
        super().__init__()
        self.inner = inner
        self.adapter = BottleneckAdapter(dim, ratio)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x) if self.skip_adapter else self.inner(x) + self.scale * self.adapter(x)


@contextmanager
def inert_adapters_skipped(module: nn.Module) -> Iterator[int]:
    """Within the block, adapters inside ``module`` that add exactly zero (:meth:`BottleneckAdapter.inert`)
    are not computed, for exporting an inference graph without their work (the output is the same);
    yields how many. Training never sees the flag: it is cleared on exit."""
    wrappers = [m for m in module.modules() if isinstance(m, SerialAdapter | ParallelAdapter) and m.adapter.inert()]
    for m in wrappers:
        m.skip_adapter = True
    try:
        yield len(wrappers)
    finally:
        for m in wrappers:
            m.skip_adapter = False


def _first_linear_in(module: nn.Module) -> int:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise ValueError(f"no Linear layer in {type(module).__name__}")


def encoder_blocks(image_encoder: nn.Module) -> list[nn.Module]:
    """Transformer blocks of a TinyViT or ViT encoder: modules with an ``attn`` and an ``mlp``."""
    return [
        m
        for m in image_encoder.modules()
        if isinstance(getattr(m, "attn", None), nn.Module) and isinstance(getattr(m, "mlp", None), nn.Module)
    ]


def decoder_blocks(mask_decoder: nn.Module) -> list[nn.Module]:
    """Two-way attention blocks of a SAM mask decoder."""
    return [
        m
        for m in mask_decoder.modules()
        if all(
            isinstance(getattr(m, a, None), nn.Module)
            for a in ("self_attn", "cross_attn_token_to_image", "mlp", "cross_attn_image_to_token")
        )
    ]


def add_encoder_adapters(image_encoder: nn.Module, settings: AdapterSettings) -> int:
    """The encoder side of ``settings.design``. ``msa``: two adapters per transformer block, after
    attention and beside the MLP; ``samus``: see :mod:`.samus`. Returns the adapted block count."""
    if settings.design == "samus":
        from .samus import add_samus_encoder_adapters

        return add_samus_encoder_adapters(image_encoder, settings)
    if settings.design != "msa":
        raise ValueError(f"unknown adapter design {settings.design!r}")
    blocks = encoder_blocks(image_encoder)
    for block in blocks:
        dim = _first_linear_in(block.mlp)
        block.attn = SerialAdapter(block.attn, dim, settings.ratio)
        block.mlp = ParallelAdapter(block.mlp, dim, settings.ratio, settings.mlp_scale)
    return len(blocks)


def add_decoder_adapters(mask_decoder: nn.Module, settings: AdapterSettings) -> int:
    """Three adapters per two-way block: after token self-attention, beside the token MLP, after
    image-to-token cross-attention (every design: SAMUS changes only the encoder). Returns the block count."""
    blocks = decoder_blocks(mask_decoder)
    for block in blocks:
        dim = block.self_attn.embedding_dim
        block.self_attn = SerialAdapter(block.self_attn, dim, settings.ratio)
        block.mlp = ParallelAdapter(block.mlp, dim, settings.ratio, settings.mlp_scale)
        block.cross_attn_image_to_token = SerialAdapter(block.cross_attn_image_to_token, dim, settings.ratio)
    return len(blocks)
