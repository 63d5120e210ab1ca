"""SlicePredictor: box and/or clicks and/or previous logits on one 2D slice -> mask + logits."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .cache import EmbeddingCache, content_key
from .click_features import TokenSimilarity, repair_with_features
from .clicks import (
    Box,
    boxes_at_scales,
    correction_query,
    deep_negative,
    gets_a_click_wrong,
    local_correction,
    pick_scale,
    recentred_boxes,
    respect_clicks,
    side_contact,
    stability,
    undecided_near_wrong_clicks,
)
from .config import InferenceSettings, PreprocessSettings
from .model import AdaptedSam, Decoded, lone_click
from .preprocess import IntensityWindow, LetterboxFrame, model_input
from .prompts import mask_box


@dataclass(frozen=True)
class LoadedModel:
    """One immutable model version; requests hold on to the snapshot they started with."""

    model: AdaptedSam
    version: int  # published adapter version; 0: the base model or the profile's shipped adapters
    encoder_fingerprint: str  # changes only when the encoder's adapters change
    shipped: bool = False  # the profile's shipped adapters (version 0)
    # the encoder runtime (lib/serving/runtimes.py) for inference; None: the model's own torch encode
    encode: Callable[[Tensor], Tensor] | None = field(default=None, compare=False, repr=False)
    # the decoder runtime (lib/serving/decoder_runtime.py), AdaptedSam.decode's signature; None: the model's
    decode: Callable[..., Decoded] | None = field(default=None, compare=False, repr=False)

    def decoder(self) -> Callable[..., Decoded]:
        """What decodes prompts for inference: the runtime, else the model's own ``decode``."""
        return self.decode or self.model.decode

    @property
    def name(self) -> str:
        """What the answers report as ``model_version``: ``vN``, ``shipped`` or ``base``."""
        return f"v{self.version}" if self.version else ("shipped" if self.shipped else "base")


@dataclass(frozen=True)
class EmbeddedSlice:
    """A slice as the served model sees it: the image, its window and spacing (a lone click's scale
    candidates may encode it again for the base model), the served embedding and the letterbox frame."""

    image: np.ndarray
    window: IntensityWindow
    spacing: tuple[float, float]
    embedding: Tensor
    frame: LetterboxFrame


def on_low_res(frame: LetterboxFrame, mask: np.ndarray, like: Tensor) -> Tensor:
    """A slice mask (rows, cols) as a bool tensor on the low-res grid and device of ``like`` (.., h, w)."""
    low = frame.labels_to_low_res(mask.astype(np.int64), tuple(like.shape[-2:])) > 0
    return torch.as_tensor(low, device=like.device)


@dataclass
class SliceResult:
    mask: np.ndarray  # bool (rows, cols) in display orientation
    low_res_logits: Tensor  # (1, 1, h, w), CPU, for the next round
    iou: float
    embedding_cached: bool
    timings_ms: dict[str, float] = field(default_factory=dict)


class SlicePredictor:
    """Runs the adapted model on display-oriented 2D slices, caching image embeddings."""

    def __init__(
        self,
        loaded: LoadedModel,
        cache: EmbeddingCache,
        preprocessing: PreprocessSettings,
        inference: InferenceSettings,
        device: torch.device | str = "cpu",
        bare: Callable[[], LoadedModel] | None = None,
        lone: Callable[[], LoadedModel | None] | None = None,
    ) -> None:
        """``bare``: the bare base model (built on first use), whose answers to boxes alone are scale
        candidates for a lone click when it shares the served model's embedding. ``lone``: the lone-click
        adapters (None when there are none), whose answer to a lone click is one more candidate."""
        self.loaded = loaded
        self.bare = bare
        self.lone = lone
        self.model = loaded.model
        self.cache = cache
        self.preprocessing = preprocessing
        self.inference = inference
        self.device = torch.device(device)

    def frame(self, image: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> LetterboxFrame:
        """The letterbox of a slice (rows, cols) or of a slice stack's slices (D, rows, cols)."""
        return LetterboxFrame.fit(image.shape[-2:], self.model.img_size, spacing)

    def embedding_key(self, image: np.ndarray, window: IntensityWindow, frame: LetterboxFrame) -> str:
        """The embedding cache key of a raw-intensity slice (its content plus what changes the encoding)."""
        return content_key(image, window.key(), self.preprocessing.per_slice_minmax, frame, self.model.backbone_name)

    def is_embedded(
        self, image: np.ndarray, window: IntensityWindow, spacing: tuple[float, float] = (1.0, 1.0)
    ) -> bool:
        """Whether the slice's embedding is cached for this model's encoder (computes nothing)."""
        key = self.embedding_key(image, window, self.frame(image, spacing))
        return self.cache.contains(self.loaded.encoder_fingerprint, key)

    def embed(
        self, image: np.ndarray, window: IntensityWindow, spacing: tuple[float, float] = (1.0, 1.0)
    ) -> tuple[Tensor, LetterboxFrame, bool, float]:
        """Embedding of a raw-intensity slice, or of a (D, rows, cols) stack's middle slice for a ``depth``
        model (:meth:`SliceView.stack`): (embedding, frame, was_cached, milliseconds)."""
        frame = self.frame(image, spacing)
        key = self.embedding_key(image, window, frame)

        def compute() -> Tensor:
            x = model_input(image, window, self.preprocessing.per_slice_minmax, frame)
            with torch.inference_mode():
                return (self.loaded.encode or self.model.encode)(x.to(self.device))

        start = time.perf_counter()
        embedding, cached = self.cache.get_or_compute(self.loaded.encoder_fingerprint, key, compute)
        return embedding, frame, cached, (time.perf_counter() - start) * 1e3

    def predict(
        self,
        image: np.ndarray,
        window: IntensityWindow,
        spacing: tuple[float, float] = (1.0, 1.0),
        points_rc: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box_rc: tuple[int, int, int, int] | None = None,
        mask_logits: Tensor | None = None,
    ) -> SliceResult:
        """Segment one object. ``points_rc``: (N, 2) display (row, col); ``point_labels``: 1 fg / 0 bg;
        ``box_rc``: inclusive (r0, c0, r1, c1); ``mask_logits``: previous low-res logits (1, 1, h, w)."""
        n_points = 0 if points_rc is None else len(points_rc)
        if n_points == 0 and box_rc is None and mask_logits is None:
            raise ValueError("predict needs at least one of: points, box, previous logits")
        embedding, frame, cached, enc_ms = self.embed(image, window, spacing)
        start = time.perf_counter()
        points = boxes = None
        fg = bg = np.zeros((0, 2), dtype=np.int64)
        if n_points:
            labels_np = np.asarray(point_labels).reshape(-1)
            rc_np = np.asarray(points_rc, dtype=np.int64).reshape(-1, 2)
            fg, bg = rc_np[labels_np == 1], rc_np[labels_np == 0]
            points = self._points(frame, rc_np, labels_np)
        if box_rc is not None:
            boxes = torch.as_tensor(frame.box_to_model(*box_rc), dtype=torch.float32, device=self.device)[None]
        if mask_logits is not None:
            mask_logits = mask_logits.to(self.device, torch.float32)
        mode = self.inference.multimask_for_single_click
        alone = lone_click(points, boxes, mask_logits) and len(fg) == 1
        multimask = mode == "always" or (mode == "auto" and self.model.trained_multimask_single_click)
        scale_ms = 0.0  # encoding the base model's embedding for scale candidates: encoder time
        embedded = EmbeddedSlice(image, window, spacing, embedding, frame)
        if alone and self.inference.lone_click_scales_mm:
            mask, low_res, iou, scale_ms = self._lone_click_answer(embedded, fg[0], multimask)
        elif n_points and mask_logits is not None and self.inference.local_corrections:
            mask, low_res, iou, scale_ms = self._correction(embedded, rc_np, labels_np, boxes, mask_logits, multimask)
        else:
            mask, low_res, iou = self._decode(embedding, frame, points, boxes, mask_logits, multimask and alone)
        if n_points:
            if self.inference.respect_clicks:
                radius = self._click_radius(frame)
                if mask_logits is not None and self.inference.feature_repair:
                    similarity = TokenSimilarity(embedding, frame, self.model.img_size, self.model.low_res_size)
                    settings = self.inference
                    mask = repair_with_features(mask, fg, bg, similarity, radius, settings.feature_repair_reach,
                                                settings.feature_repair_margin, settings.local_max_removal)
                else:
                    mask = respect_clicks(mask, fg, bg, radius)
            low_res = self._fed_back(frame, low_res, mask)
        dec_ms = (time.perf_counter() - start) * 1e3 - scale_ms
        return SliceResult(
            mask=mask,
            low_res_logits=low_res.detach().cpu(),
            iou=iou,
            embedding_cached=cached and scale_ms == 0.0,
            timings_ms={"encoder": (0.0 if cached else enc_ms) + scale_ms, "decoder": dec_ms},
        )

    def _click_radius(self, frame: LetterboxFrame) -> float:
        """A click's repair radius in slice pixels: one low-res logit's extent, at least 1.5."""
        return max(1.5, self.model.img_size / self.model.low_res_size[0] / min(frame.scale_r, frame.scale_c))

    def _points(self, frame: LetterboxFrame, rc: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor]:
        """Clicks (N, 2) display (row, col) with labels 1 fg / 0 bg as the decoder's point prompt."""
        xy = torch.as_tensor(frame.points_to_model(rc), dtype=torch.float32, device=self.device)
        return xy[None], torch.as_tensor(np.asarray(labels).reshape(1, -1), dtype=torch.int64, device=self.device)

    def _decode(
        self,
        embedding: Tensor,
        frame: LetterboxFrame,
        points: tuple[Tensor, Tensor] | None,
        boxes: Tensor | None,
        mask_logits: Tensor | None,
        multimask: bool,
    ) -> tuple[np.ndarray, Tensor, float]:
        """The served model's answer: (slice mask, low-res logits, predicted IoU)."""
        with torch.inference_mode():
            out = self.loaded.decoder()(
                embedding, points=points, boxes=boxes, mask_logits=mask_logits, multimask=multimask
            ).kept()
            mask = (frame.logits_to_slice(out.low_res_logits)[0, 0] > 0).cpu().numpy()
        return mask, out.low_res_logits, float(out.iou[0, 0])

    def _correction(
        self,
        embedded: EmbeddedSlice,
        clicks_rc: np.ndarray,
        labels: np.ndarray,
        boxes: Tensor | None,
        mask_logits: Tensor,
        multimask: bool,
    ) -> tuple[np.ndarray, Tensor, float, float]:
        """Clicks with the previous answer fed back: the model is asked about the part of the previous
        answer the clicks it got wrong are on (:func:`correction_query`: a query is about one object), the
        answer changes only where those clicks ask (:func:`local_correction`), and a foreground click apart
        from the answer is answered alone at its own scale and added as a new part. A first correction that
        is a negative click deep inside the answer (:func:`deep_negative`, ``scale_recheck_depth``) chooses the
        lone click's scale again among the answers that honour both clicks, and takes it when its area
        differs from the answer's by 2x or more. (mask, low-res logits, IoU, milliseconds spent encoding the
        base model's embedding)."""
        settings, frame = self.inference, embedded.frame
        with torch.inference_mode():
            previous = (frame.logits_to_slice(mask_logits)[0, 0] > 0).cpu().numpy()
        gap = settings.new_part_gap if settings.lone_click_scales_mm else 0.0
        fg, bg = clicks_rc[labels == 1], clicks_rc[labels == 0]
        query = correction_query(previous, fg, bg, gap, settings.part_corrections, 2 * self._click_radius(frame))
        # a new part: the click answered alone at its own object's scale, a piece no larger than
        # new_part_max_ratio x the answer's largest (none: respect_clicks marks the click itself)
        limit = settings.new_part_max_ratio * query.largest_part or np.inf
        encode_ms, iou, parts = 0.0, 0.0, []
        for click in fg[query.apart]:
            part, _, part_iou, ms = self._lone_click_answer(embedded, click, multimask, limit)
            encode_ms += ms
            parts.append((part, part_iou))
        asked = np.zeros(len(labels), dtype=bool)  # the clicks the model is asked, in the request's order
        asked[labels == 1], asked[labels == 0] = query.foreground, query.background
        whole = not query.apart.any() and query.other_parts is None
        mask, low_res = previous, mask_logits
        if asked.any() or boxes is not None:
            prompt = mask_logits
            if query.other_parts is not None:  # the parts not asked about: background in the prompt
                prompt = torch.where(on_low_res(frame, query.other_parts, mask_logits),
                                     mask_logits.clamp(max=-max(settings.repair_logit, 1.0)), mask_logits)
            # near the clicks it got wrong the previous answer is no longer insisted on
            near = undecided_near_wrong_clicks(previous, clicks_rc[asked], labels[asked],
                                               settings.correction_prompt_release)
            if near.any():
                prompt = torch.where(on_low_res(frame, near, prompt), torch.zeros_like(prompt), prompt)
            points = self._points(frame, clicks_rc[asked], labels[asked]) if asked.any() else None
            new, low_res, iou = self._decode(embedded.embedding, frame, points, boxes, prompt, False)
            mask = local_correction(previous, new, fg[query.foreground], bg[query.background],
                                    settings.local_total_share, max_removal=settings.local_max_removal,
                                    whole_new=whole)
        mask = mask.copy()
        for part, part_iou in parts:
            mask |= part
            iou = iou or part_iou
        if (len(fg), len(bg)) == (1, 1) and whole and settings.lone_click_scales_mm and deep_negative(
            mask, fg, bg, settings.scale_recheck_depth
        ):
            again, again_low_res, again_iou, ms = self._lone_click_answer(embedded, fg[0], multimask, honour=(fg, bg))
            encode_ms += ms
            if again.any() and not 0.5 < again.sum() / mask.sum() < 2:
                return again, again_low_res, again_iou, encode_ms
        # the next round is fed the previous logits where the previous answer was kept
        differs = on_low_res(frame, mask, low_res) != (low_res[0, 0] > 0)
        return mask, torch.where(differs, mask_logits.to(low_res.dtype), low_res), iou, encode_ms

    def _fed_back(self, frame: LetterboxFrame, low_res: Tensor, shown: np.ndarray) -> Tensor:
        """The logits fed to the next round, made to give the answer the user saw: where ``low_res`` would
        give another one (the repairs of :func:`respect_clicks`, the seams of a local correction), they are
        set to ``+repair_logit`` (shown, not in the logits) or ``-repair_logit`` (in the logits, not shown),
        so the next answer and the next correction's idea of the previous answer start from it."""
        value = self.inference.repair_logit
        if value == 0:
            return low_res
        with torch.inference_mode():
            own = (frame.logits_to_slice(low_res)[0, 0] > 0).cpu().numpy()
        if np.array_equal(own, shown):
            return low_res
        # +1 shown only, -1 in the logits only, mapped to the low-res frame in one pass
        change = frame.labels_to_low_res(shown.astype(np.int64) - own, tuple(low_res.shape[-2:]))
        change = torch.as_tensor(change, dtype=low_res.dtype, device=low_res.device)
        return torch.where(change != 0, value * change, low_res)

    def _scale_models(self, embedded: EmbeddedSlice) -> tuple[LoadedModel | None, LoadedModel | None, Tensor, bool]:
        """The bare model and the lone-click adapters of a lone click's scale choice (None: not there, or
        not on the embedding they would answer on), that embedding (the served one when they share it), and
        whether it was encoded now.
        Shipped adapters that change the encoder keep the bare model's and the lone-click adapters' answers
        on the base model's own embedding (one more encoder pass on a slice's first click, unless cached);
        adapters from training rounds answer the click in each box themselves."""
        bare = self.bare() if self.bare is not None else None
        lone = self.lone() if self.lone is not None else None
        on, fingerprint, encoded = embedded.embedding, self.loaded.encoder_fingerprint, False
        if bare is not None and bare.encoder_fingerprint != fingerprint:
            if not self.loaded.shipped:
                return None, None, embedded.embedding, False
            base = SlicePredictor(bare, self.cache, self.preprocessing, self.inference, self.device)
            on, _, cached, _ = base.embed(embedded.image, embedded.window, embedded.spacing)
            fingerprint, encoded = bare.encoder_fingerprint, not cached
        return bare, lone if lone is not None and lone.encoder_fingerprint == fingerprint else None, on, encoded

    def _lone_click_answer(
        self,
        embedded: EmbeddedSlice,
        click_rc: np.ndarray,
        multimask: bool,
        max_area: float = np.inf,
        honour: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, Tensor, float, float]:
        """A foreground click answered alone, at its object's scale (:meth:`_scaled_click`; no answer over
        ``max_area`` pixels, none that gets a click of ``honour`` wrong): (mask, low-res logits, IoU,
        milliseconds spent encoding the base model's embedding for the candidates)."""
        # built outside inference mode; `on` is the embedding they answer on (its encoding is encoder time)
        start = time.perf_counter()
        bare, lone, on, encoded = self._scale_models(embedded)
        encode_ms = (time.perf_counter() - start) * 1e3 if encoded else 0.0
        embedding, frame = embedded.embedding, embedded.frame
        points = self._points(frame, np.asarray(click_rc).reshape(1, 2), np.ones(1))
        with torch.inference_mode():
            out = self.loaded.decoder()(embedding, points=points, multimask=multimask).kept()
            logits = frame.logits_to_slice(out.low_res_logits)[0, 0].cpu().numpy()
            mask, low_res, iou = self._scaled_click(
                embedding, on, frame, points, click_rc, embedded.spacing, bare, lone,
                (logits, out.low_res_logits, float(out.iou[0, 0])), max_area, honour,
            )
        return mask, low_res, iou, encode_ms

    def _scaled_click(
        self,
        embedding: Tensor,
        base_embedding: Tensor,
        frame: LetterboxFrame,
        points: tuple[Tensor, Tensor],
        click_rc: np.ndarray,
        spacing: tuple[float, float],
        bare: LoadedModel | None,
        lone: LoadedModel | None,
        alone: tuple[np.ndarray, Tensor, float],
        max_area: float = np.inf,
        honour: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, Tensor, float]:
        """A lone click at its object's scale. Candidates: the click alone (``alone``: slice logits,
        low-res logits, IoU), the lone-click adapters' answer to it when there are some, and the answers
        to square boxes of ``lone_click_scales_mm`` around it — ``bare``'s (the bare base model's) to each
        box alone, or, when there is no bare model, the served model's to the click inside each box — and,
        with ``lone_click_recentre``, to those boxes moved onto their answers (:func:`recentred_boxes`; these
        only replace the answer chosen without them, and only when at most ``lone_click_recentre_growth``
        times its area: a moved box corrects a position, not a scale). The
        served model answers on ``embedding``, the bare model and the lone-click adapters on
        ``base_embedding`` (the same one unless shipped adapters changed the encoder). Answers that run
        into their box's sides (a fragment of something larger) are dropped; the most stable answer
        (:func:`stability`) wins, an answer to the click itself with a margin / sqrt(its area in pixels):
        a small mask's stability is noisier. Answers over ``max_area`` pixels are no candidates, nor are
        those that get a click of ``honour`` ((foreground, background) clicks) wrong (none left: an empty
        mask). Decoder only."""
        settings = self.inference
        shape = alone[0].shape
        clicked = [(alone, settings.lone_click_alone_margin)]  # answers to the click itself, with their margins
        if lone is not None:
            out = lone.decoder()(base_embedding, points=points).kept()
            answer = (frame.logits_to_slice(out.low_res_logits)[0, 0].cpu().numpy(), out.low_res_logits,
                      float(out.iou[0, 0]))
            clicked.append((answer, settings.lone_click_adapter_margin))
        click = (int(click_rc[0]), int(click_rc[1]))
        boxes = boxes_at_scales(click, spacing, shape, settings.lone_click_scales_mm)

        def answers(asked: list[Box]) -> tuple[np.ndarray, Tensor, Tensor]:
            """Slice logits, low-res logits and IoUs of the answers to ``asked``."""
            model_boxes = torch.as_tensor(
                np.stack([frame.box_to_model(*b) for b in asked]), dtype=torch.float32, device=self.device
            )
            if bare is not None:
                out = bare.decoder()(base_embedding, boxes=model_boxes)
            else:
                n = len(asked)
                xy, labels = points
                out = self.loaded.decoder()(
                    embedding, points=(xy.expand(n, -1, -1), labels.expand(n, -1)), boxes=model_boxes
                )
            return frame.logits_to_slice(out.low_res_logits)[:, 0].cpu().numpy(), out.low_res_logits, out.iou

        logits, low_res_all, ious = answers(boxes)
        held = click if settings.lone_click_recentre else None
        i = pick_scale([(answer[0], margin) for answer, margin in clicked], logits, boxes,
                       settings.lone_click_max_contact, max_area=max_area, honour=honour, held=held)
        if i < 0:  # every answer over max_area or wrong at a click of honour
            return np.zeros(shape, dtype=bool), alone[1], 0.0
        if i < len(clicked):
            (chosen, low_res, iou), margin = clicked[i]
        else:
            i -= len(clicked)
            chosen, low_res, iou, margin = logits[i], low_res_all[i : i + 1], float(ious[i, 0]), 0.0
        if settings.lone_click_refit > 0 and bare is not None:
            refit = self._refit(frame, base_embedding, bare, chosen, click, honour, max_area)
            if refit is not None:
                return refit
        moved = recentred_boxes(logits, boxes, shape) if settings.lone_click_recentre else []
        if moved:  # one more decoder pass: the boxes moved onto their answers, at most so much larger
            more_logits, more_low_res, more_ious = answers(moved)
            cap = min(max_area, settings.lone_click_recentre_growth * (chosen > 0).sum())
            j = pick_scale([(chosen, margin)], more_logits, moved, settings.lone_click_max_contact,
                           max_area=cap, honour=honour, held=held)
            if j > 0:
                return more_logits[j - 1] > 0, more_low_res[j - 1 : j], float(more_ious[j - 1, 0])
        return chosen > 0, low_res, iou

    def _refit(
        self,
        frame: LetterboxFrame,
        base_embedding: Tensor,
        bare: LoadedModel,
        chosen: np.ndarray,
        click: tuple[int, int],
        honour: tuple[np.ndarray, np.ndarray] | None,
        max_area: float = np.inf,
    ) -> tuple[np.ndarray, Tensor, float] | None:
        """The bare model's answer to the tight box of a lone click's chosen answer (``chosen``: slice
        logits), pushed out by 2 model pixels: SAM answers a tight box best. It is taken (mask, low-res
        logits, IoU) when it holds the click, gets the clicks of ``honour`` right, runs into no more than
        ``lone_click_max_contact`` of the box's sides, holds at most ``max_area`` pixels, is at least as
        stable as the chosen answer and overlaps it by IoU >= ``lone_click_refit`` (a refinement, not another
        object); else None."""
        settings, answer = self.inference, chosen > 0
        box = mask_box(answer, (2.0 / frame.scale_r, 2.0 / frame.scale_c))
        if box is None:
            return None
        model_box = torch.as_tensor(frame.box_to_model(*box), dtype=torch.float32, device=self.device)[None]
        out = bare.decoder()(base_embedding, boxes=model_box)
        logits = frame.logits_to_slice(out.low_res_logits)[0, 0].cpu().numpy()
        mask = logits > 0
        if (not mask[click] or side_contact(mask, box) > settings.lone_click_max_contact or mask.sum() > max_area
                or gets_a_click_wrong(mask, honour)):
            return None
        iou = (mask & answer).sum() / max(1, (mask | answer).sum())
        if iou < settings.lone_click_refit or stability(logits) < stability(chosen):
            return None
        return mask, out.low_res_logits, float(out.iou[0, 0])

    def auto_probabilities(
        self, image: np.ndarray, window: IntensityWindow, spacing: tuple[float, float] = (1.0, 1.0)
    ) -> Tensor:
        """Softmax of the prompt-free head (1 + labels, h, w) over the slice's valid low-res region."""
        embedding, frame, _, _ = self.embed(image, window, spacing)
        rows, cols = frame.low_res_extent(self.model.low_res_size)
        with torch.inference_mode():
            return self.model.auto_segment(embedding)[0, :, :rows, :cols].softmax(0).cpu()

    def predict_auto(
        self, image: np.ndarray, window: IntensityWindow, spacing: tuple[float, float] = (1.0, 1.0)
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Prompt-free label map (rows, cols) with values 0 (background) .. len(labels)."""
        embedding, frame, cached, enc_ms = self.embed(image, window, spacing)
        start = time.perf_counter()
        with torch.inference_mode():
            logits = frame.logits_to_slice(self.model.auto_segment(embedding))
            labels = logits[0].argmax(dim=0).to(torch.uint8).cpu().numpy()
        return labels, {"encoder": 0.0 if cached else enc_ms, "decoder": (time.perf_counter() - start) * 1e3}
