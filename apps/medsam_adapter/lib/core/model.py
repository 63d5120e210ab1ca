"""AdaptedSam: a backbone with adapters and heads, everything else frozen."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .adapters import add_decoder_adapters, add_encoder_adapters
from .backbones import Backbone, build_backbone
from .config import TRAINABLE_PARTS, AdapterSettings, ModelProfile
from .depth import DEPTH_SLICES, add_depth_encoder_adapters, encode_stack
from .heads import build_head


def part_of(name: str) -> str | None:
    """Which trainable part a parameter name belongs to (None: frozen backbone)."""
    if name.startswith("prompt_free_head."):
        return "prompt_free_head"
    if ".adapter." in name:
        return "encoder_adapters" if name.startswith("image_encoder.") else "decoder_adapters"
    if name.startswith("mask_decoder."):
        rest = name[len("mask_decoder.") :]
        for prefix, part in (
            ("output_upscaling.", "output_upscaling"),
            ("output_hypernetworks_mlps.", "hypernetworks"),
            ("iou_prediction_head.", "iou_head"),
            ("iou_token.", "iou_head"),
            ("mask_tokens.", "mask_tokens"),
        ):
            if rest.startswith(prefix):
                return part
    return None


@dataclass(frozen=True)
class Decoded:
    low_res_logits: Tensor  # (B, M, h, w) in the low-res model frame
    iou: Tensor  # (B, M) predicted IoU

    def kept(self) -> Decoded:
        """Per item, the mask with the highest predicted IoU (the one shown; one mask: that one)."""
        best = self.iou.detach().argmax(dim=1)
        rows = torch.arange(len(best), device=best.device)
        return Decoded(self.low_res_logits[rows, best][:, None], self.iou[rows, best][:, None])


def lone_click(points: tuple[Tensor, Tensor] | None, boxes: Tensor | None, mask_logits: Tensor | None) -> bool:
    """One click and nothing else: the ambiguous prompt that may get three masks (SAM's rule)."""
    return points is not None and points[0].shape[1] == 1 and boxes is None and mask_logits is None


class AdaptedSam(nn.Module):
    """Backbone + encoder/decoder adapters + prompt-free head. Only the parts listed in ``trainable``
    can ever require gradients; the backbone weights are frozen."""

    def __init__(
        self,
        backbone: Backbone,
        adapters: AdapterSettings,
        labels: tuple[str, ...] = (),
        trainable: tuple[str, ...] = TRAINABLE_PARTS,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone.name
        self.base_sha256 = backbone.weights_sha256
        self.img_size = backbone.img_size
        self.adapter_settings = adapters
        self.labels = tuple(labels)
        self.trainable_parts = tuple(p for p in TRAINABLE_PARTS if p in trainable)
        self.normalize_pixels = backbone.normalize_pixels
        self.register_buffer("pixel_mean", backbone.pixel_mean.clone(), persistent=False)
        self.register_buffer("pixel_std", backbone.pixel_std.clone(), persistent=False)
        self.image_encoder = backbone.image_encoder
        self.prompt_encoder = backbone.prompt_encoder
        self.mask_decoder = backbone.mask_decoder
        # fixed-seed initialisation: every process (server, trainer, each distributed rank) builds the
        # identical fresh adapters and head, so runs are reproducible
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.depth = adapters.encoder and adapters.design == "depth"  # slices encoded with neighbours
            if self.depth:
                add_depth_encoder_adapters(self.image_encoder, adapters)
            elif adapters.encoder:
                add_encoder_adapters(self.image_encoder, adapters)
            if adapters.decoder:
                add_decoder_adapters(self.mask_decoder, adapters)
            self.prompt_free_head = build_head(adapters.head, len(self.labels)) if self.labels else None
        self.prompt_free_head_trained = False  # set when trained adapters with a fitted head are loaded
        self.trained_with_mask_prompts = False  # set when the loaded adapters learnt to use fed-back logits
        self.trained_multimask_single_click = False  # set when they learnt three masks for a lone click
        self.freeze_all_but(self.trainable_parts)
        self.eval()

    @classmethod
    def from_profile(cls, profile: ModelProfile) -> AdaptedSam:
        backbone = build_backbone(profile.backbone, profile.checkpoint)
        return cls(backbone, profile.adapters, profile.labels, profile.trainable)

    # -- parameters -----------------------------------------------------------------------------
    def freeze_all_but(self, parts: tuple[str, ...] | list[str]) -> None:
        """Freeze every parameter except those of ``parts`` (a subset of the profile's trainable parts)."""
        unknown = set(parts) - set(self.trainable_parts)
        if unknown:
            raise ValueError(f"parts {sorted(unknown)} are not trainable in this profile ({self.trainable_parts})")
        for name, p in self.named_parameters():
            p.requires_grad_(part_of(name) in parts)

    def adaptable_state(self) -> dict[str, Tensor]:
        """The tensors an adapter checkpoint holds: every parameter of the profile's trainable parts."""
        return {
            name: p.detach().clone() for name, p in self.named_parameters() if part_of(name) in self.trainable_parts
        }

    def parameter_counts(self) -> dict[str, int]:
        """Total, trainable (requires_grad now) and per-part parameter counts."""
        counts = {"total": 0, "trainable": 0, "adaptable": 0}
        for name, p in self.named_parameters():
            n = p.numel()
            counts["total"] += n
            counts["trainable"] += n if p.requires_grad else 0
            part = part_of(name)
            if part in self.trainable_parts:
                counts["adaptable"] += n
            if part:
                counts[part] = counts.get(part, 0) + n
        return counts

    # -- forward pieces ---------------------------------------------------------------------------
    @property
    def low_res_size(self) -> tuple[int, int]:
        """Size of the decoder's logits and of the dense mask prompt."""
        return tuple(self.prompt_encoder.mask_input_size)

    @property
    def device(self) -> torch.device:
        return next(self.mask_decoder.parameters()).device

    @property
    def depth_slices(self) -> int:
        """Slices each embedding is encoded from: 3 (k-1, k, k+1) for the ``depth`` design, else 1."""
        return DEPTH_SLICES if self.depth else 1

    def normalized(self, image01: Tensor) -> Tensor:
        """``image01`` as the image encoder takes it: SAM's pixel normalisation where the backbone has one."""
        if self.normalize_pixels:
            return (image01 * 255.0 - self.pixel_mean) / self.pixel_std
        return image01

    def encode(self, image01: Tensor) -> Tensor:
        """Image embedding for a batch of [0, 1] RGB images (B, 3, S, S), or of slice stacks
        (B, D, 3, S, S) whose middle slice is embedded (with its neighbours' context when the design
        is ``depth``, which encodes a single slice as a stack of copies; other designs encode the middle
        slice alone)."""
        image01 = self.normalized(image01)
        if self.depth:
            return encode_stack(self.image_encoder, image01)
        if image01.dim() == 5:
            return self.image_encoder(image01[:, image01.shape[1] // 2])
        return self.image_encoder(image01)

    def decode(
        self,
        embedding: Tensor,
        points: tuple[Tensor, Tensor] | None = None,
        boxes: Tensor | None = None,
        mask_logits: Tensor | None = None,
        multimask: bool = False,
    ) -> Decoded:
        """Prompt encoder + mask decoder for one embedding per batch item.

        points: (coords (B, N, 2) as x, y in the model frame, labels (B, N) with 1 = fg, 0 = bg);
        boxes: (B, 4) as x0, y0, x1, y1 in the model frame; mask_logits: (B, 1, h, w) low-res logits.
        """
        sparse, dense = self.encode_prompts(points, boxes, mask_logits)
        low_res, iou = self.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        return Decoded(low_res, iou)

    def encode_prompts(
        self, points: tuple[Tensor, Tensor] | None, boxes: Tensor | None, mask_logits: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The prompt encoder's (sparse, dense) embeddings of :meth:`decode`'s prompts."""
        return self.prompt_encoder(
            points=points, boxes=boxes[:, None, :] if boxes is not None else None, masks=mask_logits
        )

    def auto_segment(self, embedding: Tensor) -> Tensor:
        """Prompt-free multi-class logits (B, 1 + labels, h, w) in the low-res frame."""
        if self.prompt_free_head is None:
            raise RuntimeError("this profile has no labels, so it has no prompt-free head")
        return self.prompt_free_head(embedding)
