"""InteractiveSegmenter: one model profile served to many clients.

Holds the model versions (base + published adapter checkpoints, hot-reloaded), the volume and
embedding caches and the per-client refinement state, and turns voxel-index prompts into label
volumes in the image's own grid. No MONAI Label imports: the infer tasks are thin wrappers.
"""

from __future__ import annotations

import copy
import itertools
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .cache import EmbeddingCache
from .checkpoint import AdapterCheckpoint, CheckpointError, load_shipped_head
from .config import ModelProfile
from .model import AdaptedSam, part_of
from .orientation import SliceView
from .predictor import LoadedModel, SlicePredictor, SliceResult
from .preprocess import IntensityWindow, choose_window
from .prompts import PromptError, VoxelPrompts, choose_slice, points_on_slice
from .propagation import PropagationSettings, propagate_box
from .volume import Volume, VolumeCache

logger = logging.getLogger(__name__)
ADAPTER_FILE = re.compile(r"^adapter_v(\d{4,})\.pt$")
BASE_SOURCE = ("base", 0, "", 0)


def adapter_path(directory: Path, version: int) -> Path:
    return directory / f"adapter_v{version:04d}.pt"


def published_versions(directory: Path) -> list[int]:
    """Complete adapter checkpoints in ``directory`` (temporary files are never listed)."""
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := ADAPTER_FILE.match(p.name)))


def publish_adapters(model: AdaptedSam, directory: Path, metrics: dict) -> int:
    """Save ``model``'s adaptable tensors as the next version in ``directory`` and return its number.

    The write is atomic (see :meth:`AdapterCheckpoint.save`): a process killed at any moment leaves
    either the complete new version or none, never a file that :func:`published_versions` lists.
    Temporary files of earlier writers that were killed are removed first.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".adapter_v*.pt.*.tmp"):
        stale.unlink(missing_ok=True)
    version = max(published_versions(directory), default=0) + 1
    AdapterCheckpoint.from_model(model, version, metrics).save(adapter_path(directory, version))
    return version


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class SegmentationOutput:
    label: np.ndarray  # full volume in the stored grid
    params: dict = field(default_factory=dict)


class ClientStates:
    """Previous low-res logits per (client, image, label, slice), LRU-bounded, never shared."""

    def __init__(self, max_entries: int = 512) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[tuple, tuple[str, Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, model_name: str) -> Tensor | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] != model_name:
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: tuple, model_name: str, logits: Tensor) -> None:
        with self._lock:
            self._items[key] = (model_name, logits)
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def reset(self, client_id: str) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] == client_id]:
                del self._items[key]

    def __len__(self) -> int:
        return len(self._items)


class InteractiveSegmenter:
    """Serves one :class:`ModelProfile`. Construction is cheap; the model loads on first use."""

    def __init__(
        self,
        profile: ModelProfile,
        adapter_dir: Path | None = None,
        device: str | None = None,
        embedding_cache_mb: float | None = None,
        embeddings: EmbeddingCache | None = None,
    ) -> None:
        self.profile = profile
        self.adapter_dir = adapter_dir
        self.device = torch.device(device) if device else default_device()
        cache_mb = profile.inference.embedding_cache_mb if embedding_cache_mb is None else embedding_cache_mb
        self.embeddings = embeddings if embeddings is not None else EmbeddingCache(cache_mb)
        self.volumes = VolumeCache(profile.inference.volume_cache_mb)
        self.clients = ClientStates()
        self._loaded: LoadedModel | None = None
        self._source: tuple | None = None  # the best candidate when _loaded was chosen
        self._loaded_source: tuple | None = None  # what _loaded was built from
        self._base_state: dict[str, Tensor] | None = None
        self._lock = threading.Lock()
        self.pinned_version: int | None = None  # rollback: serve this published version instead of the newest
        self._warned_missing = False
        self._bare: LoadedModel | None = None
        self._lone: LoadedModel | None = None
        self._lone_tried = False

    # -- model versions ---------------------------------------------------------------------------
    def _candidates(self) -> Iterator[tuple]:
        """(kind, version, path, mtime) of the adapters that could be served, best first: published
        versions newest first (only the pinned one when rolled back), the shipped adapters, the base."""
        if self.adapter_dir is not None:
            versions = published_versions(self.adapter_dir)
            if self.pinned_version is not None:
                versions = [v for v in versions if v == self.pinned_version]
            for v in reversed(versions):
                path = adapter_path(self.adapter_dir, v)
                try:
                    mtime = path.stat().st_mtime_ns
                except FileNotFoundError:  # removed since it was listed
                    continue
                yield ("published", v, str(path), mtime)
        shipped = self.profile.adapter_checkpoint
        if shipped is not None:
            if shipped.is_file():
                yield ("shipped", 0, str(shipped), shipped.stat().st_mtime_ns)
            elif not self._warned_missing:
                logger.warning(
                    "profile %s: shipped adapters %s not found; serving the base model", self.profile.name, shipped
                )
                self._warned_missing = True
        yield BASE_SOURCE

    def current(self) -> LoadedModel:
        """The model version to use for a request (reloads when new adapters were published).

        A file that cannot be used (not written by the trainer, for another base model) is logged and
        skipped: the newest usable version serves, and the check is repeated only when files change.
        """
        candidates = self._candidates()
        best = next(candidates)
        loaded = self._loaded
        if loaded is not None and best == self._source:
            return loaded
        with self._lock:
            if self._loaded is not None and best == self._source:
                return self._loaded
            for source in itertools.chain([best], candidates):
                if self._loaded is not None and source == self._loaded_source:
                    built = self._loaded
                    break
                try:
                    built = self._build(source)
                    break
                except CheckpointError as e:
                    logger.error("profile %s: cannot use %s (%s); skipping it", self.profile.name, source[2], e)
            changed = built is not self._loaded
            self._loaded, self._loaded_source, self._source = built, source, best
            if changed:
                dropped = self.embeddings.retain_only(built.encoder_fingerprint)
                logger.info(
                    "profile %s now serves %s (%s); %d cached embeddings of other encoders dropped",
                    self.profile.name,
                    built.name,
                    source[0],
                    dropped,
                )
            return built

    def _build(self, source: tuple) -> LoadedModel:
        kind, version, path, _ = source
        ckpt = AdapterCheckpoint.load(path) if kind != "base" else None
        # a checkpoint of another adapter design or head (a round asked for it) gets a model built for it
        wanted = ckpt.adapter_settings() if ckpt is not None else self.profile.adapters
        if self._loaded is None or wanted != self.profile.adapters or self._loaded.model.adapter_settings != wanted:
            model = AdaptedSam.from_profile(replace(self.profile, adapters=wanted))
            if self._base_state is None and wanted == self.profile.adapters:
                self._base_state = {k: v.clone() for k, v in model.adaptable_state().items()}
        else:
            # a new model object for the new version (requests in flight keep theirs); the frozen
            # backbone tensors are shared, only the adaptable ones are copied
            model = _clone_model(self._loaded.model)
            with torch.no_grad():
                own = dict(model.named_parameters())
                for name, tensor in self._base_state.items():
                    own[name].copy_(tensor)
            model.prompt_free_head_trained = False
            model.trained_with_mask_prompts = False
            model.trained_multimask_single_click = False
        fingerprint = "base"
        if ckpt is not None:
            ckpt.apply_to(model)
            version = ckpt.version if kind == "published" else 0
            if not ckpt.changes_encoder(self._base_state or {}):
                fingerprint = "base"  # encoder adapters untrained (zero up-projections): base embeddings
            else:
                fingerprint = f"enc-{ckpt.fingerprint('image_encoder.')}"
        if not model.prompt_free_head_trained and fingerprint == "base":
            load_shipped_head(self.profile, model)  # the head shipped for the base model's embedding, if any
        model.to(self.device).eval()
        from ..serving.decoder_runtime import RuntimeDecoder  # OpenVINO graph built in the background
        from ..serving.encode_batching import batch_size_for
        from ..serving.runtimes import RuntimeEncoder  # the profile's encoder runtime, prepared on first use

        batch = batch_size_for(self.profile.inference.encode_batch, self.device)
        encode = RuntimeEncoder(model, self.profile.inference.encoder_runtime, max_batch=batch)
        decode = RuntimeDecoder(model, self.profile.inference.decoder_runtime)
        return LoadedModel(model, version, f"{self.profile.name}:{fingerprint}", kind == "shipped", encode, decode)

    def bare_model(self) -> LoadedModel:
        """The base model without any adapters (built once, sharing the frozen backbone)."""
        if self._bare is None:
            self.current()
            with self._lock:
                if self._bare is None:
                    self._bare = self._build(BASE_SOURCE)
        return self._bare

    def lone_click_model(self) -> LoadedModel | None:
        """The profile's lone-click adapters (``lone_click_checkpoint``, built once), or None: without
        them, with ``[inference] lone_click_adapter = false``, or when the file cannot be used (logged
        once). Their answers share the served embedding only when they leave the encoder as it is."""
        path = self.profile.lone_click_checkpoint
        if path is None or not self.profile.inference.lone_click_adapter:
            return None
        if not self._lone_tried:
            self.current()
            with self._lock:
                if not self._lone_tried:
                    try:
                        self._lone = self._build(("lone", 0, str(path), 0))
                    except (CheckpointError, OSError) as e:
                        logger.warning("profile %s: lone-click adapters %s not used: %s", self.profile.name, path, e)
                    self._lone_tried = True
        return self._lone

    def warm_up(self) -> None:
        """Build the served, the bare and the lone-click model versions and their encoder and decoder
        runtimes now (the server does this in the background at startup, so the first prompts do not pay
        for it)."""
        runtimes = [r for loaded in (self.current(), self.bare_model()) for r in (loaded.encode, loaded.decode)]
        lone = self.lone_click_model()
        for runtime in runtimes + ([lone.decode] if lone is not None else []):  # lone clicks: decoder only
            if runtime is not None and hasattr(runtime, "prepare"):
                runtime.prepare()

    def served_adapters(self) -> Path | None:
        """The adapter checkpoint file behind the model served now (None: the bare base model)."""
        self.current()
        source = self._loaded_source
        return Path(source[2]) if source and source[2] else None

    # -- helpers ----------------------------------------------------------------------------------
    def predictor(self, loaded: LoadedModel) -> SlicePredictor:
        # the lone-click adapters were trained next to the shipped ones: they join only while those serve
        return SlicePredictor(
            loaded, self.embeddings, self.profile.preprocessing, self.profile.inference, self.device, self.bare_model,
            self.lone_click_model if loaded.shipped else None,
        )

    def window(self, volume: Volume, override: str | None = None) -> IntensityWindow:
        """The volume's intensity window, computed once per loaded volume (percentiles of a large MR
        volume cost hundreds of milliseconds, far too much to repeat on every click)."""
        key = ("window", self.profile.preprocessing, override)
        if key not in volume.derived:
            volume.derived[key] = choose_window(volume.array, self.profile.preprocessing, override)
        return volume.derived[key]

    def feeds_logits(self, loaded: LoadedModel) -> bool:
        mode = self.profile.inference.refine_with_logits
        return mode == "always" or (mode == "auto" and loaded.model.trained_with_mask_prompts)

    def propagation_settings(self) -> PropagationSettings:
        inf = self.profile.inference
        return PropagationSettings(
            box_margin=inf.propagation_box_margin,
            min_area=inf.propagation_min_area,
            min_iou=inf.propagation_min_iou,
            with_logits=inf.propagate_with_logits,
        )

    # -- serving queries (lib/serving: scheduling and prefetch) ------------------------------------
    def has_embedding(self, path: str | Path, k: int, window: str | None = None, axis: int = 2) -> bool:
        """Whether slice ``k`` of the image at ``path`` is loaded with its embedding cached for the served
        encoder, so a prompt on it costs only the decoder. Never loads, windows or encodes anything."""
        volume = self.volumes.peek(path)
        loaded = self._loaded
        if volume is None or loaded is None or not 0 <= k < volume.shape[axis]:
            return False
        win = volume.derived.get(("window", self.profile.preprocessing, window))
        if win is None:
            return False
        view = SliceView.from_affine(volume.affine, axis)
        stack = view.stack(volume.array, k, loaded.model.depth_slices)
        return self.predictor(loaded).is_embedded(stack, win, view.spacing)

    def slice_versions(self) -> list[LoadedModel]:
        """The model versions whose embeddings a slice's prompts use: the served one, and the bare base
        model too when shipped adapters change the encoder (boxes alone and a lone click's candidates)."""
        loaded = self.current()
        bare = self.bare_model() if loaded.shipped else None
        if bare is not None and bare.encoder_fingerprint != loaded.encoder_fingerprint:
            return [loaded, bare]
        return [loaded]

    def prefetch(self, path: str | Path, k: int, window: str | None = None, axis: int = 2) -> bool:
        """Put slice ``k``'s embedding into the cache (as a prompt on it would; also the base model's when
        shipped adapters change the encoder); True when something was encoded now, False when it was cached
        already or ``k`` lies outside the volume."""
        volume = self.volumes.get(path)
        if not 0 <= k < volume.shape[axis]:
            return False
        view = SliceView.from_affine(volume.affine, axis)
        encoded = False
        for version in self.slice_versions():
            _, _, cached, _ = self.predictor(version).embed(
                view.stack(volume.array, k, version.model.depth_slices), self.window(volume, window), view.spacing
            )
            encoded = encoded or not cached
        return encoded

    # -- requests ---------------------------------------------------------------------------------
    def segment(
        self,
        volume: Volume,
        prompts: VoxelPrompts,
        *,
        three_d: bool,
        slice_index: int | None = None,
        state_key: tuple | None = None,
        window: str | None = None,
        axis: int = 2,
    ) -> SegmentationOutput:
        """One object from clicks and/or a box: on one slice (2D) or propagated through the volume (3D).

        ``state_key`` = (client_id, image, label) enables refinement with the previous logits.
        """
        if prompts.empty:
            raise PromptError("no prompt given: send 'foreground'/'background' clicks or a 'roi' box")
        if prompts.foreground.size == 0 and prompts.roi is None:
            raise PromptError("only background clicks given: add a foreground click or a 'roi' box")
        begin = time.perf_counter()
        loaded = self.current()
        predictor = self.predictor(loaded)
        view = SliceView.from_affine(volume.affine, axis)
        win = self.window(volume, window)
        k = choose_slice(prompts, slice_index, axis)
        if prompts.roi is not None and not prompts.roi.lo[axis] <= k <= prompts.roi.hi[axis] and not three_d:
            raise PromptError(
                f"slice {k} is outside the ROI's slice range {prompts.roi.lo[axis]}..{prompts.roi.hi[axis]}"
            )
        fg = points_on_slice(prompts.foreground, k, axis)
        bg = points_on_slice(prompts.background, k, axis)
        box = None
        if prompts.roi is not None:
            lo, hi = prompts.roi.in_plane(axis)
            box = view.display_box(lo, hi, volume.shape)
        if len(fg) == 0 and box is None:
            raise PromptError(f"no foreground click on slice {k} and no ROI: nothing to segment there")
        points = np.concatenate([fg, bg])
        rc = view.voxel_to_display(points, volume.shape) if len(points) else None
        # a box alone is what the base model was trained for: the shipped click adapters leave it to it
        box_alone = len(points) == 0 and loaded.shipped and not self.profile.inference.boxes_with_shipped_adapters
        if box_alone:
            predictor = self.predictor(self.bare_model())
        labels = np.concatenate([np.ones(len(fg)), np.zeros(len(bg))]).astype(np.int64)
        key = None if state_key is None else (*state_key, axis, k)
        feed = key and self.feeds_logits(loaded) and not box_alone
        previous = self.clients.get(key, loaded.name) if feed else None
        image_k = view.stack(volume.array, k, predictor.model.depth_slices)  # k-1..k+1 for `depth`
        first = predictor.predict(image_k, win, view.spacing, rc, labels if len(points) else None, box, previous)
        if key is not None:
            self.clients.put(key, loaded.name, first.low_res_logits)

        label = np.zeros(volume.shape, dtype=np.uint8, order="F")  # the order label files store
        results: dict[int, SliceResult] = {k: first}
        if three_d and first.mask.any():
            bounds = (0, volume.shape[axis] - 1)
            if prompts.roi is not None and prompts.roi.hi[axis] > prompts.roi.lo[axis]:
                # a 3D ROI bounds the propagation; a flat box drawn on one slice only seeds it
                bounds = (prompts.roi.lo[axis], prompts.roi.hi[axis])

            propagator = predictor
            if loaded.shipped and not self.profile.inference.propagate_with_shipped_adapters:
                propagator = self.predictor(self.bare_model())

            def predict(j: int, box_rc: tuple[int, int, int, int], logits: Tensor | None) -> SliceResult:
                return propagator.predict(
                    view.stack(volume.array, j, propagator.model.depth_slices), win, view.spacing,
                    box_rc=box_rc, mask_logits=logits,
                )

            results = propagate_box(
                predict, lambda j: view.slice(volume.array, j), k, first, bounds, self.propagation_settings()
            )
        index = [slice(None)] * 3
        for j, result in results.items():
            index[axis] = j
            label[tuple(index)] = view.from_display(result.mask)
        total_ms = (time.perf_counter() - begin) * 1e3
        params = {
            "model_version": loaded.name,
            "adapter_design": loaded.model.adapter_settings.design,
            "slice": k,
            "embedding_cached": first.embedding_cached,
            "refined_with_previous_logits": previous is not None,
            "predicted_iou": round(first.iou, 4),
            "window": win.key(),
            "latency_ms": {
                "encoder": round(sum(r.timings_ms["encoder"] for r in results.values()), 1),
                "decoder": round(sum(r.timings_ms["decoder"] for r in results.values()), 1),
                "total": round(total_ms, 1),
            },
        }
        if three_d:
            covered = sorted(j for j, r in results.items() if r.mask.any())
            params["slice_range"] = [covered[0], covered[-1]] if covered else []
            params["slices_segmented"] = len(covered)
            params["latency_ms"]["per_slice"] = round(total_ms / max(len(results), 1), 1)
        return SegmentationOutput(label, params)

    def segment_auto(self, volume: Volume, window: str | None = None, axis: int = 2) -> SegmentationOutput:
        """Prompt-free multi-label segmentation of every slice (values 1..len(labels))."""
        begin = time.perf_counter()
        loaded = self.current()
        if not loaded.model.labels:
            raise PromptError(f"profile '{self.profile.name}' has no labels, so it has no automatic mode")
        if not loaded.model.prompt_free_head_trained and self.bare_model().model.prompt_free_head_trained:
            # adapters that change the encoder (shipped, or a round started from them) and train no head:
            # the head shipped for the base model's embedding answers on it
            loaded = self.bare_model()
        if not loaded.model.prompt_free_head_trained:
            raise PromptError(
                f"the automatic head of '{self.profile.name}' has not been trained yet for labels "
                f"{list(loaded.model.labels)}: submit labels and run a training round first"
            )
        predictor = self.predictor(loaded)
        view = SliceView.from_affine(volume.affine, axis)
        win = self.window(volume, window)
        label = np.zeros(volume.shape, dtype=np.uint8, order="F")  # the order label files store
        index = [slice(None)] * 3
        depth = loaded.model.depth_slices
        for k in range(volume.shape[axis]):
            index[axis] = k
            labels_k, _ = predictor.predict_auto(view.stack(volume.array, k, depth), win, view.spacing)
            label[tuple(index)] = view.from_display(labels_k)
        return SegmentationOutput(
            label,
            {
                "model_version": loaded.name,
                "adapter_design": loaded.model.adapter_settings.design,
                "head": loaded.model.adapter_settings.head,
                "labels": {name: i + 1 for i, name in enumerate(loaded.model.labels)},
                "latency_ms": {"total": round((time.perf_counter() - begin) * 1e3, 1)},
            },
        )

    def uncertainty(self, volume: Volume, slices: int = 6, axis: int = 2) -> dict:
        """How unsure the prompt-free head is about a volume: mean normalised entropy of its per-pixel
        class probabilities over evenly spaced slices (0 = certain, 1 = uniform)."""
        loaded = self.current()
        if not loaded.model.prompt_free_head_trained:
            raise PromptError(f"the automatic head of '{self.profile.name}' has not been trained yet")
        predictor = self.predictor(loaded)
        view = SliceView.from_affine(volume.affine, axis)
        win = self.window(volume)
        picks = np.unique(np.linspace(0, volume.shape[axis] - 1, slices).round().astype(int))
        values = []
        for k in picks:
            stack = view.stack(volume.array, int(k), loaded.model.depth_slices)
            probs = predictor.auto_probabilities(stack, win, view.spacing)
            entropy = -(probs * torch.log(probs.clamp_min(1e-8))).sum(0) / np.log(probs.shape[0])
            values.append(float(entropy.mean()))
        return {"score": float(np.mean(values)), "model_version": loaded.name, "slices": [int(k) for k in picks]}


def _clone_model(model: AdaptedSam) -> AdaptedSam:
    """A copy whose adaptable parameters are independent and whose frozen tensors are shared."""
    memo: dict[int, object] = {id(b): b for b in model.buffers()}
    for name, p in model.named_parameters():
        if part_of(name) not in model.trainable_parts:
            memo[id(p)] = p
    return copy.deepcopy(model, memo)
