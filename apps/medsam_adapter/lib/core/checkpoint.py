"""AdapterCheckpoint: only the trainable tensors plus the metadata that ties them to one base model."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .atomic import atomic_write
from .config import AdapterSettings
from .model import AdaptedSam

FORMAT = "medsam-adapter-checkpoint/1"


class CheckpointError(ValueError):
    """An adapter checkpoint is unreadable or does not belong to the model it is applied to."""


@dataclass
class AdapterCheckpoint:
    backbone: str
    base_sha256: str
    adapters: dict[str, Any]
    labels: list[str]
    parts: list[str]
    version: int
    tensors: dict[str, Tensor]
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: AdaptedSam, version: int, metrics: dict[str, Any] | None = None) -> AdapterCheckpoint:
        return cls(
            backbone=model.backbone_name,
            base_sha256=model.base_sha256,
            adapters=model.adapter_settings.as_dict(),
            labels=list(model.labels),
            parts=list(model.trainable_parts),
            version=version,
            tensors={k: v.detach().cpu().clone() for k, v in model.adaptable_state().items()},
            metrics=dict(metrics or {}),
        )

    def metadata(self) -> dict[str, Any]:
        meta = asdict(self)
        meta.pop("tensors")
        return meta

    def fingerprint(self, prefix: str = "") -> str:
        """Hash of the tensors whose names start with ``prefix`` (e.g. the encoder's adapters)."""
        digest = hashlib.blake2b(digest_size=12)
        for name in sorted(self.tensors):
            if name.startswith(prefix):
                digest.update(name.encode())
                digest.update(self.tensors[name].float().numpy().tobytes())
        return digest.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write atomically: a temporary file in the same folder, fsync, then rename over ``path``."""
        with atomic_write(path) as fh:
            torch.save({"format": FORMAT, "meta": self.metadata(), "tensors": self.tensors}, fh)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> AdapterCheckpoint:
        path = Path(path)
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"adapter checkpoint not found: {path}") from None
        except Exception as e:  # noqa: BLE001 - truncated or foreign files
            raise CheckpointError(f"{path} is not a readable adapter checkpoint: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an adapter checkpoint ({FORMAT})")
        meta = data["meta"]
        return cls(tensors=data["tensors"], **meta)

    def check_compatible(self, model: AdaptedSam) -> None:
        """Raise :class:`CheckpointError` unless this checkpoint was made for exactly this base model."""
        if self.backbone != model.backbone_name:
            raise CheckpointError(
                f"adapter checkpoint v{self.version} is for backbone '{self.backbone}', not '{model.backbone_name}'"
            )
        if self.base_sha256 != model.base_sha256:
            raise CheckpointError(
                f"adapter checkpoint v{self.version} was trained on base weights {self.base_sha256[:12]}..., "
                f"but the model has {model.base_sha256[:12]}..."
            )
        if AdapterSettings(**self.adapters) != model.adapter_settings:
            raise CheckpointError(
                f"adapter checkpoint v{self.version} uses adapters {self.adapters}, "
                f"the profile uses {model.adapter_settings.as_dict()}"
            )
        own = dict(model.named_parameters())
        names = [k for k in self.tensors if self.labels == list(model.labels) or not k.startswith("prompt_free_head.")]
        unknown = sorted(set(names) - set(own))
        wrong = sorted(k for k in names if k in own and own[k].shape != self.tensors[k].shape)
        if unknown or wrong:
            raise CheckpointError(
                f"adapter checkpoint v{self.version} does not fit the model: "
                f"unknown {unknown[:3]}, wrong shape {wrong[:3]}"
            )

    def apply_to(self, model: AdaptedSam) -> None:
        """Copy the tensors into ``model`` after :meth:`check_compatible`. The prompt-free head is
        loaded only when the label names match; otherwise it is left untouched (and marked untrained)."""
        self.check_compatible(model)
        own = dict(model.named_parameters())
        same_labels = list(self.labels) == list(model.labels)
        model.prompt_free_head_trained = same_labels and bool(self.metrics.get("prompt_free_head_trained"))
        model.trained_with_mask_prompts = bool(self.metrics.get("trained_with_mask_prompts"))
        model.trained_multimask_single_click = bool(self.metrics.get("trained_multimask_single_click"))
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                if name.startswith("prompt_free_head.") and not same_labels:
                    continue
                own[name].copy_(tensor.to(own[name].device))
