"""AdapterCheckpoint: only the trainable tensors plus the metadata that ties them to one base model."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .atomic import atomic_write
from .config import AdapterSettings, ModelProfile
from .model import AdaptedSam

FORMAT = "medsam-adapter-checkpoint/1"
logger = logging.getLogger(__name__)


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

    @classmethod
    def head_from_model(cls, model: AdaptedSam, metrics: dict[str, Any] | None = None) -> AdapterCheckpoint:
        """A checkpoint of the prompt-free head alone (loaded on top of other adapters by :meth:`apply_head_to`)."""
        if model.prompt_free_head is None:
            raise CheckpointError("the model has no prompt-free head (its profile has no labels)")
        meta = {**(metrics or {}), "prompt_free_head_trained": True, "encoder_fingerprint": encoder_fingerprint(model)}
        ckpt = cls.from_model(model, 0, meta)
        ckpt.parts = ["prompt_free_head"]
        ckpt.tensors = {k: v for k, v in ckpt.tensors.items() if k.startswith("prompt_free_head.")}
        return ckpt

    def metadata(self) -> dict[str, Any]:
        meta = asdict(self)
        meta.pop("tensors")
        return meta

    def fingerprint(self, prefix: str | tuple[str, ...] = "") -> str:
        """Hash of the tensors whose names start with ``prefix`` (or one of several; e.g. the encoder's
        adapters)."""
        digest = hashlib.blake2b(digest_size=12)
        for name in sorted(self.tensors):
            if name.startswith(prefix):
                digest.update(name.encode())
                digest.update(self.tensors[name].float().numpy().tobytes())
        return digest.hexdigest()

    def changes_encoder(self, fresh: dict[str, Tensor], part: str | tuple[str, ...] = "image_encoder.") -> bool:
        """Whether these tensors make the image encoder (or its ``part``: parameter-name prefixes) differ
        from the fresh (zero-initialised, output-preserving) adapters in ``fresh``: if not, its output
        equals the base model's."""
        return any(
            name not in fresh or not torch.equal(tensor.to(fresh[name].dtype), fresh[name])
            for name, tensor in self.tensors.items()
            if name.startswith(part)
        )

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

    def adapter_settings(self) -> AdapterSettings:
        """The adapter settings the checkpoint was made with (checkpoints older than the ``design`` and
        ``head`` fields read as ``msa`` with the ``decoder`` head)."""
        try:
            return AdapterSettings(**self.adapters)
        except TypeError as e:
            raise CheckpointError(f"adapter checkpoint v{self.version}: unknown adapter settings ({e})") from None

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
        theirs = self.adapter_settings()
        ours = model.adapter_settings
        if theirs.design != ours.design:
            raise CheckpointError(
                f"adapter checkpoint v{self.version} holds adapters of design '{theirs.design}'; the model is "
                f"built for design '{ours.design}' (build it with design '{theirs.design}' to load them)"
            )
        if theirs.head != ours.head:
            raise CheckpointError(
                f"adapter checkpoint v{self.version} holds a '{theirs.head}' prompt-free head; the model has "
                f"a '{ours.head}' head"
            )
        if theirs != ours:
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

    def apply_head_to(self, model: AdaptedSam) -> None:
        """Load only this checkpoint's prompt-free head into ``model`` (its other tensors, if any, are
        ignored): same backbone and base weights, same head kind and the same label names, in order."""
        if self.backbone != model.backbone_name or self.base_sha256 != model.base_sha256:
            raise CheckpointError(
                f"prompt-free head checkpoint is for backbone '{self.backbone}' ({self.base_sha256[:12]}...), "
                f"not '{model.backbone_name}' ({model.base_sha256[:12]}...)"
            )
        head = self.adapter_settings().head
        if head != model.adapter_settings.head:
            raise CheckpointError(f"prompt-free head checkpoint holds a '{head}' head; the model has a "
                                  f"'{model.adapter_settings.head}' head")
        if list(self.labels) != list(model.labels):
            raise CheckpointError(f"prompt-free head checkpoint was trained for labels {self.labels}, "
                                  f"the profile has {list(model.labels)}")
        trained_on = self.metrics.get("encoder_fingerprint")
        if trained_on is not None and trained_on != encoder_fingerprint(model):
            raise CheckpointError("prompt-free head checkpoint was trained on the embedding of another encoder "
                                  "(the served adapters change the image encoder)")
        own = dict(model.named_parameters())
        tensors = {k: v for k, v in self.tensors.items() if k.startswith("prompt_free_head.")}
        expected = {k for k in own if k.startswith("prompt_free_head.")}
        if set(tensors) != expected or any(own[k].shape != v.shape for k, v in tensors.items()):
            raise CheckpointError("prompt-free head checkpoint does not fit the model's head (names or shapes differ)")
        with torch.no_grad():
            for name, tensor in tensors.items():
                own[name].copy_(tensor.to(own[name].device))
        model.prompt_free_head_trained = True


def encoder_fingerprint(model: AdaptedSam) -> str:
    """Hash of the image encoder's adapter tensors (equal for every model whose encoder adapters are
    the fresh, output-preserving ones, whatever its decoder-side adapters)."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(model.adapter_settings.design.encode())
    for name, p in sorted(model.named_parameters()):
        if name.startswith("image_encoder.") and ".adapter." in name:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def load_shipped_head(profile: ModelProfile, model: AdaptedSam) -> bool:
    """Load the profile's shipped prompt-free head (``auto_head_checkpoint``) into ``model``. Returns
    whether it was loaded; a missing or unfitting file is logged and leaves the head untrained."""
    path = profile.auto_head_checkpoint
    if path is None or model.prompt_free_head is None:
        return False
    try:
        AdapterCheckpoint.load(path).apply_head_to(model)
    except CheckpointError as e:
        logger.warning("profile %s: shipped prompt-free head not used: %s", profile.name, e)
        return False
    return True
