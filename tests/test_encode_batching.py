"""Encodes of concurrent requests run as one batch (lib/serving/encode_batching.py): callers that arrive
while an encode runs join the next call, at most ``max_batch`` items and one input shape per call, and each
gets its own rows back (or its batch's error)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import APP
from lib.core.checkpoint import AdapterCheckpoint
from lib.core.config import ProfileError, load_profile, parse_profile
from lib.core.model import AdaptedSam
from lib.serving.encode_batching import EncodeBatcher, batch_size_for
from lib.serving.runtimes import RuntimeEncoder, probe_image


class HeldEncoder:
    """An encode whose first call waits until released, so that others queue behind it; records each
    call's input shapes."""

    def __init__(self, fail_call: int | None = None) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.calls: list[torch.Size] = []
        self.fail_call = fail_call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape)
        if len(self.calls) == 1:
            self.started.set()
            assert self.release.wait(10)
        if len(self.calls) == self.fail_call:
            raise RuntimeError("out of memory")
        return x * 2 + 1


def run_held(batcher: EncodeBatcher, encoder: HeldEncoder, inputs: list[torch.Tensor]) -> list:
    """The first input runs and is held; the others queue, then all are released. Returns each
    caller's result or exception, in input order."""
    with ThreadPoolExecutor(len(inputs)) as pool:
        futures = [pool.submit(batcher, inputs[0])]
        assert encoder.started.wait(10)
        futures += [pool.submit(batcher, x) for x in inputs[1:]]
        deadline = time.time() + 10
        while len(batcher._pending) < len(inputs) - 1:
            assert time.time() < deadline, "callers did not queue"
            time.sleep(0.01)
        encoder.release.set()
        return [f.exception(10) or f.result(10) for f in futures]


def test_callers_that_arrive_while_an_encode_runs_share_the_next_calls_and_get_their_own_rows():
    encoder = HeldEncoder()
    batcher = EncodeBatcher(encoder, max_batch=4)
    inputs = [torch.full((1, 3, 4, 4), float(n)) for n in range(7)]
    results = run_held(batcher, encoder, inputs)
    for x, y in zip(inputs, results, strict=True):
        torch.testing.assert_close(y, x * 2 + 1)
    assert [s[0] for s in encoder.calls] == [1, 4, 2]  # the running one alone, then up to four together
    assert (batcher.calls, batcher.items) == (3, 7)


def test_only_inputs_of_one_shape_are_joined():
    encoder = HeldEncoder()
    batcher = EncodeBatcher(encoder, max_batch=8)
    slices = [torch.rand(1, 3, 4, 4) for _ in range(3)]
    stacks = [torch.rand(1, 3, 3, 4, 4) for _ in range(2)]  # the depth design's slice stacks
    inputs = [slices[0], stacks[0], slices[1], stacks[1], slices[2]]
    results = run_held(batcher, encoder, inputs)
    for x, y in zip(inputs, results, strict=True):
        torch.testing.assert_close(y, x * 2 + 1)
    assert sorted(tuple(s) for s in encoder.calls[1:]) == [(2, 3, 3, 4, 4), (2, 3, 4, 4)]


def test_a_failed_batch_fails_each_of_its_callers_and_the_next_encode_runs():
    encoder = HeldEncoder(fail_call=2)
    batcher = EncodeBatcher(encoder, max_batch=4)
    inputs = [torch.full((1, 2), float(n)) for n in range(4)]
    results = run_held(batcher, encoder, inputs)
    torch.testing.assert_close(results[0], inputs[0] * 2 + 1)
    assert all(isinstance(r, RuntimeError) and "out of memory" in str(r) for r in results[1:])
    torch.testing.assert_close(batcher(inputs[1]), inputs[1] * 2 + 1)
    assert not batcher._pending and not batcher._busy


def test_batched_rows_are_the_solo_embeddings_of_the_real_model():
    profile = load_profile(APP / "configs" / "lite_medsam.toml")
    model = AdaptedSam.from_profile(profile)
    AdapterCheckpoint.load(profile.adapter_checkpoint).apply_to(model)
    model.eval()
    images = [torch.roll(probe_image(model.img_size), 20 * n, dims=-1) for n in range(3)]
    encoder = RuntimeEncoder(model, "torch", max_batch=3)
    with torch.inference_mode():
        solo = [model.encode(x) for x in images]
        batched = encoder.batcher._run_direct(torch.cat(images))  # what a batch of three runs
        rows = run_held_real(encoder, images)
    for alone, together, row in zip(solo, batched.split(1), rows, strict=True):
        assert float((together - alone).norm() / alone.norm()) < 1e-5
        assert row.shape == alone.shape and float((row - alone).norm() / alone.norm()) < 1e-5


def run_held_real(encoder: RuntimeEncoder, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Three threads through the real encoder at once (whether they meet depends on timing; the rows
    must be each caller's own either way)."""
    with ThreadPoolExecutor(len(images)) as pool:
        return list(pool.map(encoder, images))


def test_auto_batches_on_cuda_only_and_bad_settings_are_clear_errors():
    assert batch_size_for(0, "cuda") == 8 and batch_size_for(0, "cpu") == 1 and batch_size_for(3, "cpu") == 3
    with pytest.raises(ValueError):
        batch_size_for(-1, "cpu")
    with pytest.raises(ValueError):
        EncodeBatcher(lambda x: x, 0)
    data = {"name": "p", "backbone": "tiny"}
    assert parse_profile({**data, "inference": {"encode_batch": 4}}).inference.encode_batch == 4
    with pytest.raises(ProfileError, match=r"encode_batch must be between 0 \(auto\) and 256"):
        parse_profile({**data, "inference": {"encode_batch": 1000}})
    with pytest.raises(ProfileError, match="encode_batch must be a"):
        parse_profile({**data, "inference": {"encode_batch": "many"}})
