"""Train a prompt-free head alone on cached image embeddings, from fully or partially labelled slices.

A partially labelled slice (e.g. a spleen-only label of a CT that also shows the liver) must not teach
the head that the other organs are background. The loss is therefore *marginal* (Shi et al. 2021):
for each slice, the probabilities of the labels it does not annotate are merged into background
before cross-entropy, and soft Dice is taken over the labels it annotates only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .annotator import dice
from .model import AdaptedSam


@dataclass
class HeadSample:
    source: str
    k: int
    embedding: Tensor  # (1, C, h, w), any float dtype
    target: np.ndarray  # (H, W) profile label indices (0 = background or not annotated)
    annotated: np.ndarray  # (1 + labels,) bool: which classes this slice's label marks (background always)


def marginal_head_loss(logits: Tensor, target: Tensor, annotated: Tensor) -> Tensor:
    """Marginal cross-entropy + soft Dice over annotated labels.

    logits (B, K, H, W); target (B, H, W) class indices; annotated (B, K) bool, column 0 (background) True.
    """
    logp = F.log_softmax(logits, dim=1)
    # background absorbs the labels a slice does not annotate
    absorbing = (~annotated).clone()
    absorbing[:, 0] = True
    bg = torch.logsumexp(logp.masked_fill(~absorbing[:, :, None, None], -math.inf), dim=1)
    picked = logp.gather(1, target[:, None]).squeeze(1)
    ce = -torch.where(target == 0, bg, picked).mean()
    probs = logp.exp()
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    inter = (probs * onehot).flatten(2).sum(2)
    denom = (probs + onehot).flatten(2).sum(2)
    dice_loss = 1 - (2 * inter + 1e-5) / (denom + 1e-5)  # (B, K)
    weights = annotated.float().clone()
    weights[:, 0] = 0
    dice_term = (dice_loss * weights).sum() / weights.sum().clamp(min=1)
    return ce + dice_term


@torch.no_grad()
def head_dice(model: AdaptedSam, samples: Sequence[HeadSample], device: torch.device) -> dict[str, float]:
    """Per-label Dice pooled over the slices that annotate the label (pixels summed over slices), plus
    their mean; labels never annotated are left out."""
    inter = np.zeros(len(model.labels) + 1)
    total = np.zeros(len(model.labels) + 1)
    for s in samples:
        pred = model.auto_segment(s.embedding.float().to(device))[0].argmax(0).cpu().numpy()
        for c in np.flatnonzero(s.annotated[1:]) + 1:
            p, t = pred == c, s.target == c
            inter[c] += 2 * np.logical_and(p, t).sum()
            total[c] += p.sum() + t.sum()
    out = {name: float(inter[i + 1] / total[i + 1]) for i, name in enumerate(model.labels) if total[i + 1] > 0}
    out["mean"] = float(np.mean(list(out.values()))) if out else math.nan
    return out


def slice_mean_dice(pred: np.ndarray, target: np.ndarray, label: int) -> float:
    """Dice of one label on one slice (1.0 when it is absent from both)."""
    return dice(pred == label, target == label)


def fit_head(
    model: AdaptedSam,
    train: Sequence[HeadSample],
    steps: int,
    device: torch.device,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    seed: int = 0,
    validate: Callable[[], dict] | None = None,
    every: int = 250,
    log: Callable[[dict], None] | None = None,
    keep_best: bool = True,
) -> dict:
    """AdamW with cosine decay on the head's parameters only. ``validate`` is checked every ``every``
    steps; with ``keep_best`` the head with the best validation mean is kept, otherwise the last one
    (``validate`` is then only reported). Returns a summary (history, best step, seconds)."""
    head = model.prompt_free_head
    if head is None:
        raise ValueError("the model has no prompt-free head")
    params = list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    history: list[dict] = []
    best, best_state, best_step = -math.inf, None, 0
    start = time.time()
    losses: list[float] = []
    model.eval()
    for step in range(1, steps + 1):
        pick = rng.choice(len(train), size=min(batch_size, len(train)), replace=False)
        batch = [train[i] for i in pick]
        emb = torch.cat([s.embedding for s in batch]).float().to(device)
        target = torch.from_numpy(np.stack([s.target for s in batch])).long().to(device)
        annotated = torch.from_numpy(np.stack([s.annotated for s in batch])).to(device)
        with torch.enable_grad():
            loss = marginal_head_loss(model.auto_segment(emb), target, annotated)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % every == 0 or step == steps:
            entry: dict = {"step": step, "loss": float(np.mean(losses)), "seconds": round(time.time() - start, 1)}
            losses = []
            if validate is not None:
                entry["validation"] = validate()
                score = entry["validation"].get("mean", math.nan)
                if not math.isnan(score) and score > best:
                    best, best_step = score, step
                    best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
            history.append(entry)
            if log:
                log(entry)
    if keep_best and best_state is not None:
        head.load_state_dict(best_state)
    else:
        best_step = steps
    return {"history": history, "best_step": best_step, "seconds": round(time.time() - start, 1)}
