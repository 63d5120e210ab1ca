"""Prepared training samples in one compressed file, so a round can run where the scans are not.

``prepare_samples`` reads volumes, letterboxes slices and cuts objects; a sample bank keeps its result
(slices as 8-bit greys at the smaller of their own size and their letterboxed size, low-res labels and
objects, geometry) in an xz-compressed ``.npz``. A GPU
machine with no copy of the data then trains from the bank with the same trainer, and the same command
on a CPU gives the same samples. Model inputs are rebuilt from the greys by the same letterbox, to
within 8-bit rounding of the normalised slice (1/510).
"""

from __future__ import annotations

import dataclasses
import io
import json
import lzma
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .preprocess import LetterboxFrame
from .served_session import LowResGeometry
from .training import SliceSample


class SampleBankError(ValueError):
    """The file is not a sample bank this code can read."""


FORMAT = 1
# a byte delta before LZMA2: neighbouring grey values differ little (about 5 % smaller than LZMA2 alone)
FILTERS = [{"id": lzma.FILTER_DELTA, "dist": 1}, {"id": lzma.FILTER_LZMA2, "preset": 9}]


def _grey(sample: SliceSample) -> tuple[np.ndarray, bool]:
    """The sample's slices as 8-bit greys at the smaller of their own size and their size in the model
    input; True when they are at their own size (letterboxed again on load)."""
    frame, planes = sample.frame, sample.slices01
    h, w = frame.resized
    native = frame.rows * frame.cols <= h * w
    if not native:  # larger than in the model input: keep what the model sees, without the padding
        planes = np.stack([frame.image_to_model(p)[0, 0, :h, :w].numpy() for p in planes])
    return np.round(np.clip(planes, 0, 1) * 255).astype(np.uint8), native


def _model_input(greys: np.ndarray, native: bool, frame: LetterboxFrame) -> torch.Tensor:
    """(D, h, w) greys -> the model input, (1, 3, S, S) for one slice or (1, D, 3, S, S) for a stack."""
    if not native:  # already at their size in the model input: only the padding is added back
        frame = LetterboxFrame(*greys.shape[1:], frame.img_size, 1.0, 1.0)
    planes = [frame.image_to_model(g) for g in greys.astype(np.float32) / 255.0]
    return torch.stack(planes, dim=1) if len(planes) > 1 else planes[0]


def save_samples(samples: Sequence[SliceSample], path: Path) -> None:
    """Write samples prepared with ``keep_slices``, atomically."""
    if not samples:
        raise SampleBankError("no samples to save")
    if any(s.slices01 is None or s.frame is None for s in samples):
        raise SampleBankError("samples without their slices: prepare them with keep_slices=True")
    greys, meta = [], []
    for s in samples:
        grey, native = _grey(s)
        greys.append(grey.ravel())
        g = s.geometry
        meta.append({
            "source": s.source, "k": int(s.k), "shape": list(grey.shape), "native": native,
            "frame": dataclasses.asdict(s.frame),
            "geometry": None if g is None else [*map(int, g.extent), float(g.mm_per_pixel), float(g.slice_pixels)],
        })
    heads = [s.head_target if s.head_target is not None else np.full_like(s.labels, -1) for s in samples]
    arrays = {
        "greys": np.concatenate(greys),
        "labels": np.stack([s.labels for s in samples]).astype(np.int16),
        "heads": np.stack(heads).astype(np.int16),
        "objects": np.packbits(np.concatenate([np.stack(s.objects) for s in samples]), axis=-1),
        "object_counts": np.array([len(s.objects) for s in samples]),
        "meta": np.frombuffer(json.dumps({"format": FORMAT, "samples": meta}).encode(), dtype=np.uint8),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(lzma.compress(buffer.getvalue(), filters=FILTERS))
    tmp.replace(path)


def load_samples(path: Path) -> list[SliceSample]:
    """Samples with their model inputs (CPU tensors, (1, 3, S, S) or (1, D, 3, S, S) for stacks)."""
    try:
        data = np.load(io.BytesIO(lzma.decompress(Path(path).read_bytes())))
        meta = json.loads(data["meta"].tobytes())
    except (OSError, lzma.LZMAError, ValueError, KeyError) as e:
        raise SampleBankError(f"{path} is not a sample bank: {e}") from None
    if meta.get("format") != FORMAT:
        raise SampleBankError(f"{path}: sample bank format {meta.get('format')}, this code reads {FORMAT}")
    labels, heads, counts = data["labels"], data["heads"], data["object_counts"]
    objects = np.unpackbits(data["objects"], axis=-1, count=labels.shape[-1]).astype(bool)
    ends, offsets = np.cumsum(counts), np.cumsum([0] + [int(np.prod(m["shape"])) for m in meta["samples"]])
    samples = []
    for i, m in enumerate(meta["samples"]):
        frame = LetterboxFrame(**m["frame"])
        greys = data["greys"][offsets[i]:offsets[i + 1]].reshape(m["shape"])
        g = m["geometry"]
        samples.append(SliceSample(
            m["source"], m["k"], labels[i].astype(np.int64), list(objects[ends[i] - counts[i]:ends[i]]),
            None if (heads[i] < 0).all() else heads[i].astype(np.int64),
            model_input=_model_input(greys, m["native"], frame),
            geometry=None if g is None else LowResGeometry((g[0], g[1]), g[2], g[3]), frame=frame,
        ))
    return samples
