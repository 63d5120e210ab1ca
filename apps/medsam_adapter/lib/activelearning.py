"""Active learning: an uncertainty score from the model itself, and the strategy that uses it."""

from __future__ import annotations

import logging
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from lib.core.engine import InteractiveSegmenter
from lib.core.prompts import PromptError
from lib.core.volume import VolumeError

logger = logging.getLogger(__name__)
SCORE_KEY = "medsam_uncertainty"


class HeadUncertaintyScoring(ScoringMethod):
    """Scores every unlabelled image by the prompt-free head's entropy; refreshed after each round
    (MONAI Label runs scoring methods after training and after serving a sample)."""

    def __init__(self, segmenter: InteractiveSegmenter) -> None:
        super().__init__("Prompt-free head entropy per unlabelled image (higher = less certain)")
        self.segmenter = segmenter

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        scored: dict[str, Any] = {}
        for image_id in datastore.get_unlabeled_images():
            try:
                volume = self.segmenter.volumes.get(datastore.get_image_uri(image_id))
                result = self.segmenter.uncertainty(volume)
            except (PromptError, VolumeError) as e:
                logger.info("uncertainty of %s not scored: %s", image_id, e)
                continue
            datastore.update_image_info(image_id, {SCORE_KEY: result})
            scored[image_id] = result
        return {"scored": scored}


class UncertaintyStrategy(Strategy):
    """The unlabelled image the current model is least certain about. Images not yet scored by the
    current model version come after scored ones (and before nothing: never an already labelled one)."""

    def __init__(self, segmenter: InteractiveSegmenter) -> None:
        super().__init__("Most uncertain unlabelled image (prompt-free head entropy)")
        self.segmenter = segmenter

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any] | None:
        images = sorted(datastore.get_unlabeled_images())
        if not images:
            return None
        version = self.segmenter.current().name

        def rank(image_id: str) -> tuple[int, float]:
            info = (datastore.get_image_info(image_id) or {}).get(SCORE_KEY) or {}
            current = info.get("model_version") == version
            return (1 if current else 0, float(info.get("score", 0.0)) if current else 0.0)

        best = max(images, key=rank)
        score = rank(best)
        logger.info("uncertainty strategy: %s (scored by %s: %s)", best, version, bool(score[0]))
        return {"id": best, "uncertainty": score[1] if score[0] else None}
