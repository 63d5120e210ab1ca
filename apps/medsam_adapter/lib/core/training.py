"""Fine-tune adapters and heads from submitted labels with a simulated annotator (plain PyTorch).

Per (slice, object): an initial prompt (a box pushed outward by a random margin, or one interior
click), then rounds where the next click lands in the largest error region with the previous low-res
logits fed back as the mask prompt, then mask-only rounds. Loss: Dice + BCE (MONAI's) plus MSE between
predicted and real IoU. A single click is ambiguous (a part or the whole?): as in SAM, it gets three
masks and only the best one is trained, and inference keeps the one with the highest predicted IoU.
The prompt-free head learns the same labels (Dice + CE).
With served answers (:mod:`.served_session`) the annotator sees what inference shows instead of the
trained model's own answers: the bare model's answer to a box alone, a lone click at its scale, local
corrections; the adapter then learns to refine those, and the first answer is not trained.
Everything happens in the decoder's low-res frame; when the encoder's adapters are not trained, image
embeddings are computed once and reused (the CPU default).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from scipy import ndimage
from torch import Tensor

from .adapters import set_checkpointing
from .annotator import dice, interior_point, jittered_box, largest_error_click, random_interior_point
from .cache import EmbeddingCache, content_key
from .config import PreprocessSettings
from .encoder_stages import encode_back, encode_front, freeze_front
from .model import AdaptedSam, Decoded, lone_click
from .orientation import SliceView
from .preprocess import LetterboxFrame, choose_window, model_input, normalize_slice
from .served_session import LowResGeometry, ServedAnswers, low_res_to_model
from .volume import Volume, load_volume

logger = logging.getLogger(__name__)


class TrainingDataError(ValueError):
    """The submitted labels cannot be used for training (wrong shape or geometry, empty, unreadable)."""


@dataclass(frozen=True)
class TrainSettings:
    max_epochs: int = 20
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 4
    steps_per_epoch: int = 0  # 0: one pass over the training objects
    click_rounds: int = 3
    mask_only_rounds: int = 1
    box_probability: float = 0.5
    box_jitter: int = 5  # low-res pixels (= 5 px at 256, 20 px at 1024)
    val_fraction: float = 0.2
    seed: int = 0
    patience: int = 5
    max_slices_per_volume: int = 24
    min_object_pixels: int = 16
    max_val_objects: int = 48
    train_encoder_adapters: bool = False
    # with train_encoder_adapters: the first N encoder stages run once per slice and their output is kept;
    # only the later stages' adapters train (a fraction of the step's cost on a CPU); 0: the whole encoder
    encoder_front_stages: int = 0
    # recompute the encoder blocks' activations in the backward pass instead of keeping them (less memory,
    # more time, same result): "auto" = for the depth design, whose three slices per sample triple them
    encoder_checkpointing: str = "auto"  # auto | on | off
    # the trained encoder's forward and backward under bfloat16 autocast (weights, optimizer, decoder and
    # losses stay fp32): faster on CPUs with AVX-512 bf16 and on GPUs; validation and inference stay fp32
    encoder_precision: str = "fp32"  # fp32 | bf16
    train_prompt_free_head: bool = True
    multimask_single_click: bool = False  # three masks for a lone click, the best one trained (SAM)
    balance_object_sizes: bool = False  # draw objects evenly over size (log2 area) instead of uniformly
    val_clicks: int = 3  # validation Dice after this many clicks (with the box Dice: the score)
    selection_metric: str = "score"  # the validation metric that picks the best epoch (e.g. click1_dice)
    cosine_schedule: bool = False  # learning rate decays to 0 over max_epochs (cosine)
    negative_click_share: float = 0.0  # how often the trained round is one ending in a negative click
    # how often a session started by a click trains its first answer, the lone click against the whole
    # object (drawn uniformly otherwise: 1 / (1 + click_rounds + mask_only_rounds)); not with served answers
    lone_click_share: float = 0.0
    grad_clip_norm: float = 0.0  # clip the gradients' global norm to this (0: no clipping)
    adapter_design: str = ""  # "": the served design; another one starts from that design's fresh adapters
    head: str = ""  # "": the served prompt-free head kind; another one starts fresh


CHECKPOINTING_MODES = ("auto", "on", "off")
ENCODER_PRECISIONS = ("fp32", "bf16")


def encoder_option_problem(settings: TrainSettings) -> str | None:
    """What is wrong with the encoder training options, for a clear refusal before a round starts."""
    for name, allowed in (("encoder_checkpointing", CHECKPOINTING_MODES), ("encoder_precision", ENCODER_PRECISIONS)):
        value = getattr(settings, name)
        if value not in allowed:
            return f"train option {name!r} must be one of {list(allowed)}, got {value!r}"
    return None


def encoder_autocast(device: torch.device, precision: str) -> torch.autocast:
    """bfloat16 autocast on ``device`` for ``precision`` "bf16", a no-op context for "fp32"."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass
class LabelledVolume:
    image: Path | Volume  # a file, or a volume already in memory
    label: Path | Volume
    names: dict[int, str] = field(default_factory=dict)  # voxel value -> label name
    image_id: str = ""
    max_slices: int | None = None  # at most this many labelled slices (None: the settings' limit)


@dataclass
class SliceSample:
    source: str
    k: int
    labels: np.ndarray  # (h, w) voxel values in the low-res frame
    objects: list[np.ndarray]  # bool (h, w) masks
    head_target: np.ndarray | None  # (h, w) profile label indices, None when no known names
    model_input: Tensor | None = None  # (1, 3, S, S) or (1, D, 3, S, S) for `depth`, kept when the encoder trains
    encoder_front: Tensor | None = None  # the encoder front's output, kept when only its back trains
    embedding: Tensor | None = None  # (1, C, eh, ew), cached when it does not
    geometry: LowResGeometry | None = None  # the slice's place and pixel size in the low-res frame
    frame: LetterboxFrame | None = None  # the slice's letterbox in the model input
    slices01: np.ndarray | None = None  # (D, rows, cols) normalised slice(s) before letterboxing, when kept


@dataclass
class TrainResult:
    best_state: dict[str, Tensor] | None  # None when no epoch beat the starting model
    before: dict[str, float]
    after: dict[str, float]
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    epochs_run: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def split_volumes(volumes: Sequence[LabelledVolume], fraction: float, seed: int) -> tuple[list, list, str]:
    """Shuffled, reproducible train/validation split by volume. Returns (train, val, note)."""
    order = list(volumes)
    np.random.default_rng(seed).shuffle(order)
    if len(order) < 2 or fraction <= 0:
        return order, [], f"no validation split: {len(order)} labelled image(s), at least 2 are needed"
    n_val = min(len(order) - 1, max(1, round(len(order) * fraction)))
    return order[n_val:], order[:n_val], f"validation on {n_val} of {len(order)} labelled images"


def as_volume(item: Path | Volume) -> Volume:
    """A labelled volume's image or label, loaded when it is a file."""
    return item if isinstance(item, Volume) else load_volume(item)


def prepare_samples(
    model: AdaptedSam,
    volumes: Sequence[LabelledVolume],
    preprocessing: PreprocessSettings,
    settings: TrainSettings,
    device: torch.device,
    embeddings: EmbeddingCache | None = None,
    fingerprint: str = "",
    keep_slices: bool = False,
) -> list[SliceSample]:
    """Slices with labels -> samples in the low-res frame (embeddings cached unless the encoder trains;
    when only its back trains, the output of its front, ``encoder_front_stages``).

    ``embeddings`` (with the encoder's ``fingerprint``): take embeddings from, and put them into, that
    cache under the keys inference uses, so slices encoded once are not encoded again. ``keep_slices``:
    keep each sample's normalised slices before letterboxing (for :mod:`.sample_bank`)."""
    samples: list[SliceSample] = []
    low_res = model.low_res_size
    head_index = {name: i + 1 for i, name in enumerate(model.labels)}
    front = settings.encoder_front_stages if settings.train_encoder_adapters else 0  # stages kept, not trained
    for vol in volumes:
        image, label = as_volume(vol.image), as_volume(vol.label)
        what = vol.image_id or getattr(vol.label, "name", "label")
        if label.shape != image.shape:
            raise TrainingDataError(f"{what}: label shape {label.shape} != image shape {image.shape}")
        if not np.allclose(label.affine, image.affine, atol=1e-3):
            raise TrainingDataError(f"{what}: label geometry differs from its image")
        view = SliceView.from_affine(image.affine, 2)
        window = choose_window(image.array, preprocessing)
        values = np.asarray(label.array)
        labelled = [k for k in range(image.shape[2]) if values[:, :, k].any()]
        limit = settings.max_slices_per_volume if vol.max_slices is None else vol.max_slices
        if len(labelled) > limit:
            pick = np.linspace(0, len(labelled) - 1, limit).round().astype(int)
            labelled = [labelled[i] for i in sorted(set(pick))]
        for k in labelled:
            encoded = view.stack(image.array, k, model.depth_slices)  # slice k, or k-1..k+1 for `depth`
            frame = LetterboxFrame.fit(encoded.shape[-2:], model.img_size, view.spacing)
            lr = frame.labels_to_low_res(view.slice(values, k).astype(np.int64), low_res)
            objects = []
            for value in np.unique(lr[lr > 0]):
                components, n = ndimage.label(lr == value)
                for c in range(1, n + 1):
                    obj = components == c
                    if obj.sum() >= settings.min_object_pixels:
                        objects.append(obj)
            if not objects:
                continue
            head_target = None
            known = {v: head_index[n] for v, n in vol.names.items() if n in head_index}
            if known:
                head_target = np.zeros_like(lr)
                for v, idx in known.items():
                    head_target[lr == v] = idx
            x = model_input(encoded, window, preprocessing.per_slice_minmax, frame).to(device)
            per_model_pixel = model.img_size / low_res[0]  # model pixels per low-res pixel
            geometry = LowResGeometry(
                frame.low_res_extent(low_res), view.spacing[0] / frame.scale_r * per_model_pixel,
                per_model_pixel / frame.scale_r,
            )
            sample = SliceSample(
                vol.image_id or getattr(vol.image, "name", "image"), k, lr, objects, head_target, geometry=geometry,
                frame=frame,
            )
            if keep_slices:
                planes = encoded if encoded.ndim == 3 else encoded[None]
                sample.slices01 = np.stack([normalize_slice(p, window, preprocessing.per_slice_minmax) for p in planes])
            if settings.train_encoder_adapters and not front:
                sample.model_input = x
            else:  # the embedding, or the encoder front's output (kept in `embeddings` under its own name)
                name, compute = (
                    (f"{fingerprint}:front{front}", lambda x=x: encode_front(model, x, front))
                    if front else (fingerprint, lambda x=x: model.encode(x))
                )
                with torch.inference_mode():
                    if embeddings is not None:
                        key = content_key(encoded, window.key(), preprocessing.per_slice_minmax, frame,
                                          model.backbone_name)
                        value = embeddings.get_or_compute(name, key, compute)[0]
                    else:
                        value = compute().clone()
                if front:
                    sample.encoder_front = value
                else:
                    sample.embedding = value
            samples.append(sample)
    return samples


class AdapterTrainer:
    """Trains the unfrozen parts of an :class:`AdaptedSam` on :class:`SliceSample` lists."""

    def __init__(
        self, model: AdaptedSam, settings: TrainSettings, device: torch.device, served: ServedAnswers | None = None
    ) -> None:
        """``served``: the simulated annotator sees what inference shows (boxes alone answered by the bare
        model, a lone click at its scale, local corrections), and box answers are not trained; None: it
        sees the trained model's own answers."""
        self.model = model
        self.served = served
        self.settings = settings
        self.device = device
        self.factor = model.img_size / model.low_res_size[1]
        self.dice_each = DiceLoss(sigmoid=True, reduction="none")
        self.head_loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)

    # -- forward helpers --------------------------------------------------------------------------
    def _embed(self, samples: Sequence[SliceSample], grad: bool) -> Tensor:
        if samples[0].embedding is not None:
            return torch.cat([s.embedding for s in samples]).to(self.device)
        if samples[0].encoder_front is not None:
            front = torch.cat([s.encoder_front for s in samples]).to(self.device)
            with torch.set_grad_enabled(grad), self._encoder_autocast(grad):
                return encode_back(self.model, front, self.settings.encoder_front_stages).float()
        x = torch.cat([s.model_input for s in samples]).to(self.device)
        with torch.set_grad_enabled(grad), self._encoder_autocast(grad):
            return self.model.encode(x).float()

    def _encoder_autocast(self, grad: bool) -> torch.autocast:
        """The trained encoder's passes at the asked-for precision; validation's always fp32."""
        return encoder_autocast(self.device, self.settings.encoder_precision if grad else "fp32")

    def _points(self, clicks: list[list[tuple[int, int, int]]]) -> tuple[Tensor, Tensor]:
        coords = np.zeros((len(clicks), len(clicks[0]), 2), dtype=np.float32)
        labels = np.zeros((len(clicks), len(clicks[0])), dtype=np.int64)
        for b, item in enumerate(clicks):
            for n, (r, c, lab) in enumerate(item):
                coords[b, n] = low_res_to_model(np.array([[r, c]]), self.factor)[0]
                labels[b, n] = lab
        return torch.from_numpy(coords).to(self.device), torch.from_numpy(labels).to(self.device)

    def _box(self, boxes: list[tuple[int, int, int, int]]) -> Tensor:
        out = []
        for r0, c0, r1, c1 in boxes:
            (x0, y0), (x1, y1) = low_res_to_model(np.array([[r0, c0], [r1, c1]]), self.factor)
            out.append([x0, y0, x1, y1])
        return torch.tensor(out, dtype=torch.float32, device=self.device)

    def _decode_each(
        self, emb: Tensor, boxes: Tensor | None, prompts: Sequence[tuple[tuple[Tensor, Tensor] | None, Tensor | None]]
    ) -> tuple[Tensor, Tensor]:
        """Item ``b`` decoded with its box and ``prompts[b]``: (points, mask logits) of a batch, of which it
        takes row ``b``. SAM's decoder takes one image embedding per call (it repeats it for every
        prompt), so a batch of different slices is decoded item by item."""
        logits, ious = [], []
        for b, (points, masks) in enumerate(prompts):
            p, box, mask = self._item(b, points, boxes, masks)
            out = self.model.decode(
                emb[b : b + 1], points=p, boxes=box, mask_logits=mask, multimask=self._multimask(p, box, mask)
            )
            logits.append(out.low_res_logits)
            ious.append(out.iou)
        return torch.cat(logits), torch.cat(ious)

    @staticmethod
    def _item(
        b: int, points: tuple[Tensor, Tensor] | None, boxes: Tensor | None, masks: Tensor | None
    ) -> tuple[tuple[Tensor, Tensor] | None, Tensor | None, Tensor | None]:
        """Item ``b``'s prompts (points, box, mask logits) out of a batch's."""
        return (
            (points[0][b : b + 1], points[1][b : b + 1]) if points is not None else None,
            boxes[b : b + 1] if boxes is not None else None,
            masks[b : b + 1] if masks is not None else None,
        )

    def _multimask(self, points: tuple[Tensor, Tensor] | None, boxes: Tensor | None, masks: Tensor | None) -> bool:
        """Whether this prompt gets three masks (as :class:`SlicePredictor` decides for trained adapters)."""
        return self.settings.multimask_single_click and lone_click(points, boxes, masks)

    @staticmethod
    def _iou(logits: Tensor, gt: Tensor) -> Tensor:
        hard, target = logits > 0, gt > 0.5
        return (hard & target).flatten(2).sum(2).float() / (hard | target).flatten(2).sum(2).clamp(min=1)

    def _round_loss(self, logits: Tensor, iou_pred: Tensor, gt: Tensor) -> Tensor:
        """Dice + BCE of the best of the masks per item (one mask: that one) + IoU MSE of all masks."""
        target = gt.expand_as(logits)
        with torch.no_grad():
            iou_true = self._iou(logits, target)
        per_mask = self.dice_each(logits, target).flatten(1) + F.binary_cross_entropy_with_logits(
            logits, target, reduction="none"
        ).mean((2, 3))
        return per_mask.min(dim=1).values.mean() + F.mse_loss(iou_pred, iou_true)

    # -- training ---------------------------------------------------------------------------------
    def step_loss(self, items: list[tuple[SliceSample, np.ndarray]], rng: np.random.Generator) -> Tensor:
        """One training step's loss: the interactive sessions of ``items`` plus, when it trains, the
        prompt-free head on their slices. Each slice is encoded once for both (objects of one slice share
        it), which is most of a step's cost when the encoder's adapters train."""
        samples = list({id(sample): sample for sample, _ in items}.values())
        emb = self._embed(samples, grad=True)
        row = {id(sample): i for i, sample in enumerate(samples)}
        loss = self.interactive_loss(items, rng, emb[[row[id(sample)] for sample, _ in items]])
        if self.settings.train_prompt_free_head:
            head = self.head_step_loss(samples, emb)
            if head is not None:
                loss = loss + head
        return loss

    def interactive_loss(
        self, items: list[tuple[SliceSample, np.ndarray]], rng: np.random.Generator, embeddings: Tensor | None = None
    ) -> Tensor:
        """Simulated interactive session for a batch of objects (grouped by first prompt type).
        ``embeddings``: the items' image embeddings, one row per item (None: encoded here).

        The session runs without gradients (the annotator's clicks and the fed-back logits of earlier
        rounds) up to a randomly drawn round, and that round is trained: every round type is learnt at
        the cost of one backward pass per step. With ``negative_click_share``, each object's trained
        round is, that often, one that ends with a negative click (when its session has one): removing
        a leak is rarer than adding a miss, and is learnt too rarely otherwise.
        """
        s = self.settings
        use_box = rng.random(len(items)) < s.box_probability
        n_rounds = 1 + s.click_rounds + s.mask_only_rounds
        total, groups = torch.zeros((), device=self.device), 0
        for group in (np.flatnonzero(use_box), np.flatnonzero(~use_box)):
            if len(group) == 0:
                continue
            batch = [items[i] for i in group]
            emb = embeddings[group] if embeddings is not None else self._embed([s for s, _ in batch], grad=True)
            gt_np = np.stack([obj for _, obj in batch])
            gt = torch.from_numpy(gt_np).float()[:, None].to(self.device)
            boxed = bool(use_box[group[0]])
            boxes = self._box([jittered_box(o, rng, s.box_jitter) for o in gt_np]) if boxed else None
            clicks = [[] if boxed else [(*random_interior_point(o, rng), 1)] for o in gt_np]
            # served sessions: the first answer (a box alone: the bare model's; a lone click: chosen among
            # the bare model's scale answers and the click alone by stability) is not trained: a sharper
            # click-alone answer would win that choice more often without being better
            first = 1 if self.served is not None else 0
            trained = np.full(len(batch), int(rng.integers(first, n_rounds)))
            horizon = n_rounds if s.negative_click_share > 0 else int(trained[0]) + 1
            states: list[tuple[tuple[Tensor, Tensor] | None, Tensor | None]] = []  # (points, mask) per round
            negative = np.zeros((horizon, len(batch)), dtype=bool)  # the round's new click removes
            mask_in, pred = None, None
            for r in range(horizon):
                if 0 < r <= s.click_rounds:
                    for b in range(len(batch)):
                        click = largest_error_click(pred[b], gt_np[b])
                        clicks[b].append((click[0], click[1], int(click[2])) if click else (0, 0, -1))
                        negative[r, b] = click is not None and not click[2]
                points = self._points(clicks) if clicks[0] else None
                states.append((points, mask_in))
                if r == horizon - 1:
                    break
                with torch.no_grad():
                    logits, iou_pred = self._decode_each(emb, boxes, [(points, mask_in)] * len(batch))
                # the annotator goes on from the mask inference would show: the highest predicted IoU
                shown = Decoded(logits, iou_pred).kept().low_res_logits
                if self.served is not None:
                    shown = self._served(r, emb, boxes, batch, clicks, mask_in, shown)
                mask_in = shown
                pred = (mask_in[:, 0] > 0).cpu().numpy()
            if s.negative_click_share > 0:
                trained = trained_rounds(trained, negative, s.negative_click_share, rng)
            if not boxed and s.lone_click_share > 0 and self.served is None:
                trained[rng.random(len(batch)) < s.lone_click_share] = 0
            # each object's trained round, decoded with gradients (rounds may differ between objects)
            logits, iou_pred = self._decode_each(emb, boxes, [states[r] for r in trained])
            total = total + self._round_loss(logits, iou_pred, gt)
            groups += 1
        return total / max(groups, 1)

    def _served(
        self,
        r: int,
        emb: Tensor,
        boxes: Tensor | None,
        batch: list[tuple[SliceSample, np.ndarray]],
        clicks: list[list[tuple[int, int, int]]],
        previous: Tensor | None,
        own: Tensor,
    ) -> Tensor:
        """Round ``r``'s answers as inference shows them, from the trained model's own ``own``."""
        served = self.served
        if r == 0 and boxes is not None:
            return served.box(emb, boxes)
        out = []
        for b, (sample, _) in enumerate(batch):
            if r == 0 and sample.geometry is not None:
                r0, c0, _ = clicks[b][0]
                out.append(served.lone_click(emb[b : b + 1], own[b : b + 1], (r0, c0), sample.geometry))
            elif previous is not None:
                out.append(served.correction(previous[b : b + 1], own[b : b + 1], clicks[b]))
            else:
                out.append(own[b : b + 1])
        return torch.cat(out)

    def head_step_loss(self, samples: list[SliceSample], embeddings: Tensor | None = None) -> Tensor | None:
        """The prompt-free head's loss on ``samples`` (``embeddings``: theirs, one row each; None: encoded here)."""
        keep = [i for i, s in enumerate(samples) if s.head_target is not None]
        if not keep or self.model.prompt_free_head is None:
            return None
        samples = [samples[i] for i in keep]
        emb = embeddings[keep] if embeddings is not None else self._embed(samples, grad=True)
        target = torch.from_numpy(np.stack([s.head_target for s in samples]))[:, None].to(self.device)
        return self.head_loss(self.model.auto_segment(emb), target)

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, samples: Sequence[SliceSample], feed_logits: bool, clicks: int = 3) -> dict[str, float]:
        """Deterministic annotator on every validation object: tight-box Dice, Dice after 1 and
        ``clicks`` clicks (first at the most interior point, then into the largest error)."""
        box_d, one_d, n_d = [], [], []
        items = [(s, o) for s in samples for o in s.objects][: self.settings.max_val_objects]
        for sample, obj in items:
            emb = self._embed([sample], grad=False)
            box = self._box([jittered_box(obj, None, 0)])
            box_logits = self.served.box(emb, box) if self.served else self.model.decode(emb, boxes=box).low_res_logits
            box_d.append(dice(box_logits[0, 0].cpu().numpy() > 0, obj))
            r, c = interior_point(obj)
            session = [(r, c, 1)]
            mask_in = None
            for n in range(clicks):
                points = self._points([session])
                multimask = self._multimask(points, None, mask_in)
                out = self.model.decode(emb, points=points, mask_logits=mask_in, multimask=multimask)
                logits = out.kept().low_res_logits
                if self.served is not None:
                    logits = self._served(n, emb, None, [(sample, obj)], [session], mask_in, logits)
                pred = logits[0, 0].cpu().numpy() > 0
                if n == 0:
                    one_d.append(dice(pred, obj))
                mask_in = logits if feed_logits else None
                nxt = largest_error_click(pred, obj)
                if nxt is None:
                    break
                session.append((nxt[0], nxt[1], int(nxt[2])))
            n_d.append(dice(pred, obj))
        metrics = {
            "objects": len(items),
            "box_dice": float(np.mean(box_d)) if box_d else math.nan,
            "click1_dice": float(np.mean(one_d)) if one_d else math.nan,
            f"click{clicks}_dice": float(np.mean(n_d)) if n_d else math.nan,
        }
        head = [s for s in samples if s.head_target is not None]
        if head and self.model.prompt_free_head is not None:
            scores = []
            for s in head:
                pred = self.model.auto_segment(self._embed([s], grad=False))[0].argmax(0).cpu().numpy()
                present = [v for v in np.unique(s.head_target) if v > 0]
                scores += [dice(pred == v, s.head_target == v) for v in present]
            metrics["auto_dice"] = float(np.mean(scores)) if scores else math.nan
        metrics["score"] = float(np.nanmean([metrics["box_dice"], metrics[f"click{clicks}_dice"]]))
        return metrics

    def fit(
        self,
        train: list[SliceSample],
        val: list[SliceSample],
        feed_logits_before: bool,
        progress: Callable[[dict], None] | None = None,
    ) -> TrainResult:
        """Train with early stopping on the validation score; the starting model is epoch 0."""
        s = self.settings
        problem = encoder_option_problem(s)
        if problem:
            raise TrainingDataError(problem)
        mode = s.encoder_checkpointing
        on = s.train_encoder_adapters and (mode == "on" or (mode == "auto" and self.model.depth))
        if s.train_encoder_adapters and s.encoder_front_stages:
            freeze_front(self.model, s.encoder_front_stages)  # its kept outputs must stay exact
        set_checkpointing(self.model.image_encoder, on)
        try:
            return self._fit(train, val, feed_logits_before, progress)
        finally:
            set_checkpointing(self.model.image_encoder, False)

    def _fit(
        self,
        train: list[SliceSample],
        val: list[SliceSample],
        feed_logits_before: bool,
        progress: Callable[[dict], None] | None,
    ) -> TrainResult:
        s = self.settings
        start = time.time()
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        rng = np.random.default_rng(s.seed + rank)  # each rank draws its own batches
        torch.manual_seed(s.seed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if distributed:
            for p in params:  # identical starting point on every rank
                dist.broadcast(p.data, src=0)
        val = val if rank == 0 else []
        if not params:
            raise TrainingDataError("nothing to train: no trainable parts selected")
        optimizer = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay)
        objects = [(sample, obj) for sample in train for obj in sample.objects]
        if not objects:
            raise TrainingDataError("the submitted labels hold no object large enough to train on")
        steps = s.steps_per_epoch or math.ceil(len(objects) / s.batch_size)
        weights = object_weights([obj for _, obj in objects]) if s.balance_object_sizes else None
        schedule = (
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.max_epochs * steps)
            if s.cosine_schedule else None
        )
        before = self.evaluate(val, feed_logits_before, s.val_clicks) if val else {}
        result = TrainResult(None, before, dict(before))
        best_score = before.get(s.selection_metric, -math.inf)
        best_state = None
        stale = 0
        # the model stays in eval mode: the trained parts have no dropout or batch norm, and train mode
        # would update the frozen backbone's batch-norm statistics
        self.model.eval()
        for epoch in range(1, s.max_epochs + 1):
            losses = []
            for _ in range(steps):
                pick = rng.choice(len(objects), size=min(s.batch_size, len(objects)), replace=False, p=weights)
                batch = [objects[i] for i in pick]
                loss = self.step_loss(batch, rng)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if distributed:  # data parallel: average the gradients of all ranks
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        dist.all_reduce(p.grad)
                        p.grad /= world
                if s.grad_clip_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, s.grad_clip_norm)
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                losses.append(float(loss.detach()))
            metrics = self.evaluate(val, feed_logits=True, clicks=s.val_clicks) if val else {}
            entry = {"epoch": epoch, "loss": float(np.mean(losses)), **metrics}
            result.history.append(entry)
            result.epochs_run = epoch
            score = metrics.get(s.selection_metric, -float(np.mean(losses)))
            improved = score > best_score if val else True
            if distributed:  # rank 0 validates; every rank follows its decision
                decision = torch.tensor([float(improved)])
                dist.broadcast(decision, src=0)
                improved = bool(decision[0])
            if improved:
                best_score, stale = score, 0
                best_state = {k: v.detach().clone() for k, v in self.model.adaptable_state().items()}
                result.best_epoch = epoch
                if val:
                    result.after = metrics
            else:
                stale += 1
            logger.info("epoch %d/%d %s", epoch, s.max_epochs, entry)
            if progress:
                progress(
                    {**entry, "total_epochs": s.max_epochs, "best_metric": best_score, "best_epoch": result.best_epoch}
                )
            if (val or distributed) and stale >= s.patience:
                result.notes.append(f"early stop after epoch {epoch}: no improvement for {s.patience} epochs")
                break
        result.best_state = best_state
        result.seconds = time.time() - start
        if val and best_state is None:
            result.notes.append("no epoch beat the starting model on validation")
        return result


def trained_rounds(
    drawn: np.ndarray, negative: np.ndarray, share: float, rng: np.random.Generator
) -> np.ndarray:
    """Each object's trained round: the drawn one, or with probability ``share`` one of the rounds whose
    new click is negative (``negative[round, object]``) when the object's session has any."""
    out = np.array(drawn, copy=True)
    for b in range(negative.shape[1]):
        removing = np.flatnonzero(negative[:, b])
        if len(removing) and rng.random() < share:
            out[b] = int(rng.choice(removing))
    return out


def object_weights(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Sampling probabilities that give every size class (whole powers of two of the area) the same
    share, so the few small lesions are drawn as often as the many large organ cross-sections."""
    size_class = np.floor(np.log2([max(int(m.sum()), 1) for m in masks])).astype(int)
    _, inverse, counts = np.unique(size_class, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse]
    return weights / weights.sum()


def run_summary(result: TrainResult, model: AdaptedSam, device: torch.device, started: float,
                embedding_seconds: float) -> dict:
    """What a training run cost and reached: epochs, parameters, wall time, peak memory, machine."""
    import resource

    counts = model.parameter_counts()
    return {
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "trainable_parameters": counts["trainable"],
        "total_parameters": counts["total"],
        "embedding_seconds": round(embedding_seconds, 1),
        "training_seconds": round(result.seconds, 1),
        "wall_seconds": round(time.time() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "notes": result.notes,
    }


def clone_for_training(model: AdaptedSam) -> AdaptedSam:
    """An independent copy (the served model is never trained in place)."""
    return copy.deepcopy(model)
