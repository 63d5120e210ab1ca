"""Data-parallel training over several processes (one per GPU with NCCL, or CPU processes with gloo).

Each rank rebuilds the model from the profile and the starting adapters, prepares the training
slices, draws its own batches, and averages gradients with the others after every backward pass
(see :meth:`AdapterTrainer.fit`); rank 0 validates and writes the result.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .checkpoint import AdapterCheckpoint, load_shipped_head
from .config import ModelProfile
from .model import AdaptedSam
from .training import AdapterTrainer, LabelledVolume, TrainResult, TrainSettings, prepare_samples


@dataclass(frozen=True)
class DistributedJob:
    profile: ModelProfile
    start_adapters: Path | None
    parts: tuple[str, ...]
    train: tuple[LabelledVolume, ...]
    val: tuple[LabelledVolume, ...]
    settings: TrainSettings
    feed_logits_before: bool
    result_dir: Path
    backend: str  # "nccl" (one GPU per rank) or "gloo" (CPU)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, job: DistributedJob) -> None:
    dist.init_process_group(job.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        device = torch.device(f"cuda:{rank}") if job.backend == "nccl" else torch.device("cpu")
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        model = AdaptedSam.from_profile(job.profile)
        if job.start_adapters is not None:
            AdapterCheckpoint.load(job.start_adapters).apply_to(model)
        if not model.prompt_free_head_trained:  # as served: the shipped prompt-free head, if any
            load_shipped_head(job.profile, model)
        model.to(device).freeze_all_but(list(job.parts))
        train = prepare_samples(model, job.train, job.profile.preprocessing, job.settings, device)
        val = prepare_samples(model, job.val, job.profile.preprocessing, job.settings, device) if rank == 0 else []
        result = AdapterTrainer(model, job.settings, device).fit(train, val, job.feed_logits_before)
        final = {k: v.cpu() for k, v in model.adaptable_state().items()}
        torch.save({"result": result if rank == 0 else None, "final_state": final}, job.result_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def train_distributed(job: DistributedJob, world: int) -> TrainResult:
    """Run ``world`` ranks and return rank 0's :class:`TrainResult`."""
    job.result_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world, _free_port(), job), nprocs=world, join=True)
    return torch.load(job.result_dir / "rank0.pt", weights_only=False)["result"]
