"""Prompt-free segmentation heads (AutoSAM's three kinds) on the frozen image embedding.

Every head maps an embedding (B, C, h, w) to multi-class logits (B, 1 + labels, 4h, 4w) — background
plus one channel per label, all classes in one pass — in the decoder's low-res frame.

- ``decoder``: today's head, shaped like SAM's output upscaling (conv body, two transposed convs);
- ``unet``: a small CNN UNet on the embedding (two down/up levels with skip connections);
- ``linear``: a 1x1 projection of the embedding, bilinearly upsampled (AutoSAM's linear probe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import HEADS


def _stem(in_channels: int, width: int) -> nn.Sequential:
    """1x1 projection of the embedding to the head's width."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 1), nn.GroupNorm(8, width), nn.GELU())


def _upscaling(width: int) -> nn.Sequential:
    """Two transposed convs: the embedding's resolution x4 (the decoder's low-res frame)."""
    return nn.Sequential(
        nn.ConvTranspose2d(width, width // 2, 2, stride=2),
        nn.GroupNorm(8, width // 2),
        nn.GELU(),
        nn.ConvTranspose2d(width // 2, width // 4, 2, stride=2),
        nn.GELU(),
    )


class PromptFreeHead(nn.Module):
    """``decoder`` head: multi-class logits at 4x the embedding resolution. About 0.3M parameters for
    a 256-channel embedding."""

    def __init__(self, num_labels: int, in_channels: int = 256, width: int = 112) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.stem = _stem(in_channels, width)
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.GELU(),
        )
        self.up = _upscaling(width)
        self.classify = nn.Conv2d(width // 4, num_labels + 1, 1)

    def forward(self, embedding: Tensor) -> Tensor:
        x = self.stem(embedding)
        x = x + self.body(x)
        return self.classify(self.up(x))


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.GELU())


class UNetHead(nn.Module):
    """``unet`` head: a CNN UNet on the embedding (h -> h/2 -> h/4 and back, skip connections), then
    two transposed convs to 4x the embedding resolution. About 0.6M parameters at width 64."""

    def __init__(self, num_labels: int, in_channels: int = 256, width: int = 64) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.stem = _stem(in_channels, width)
        self.enc1 = _conv(width, width)
        self.down1 = _conv(width, 2 * width, stride=2)
        self.down2 = _conv(2 * width, 2 * width, stride=2)
        self.up2 = nn.ConvTranspose2d(2 * width, 2 * width, 2, stride=2)
        self.dec2 = _conv(4 * width, width)
        self.up1 = nn.ConvTranspose2d(width, width, 2, stride=2)
        self.dec1 = _conv(2 * width, width)
        self.out = _upscaling(width)
        self.classify = nn.Conv2d(width // 4, num_labels + 1, 1)

    def forward(self, embedding: Tensor) -> Tensor:
        s1 = self.enc1(self.stem(embedding))
        s2 = self.down1(s1)
        bottom = self.down2(s2)
        x = self.dec2(torch.cat([_fit(self.up2(bottom), s2), s2], 1))
        x = self.dec1(torch.cat([_fit(self.up1(x), s1), s1], 1))
        return self.classify(self.out(x))


def _fit(x: Tensor, like: Tensor) -> Tensor:
    """Crop or pad ``x`` to ``like``'s spatial size (odd embedding sizes)."""
    dh, dw = like.shape[-2] - x.shape[-2], like.shape[-1] - x.shape[-1]
    return F.pad(x, (0, dw, 0, dh)) if dh or dw else x


class LinearHead(nn.Module):
    """``linear`` head: per-pixel linear classifier on the embedding, bilinear 4x upsampling."""

    def __init__(self, num_labels: int, in_channels: int = 256) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.classify = nn.Conv2d(in_channels, num_labels + 1, 1)

    def forward(self, embedding: Tensor) -> Tensor:
        logits = self.classify(embedding)
        return F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)


def build_head(kind: str, num_labels: int, in_channels: int = 256) -> nn.Module:
    """A prompt-free head of one of :data:`HEADS` for ``num_labels`` labels (+ background)."""
    if kind == "decoder":
        return PromptFreeHead(num_labels, in_channels)
    if kind == "unet":
        return UNetHead(num_labels, in_channels)
    if kind == "linear":
        return LinearHead(num_labels, in_channels)
    raise ValueError(f"unknown prompt-free head {kind!r}; known: {list(HEADS)}")
