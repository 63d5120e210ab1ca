"""Prompt-free segmentation head (AutoSAM-style) on the frozen image embedding."""

from __future__ import annotations

from torch import Tensor, nn


class PromptFreeHead(nn.Module):
    """Multi-class logits (background + labels) at 4x the embedding resolution, i.e. the decoder's
    low-res frame, from the image embedding alone. About 0.3M parameters for a 256-channel embedding."""

    def __init__(self, num_labels: int, in_channels: int = 256, width: int = 112) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 1), nn.GroupNorm(8, width), nn.GELU())
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.GELU(),
        )
        self.up = nn.Sequential(
            nn.ConvTranspose2d(width, width // 2, 2, stride=2),
            nn.GroupNorm(8, width // 2),
            nn.GELU(),
            nn.ConvTranspose2d(width // 2, width // 4, 2, stride=2),
            nn.GELU(),
        )
        self.classify = nn.Conv2d(width // 4, num_labels + 1, 1)

    def forward(self, embedding: Tensor) -> Tensor:
        x = self.stem(embedding)
        x = x + self.body(x)
        return self.classify(self.up(x))
