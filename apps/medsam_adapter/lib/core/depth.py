"""The ``depth`` design (3DSAM-adapter; Medical SAM Adapter's image-to-video split).

Slice ``k`` is encoded together with its neighbours ``k-1`` and ``k+1`` (edge slices repeated at a
volume's ends): the three go through the encoder as one batch, and after every transformer block a
depth adapter mixes each token across the three slices (bottleneck down-projection, a depth-wise
convolution over the slice axis, up-projection). The space branch is ``msa``'s two adapters per block.
The embedding kept is the middle slice's, so the decoder, the prompt-free head, the cache and 3D
propagation see one embedding per slice as with every other design, now with 3D context.

Every added path ends in a zero-initialised projection, so an untrained ``depth`` design computes
exactly what the base encoder computes for the middle slice. A single slice given to a ``depth`` encoder
is encoded as a stack of three copies of itself. The depth is a constant of the model, never state, so
concurrent requests and recomputation (activation checkpointing) see the same.
"""

from __future__ import annotations

from torch import Tensor, nn

from .adapters import ParallelAdapter, SerialAdapter, Wrapped, _first_linear_in, encoder_blocks
from .config import AdapterSettings

DEPTH_SLICES = 3  # slices encoded together: k-1, k, k+1


class DepthAdapter(nn.Module):
    """Channels-last features of (B * depth) slices -> a correction mixing each token across depth."""

    def __init__(self, dim: int, ratio: float, depth: int = DEPTH_SLICES) -> None:
        super().__init__()
        hidden = max(1, round(dim * ratio))
        self.depth = depth
        self.down = nn.Linear(dim, hidden)
        self.mix = nn.Conv1d(hidden, hidden, 3, padding=1, groups=hidden)  # over the slice axis
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: Tensor) -> Tensor:
        h = self.down(y)
        shape = h.shape  # (B * depth, ..., hidden)
        tokens = h.reshape(shape[0] // self.depth, self.depth, -1, shape[-1])  # (B, depth, n, hidden)
        b, d, n, c = tokens.shape
        mixed = self.mix(tokens.permute(0, 2, 3, 1).reshape(b * n, c, d))  # (B * n, hidden, depth)
        mixed = mixed.reshape(b, n, c, d).permute(0, 3, 1, 2).reshape(shape)
        return self.up(self.act(mixed))


class DepthOutput(Wrapped):
    """``y = f(x); y + depth_adapter(y)``."""

    def __init__(self, inner: nn.Module, dim: int, ratio: float) -> None:
        super().__init__()
        self.inner = inner
        self.adapter = DepthAdapter(dim, ratio)  # trainable names hold ".adapter." (model.part_of)

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner(x)
        return y + self.adapter(y)


def add_depth_encoder_adapters(image_encoder: nn.Module, settings: AdapterSettings) -> int:
    """``msa``'s two adapters per transformer block plus a depth adapter on each block's MLP output.
    Returns the adapted block count."""
    blocks = encoder_blocks(image_encoder)
    for block in blocks:
        dim = _first_linear_in(block.mlp)
        block.attn = SerialAdapter(block.attn, dim, settings.ratio)
        space = ParallelAdapter(block.mlp, dim, settings.ratio, settings.mlp_scale)
        block.mlp = DepthOutput(space, dim, settings.ratio)
    return len(blocks)


def encode_stack(image_encoder: nn.Module, stack: Tensor) -> Tensor:
    """(B, D, 3, S, S) normalised slice stacks (D = :data:`DEPTH_SLICES`) -> the middle slices' embeddings
    (B, C, h, w); (B, 3, S, S) single slices are encoded as stacks of copies."""
    if stack.dim() == 4:
        stack = stack.unsqueeze(1).expand(-1, DEPTH_SLICES, -1, -1, -1)
    b, d = stack.shape[:2]
    if d != DEPTH_SLICES:
        raise ValueError(f"the depth design encodes stacks of {DEPTH_SLICES} slices, got {d}")
    embedding = image_encoder(stack.flatten(0, 1))
    return embedding.unflatten(0, (b, d))[:, d // 2]
