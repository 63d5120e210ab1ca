"""SAMUS-style encoder adaptation (Lin et al. 2023), as far as it applies to our backbones.

Added by wrapping the encoder's own sub-modules (their classes are never modified); every added
output path ends in a zero-initialised projection, so an untrained ``samus`` design computes exactly
what the base encoder computes.

- feature adapter after the patch embedding (channels-first for TinyViT, channels-last for ViT);
- feature adapters beside every transformer block's MLP (scale ``mlp_scale``);
- position adapter (ViT only): a learned correction of the position embedding, resized to the token
  grid, added to the patch tokens (SAMUS runs ViT at 256 px with a shorter token sequence);
- a light parallel CNN branch on the input image whose features the final embedding attends to
  (cross-branch attention after the neck, zero-initialised output projection).

The patch-embedding wrapper hands the input image to the neck wrapper through a per-thread slot, so
concurrent requests on one model never see each other's images.
"""

from __future__ import annotations

import threading

import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import BottleneckAdapter, ParallelAdapter, _first_linear_in, encoder_blocks
from .config import AdapterSettings


class _ImageSlot:
    """Per-thread hand-over of the encoder's input image from the patch embedding to the neck.
    A deep copy (a cloned model) gets its own slot."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> _ImageSlot:
        return _ImageSlot()

    def put(self, image: Tensor) -> None:
        self._local.image = image

    def take(self) -> Tensor | None:
        image = getattr(self._local, "image", None)
        self._local.image = None
        return image


class ChannelAdapter(nn.Module):
    """A bottleneck adapter over the channel axis of (B, C, H, W) or (B, H, W, C) features."""

    def __init__(self, dim: int, ratio: float, channels_last: bool) -> None:
        super().__init__()
        self.adapter = BottleneckAdapter(dim, ratio)
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            return self.adapter(x)
        return self.adapter(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PositionAdapter(nn.Module):
    """ViT: a zero-initialised depth-wise conv of the (frozen) position embedding, resized to the token
    grid, added to the tokens — the position embedding adapted to a shorter token sequence."""

    def __init__(self, pos_embed: Tensor) -> None:
        super().__init__()
        dim = pos_embed.shape[-1]
        self.register_buffer("pos", pos_embed.detach().permute(0, 3, 1, 2).clone(), persistent=False)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        pos = self.pos
        if pos.shape[-2:] != tokens.shape[1:3]:
            pos = F.interpolate(pos, size=tokens.shape[1:3], mode="bilinear", align_corners=False)
        return self.conv(pos).permute(0, 2, 3, 1)


class SamusPatchEmbed(nn.Module):
    """patch embedding -> + feature adapter (+ position adapter); keeps the input image for the neck."""

    def __init__(
        self, inner: nn.Module, dim: int, ratio: float, channels_last: bool, slot: _ImageSlot,
        pos_embed: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        parts: dict[str, nn.Module] = {"feature": ChannelAdapter(dim, ratio, channels_last)}
        if pos_embed is not None:
            parts["position"] = PositionAdapter(pos_embed)
        self.adapter = nn.ModuleDict(parts)  # every trainable name holds ".adapter." (model.part_of)
        self.slot = slot

    def forward(self, x: Tensor) -> Tensor:
        self.slot.put(x)
        y = self.inner(x)
        y = y + self.adapter["feature"](y)
        if "position" in self.adapter:
            y = y + self.adapter["position"](y)
        return y


class CnnBranch(nn.Module):
    """A light CNN on the input image: four stride-2 convs (1/16 resolution), ``width`` channels."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        chans = [3, width // 4, width // 2, width, width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(4, cout), nn.GELU()]
        self.net = nn.Sequential(*layers)

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)


class CrossBranchAttention(nn.Module):
    """Embedding tokens (queries) attend to the CNN branch's tokens; the result is projected back to
    the embedding's channels by a zero-initialised projection and added."""

    def __init__(self, embed_dim: int, branch_dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.cnn = CnnBranch(branch_dim)
        self.query = nn.Linear(embed_dim, branch_dim)
        self.attn = nn.MultiheadAttention(branch_dim, heads, batch_first=True)
        self.out = nn.Linear(branch_dim, embed_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, embedding: Tensor, image: Tensor) -> Tensor:
        b, c, h, w = embedding.shape
        keys = self.cnn(image).flatten(2).transpose(1, 2)  # (B, n, d)
        queries = self.query(embedding.flatten(2).transpose(1, 2))  # (B, h*w, d)
        fused, _ = self.attn(queries, keys, keys, need_weights=False)
        return self.out(fused).transpose(1, 2).reshape(b, c, h, w)


class SamusNeck(nn.Module):
    """neck -> + cross-branch attention to the CNN branch's features of the same input image."""

    def __init__(self, inner: nn.Module, embed_dim: int, slot: _ImageSlot) -> None:
        super().__init__()
        self.inner = inner
        self.adapter = CrossBranchAttention(embed_dim)
        self.slot = slot

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner(x)
        image = self.slot.take()
        if image is None:  # the neck called on its own (no image passed through the patch embedding)
            return y
        return y + self.adapter(y, image)


def _embed_dim(neck: nn.Module) -> int:
    convs = [m for m in neck.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"no Conv2d in the encoder's neck ({type(neck).__name__})")
    return convs[-1].out_channels


def _patch_dim(patch_embed: nn.Module) -> int:
    convs = [m for m in patch_embed.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"no Conv2d in the encoder's patch embedding ({type(patch_embed).__name__})")
    return convs[-1].out_channels


def add_samus_encoder_adapters(image_encoder: nn.Module, settings: AdapterSettings) -> int:
    """SAMUS's encoder parts on a TinyViT or ViT encoder (must have ``patch_embed`` and ``neck``).
    Returns the number of transformer blocks that got an MLP adapter."""
    for attr in ("patch_embed", "neck"):
        if not isinstance(getattr(image_encoder, attr, None), nn.Module):
            raise ValueError(f"design 'samus' needs an encoder with a '{attr}' ({type(image_encoder).__name__})")
    vit = isinstance(getattr(image_encoder, "pos_embed", None), Tensor)  # segment-anything ImageEncoderViT
    slot = _ImageSlot()
    image_encoder.patch_embed = SamusPatchEmbed(
        image_encoder.patch_embed,
        _patch_dim(image_encoder.patch_embed),
        settings.ratio,
        channels_last=vit,
        slot=slot,
        pos_embed=image_encoder.pos_embed if vit else None,
    )
    image_encoder.neck = SamusNeck(image_encoder.neck, _embed_dim(image_encoder.neck), slot)
    blocks = encoder_blocks(image_encoder)
    for block in blocks:
        block.mlp = ParallelAdapter(block.mlp, _first_linear_in(block.mlp), settings.ratio, settings.mlp_scale)
    return len(blocks)
