"""The encoder replayed from CUDA graphs (lib/serving/cuda_graphs.py). On a CPU the graph runtimes are
unavailable and torch serves; on CUDA (where a GPU is lent, with no conftest dependencies:
``pytest --noconftest tests/test_cuda_graphs.py``) each batch size's replay gives torch's embeddings of the
real LiteMedSAM encoder, outputs are the caller's own, and concurrent callers are batched through it."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

APP = Path(__file__).resolve().parents[1] / "apps" / "medsam_adapter"
sys.path.insert(0, str(APP))

from lib.core.checkpoint import AdapterCheckpoint  # noqa: E402
from lib.core.config import load_profile, parse_profile  # noqa: E402
from lib.core.model import AdaptedSam  # noqa: E402
from lib.serving.runtimes import RuntimeEncoder, candidates, relative_error  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_on_a_cpu_the_graph_runtimes_are_unavailable_and_torch_serves():
    pytest.importorskip("segment_anything")  # the tiny model's decoder parts (not on the lent GPU machine)
    model = AdaptedSam.from_profile(parse_profile({"name": "tiny", "backbone": "tiny"})).eval()
    for name in ("cuda_graph", "cuda_graph_fp16"):
        encoder = RuntimeEncoder(model, name)
        assert encoder.prepare().name == "torch"
        assert "needs CUDA" in encoder.failures[name]
    assert candidates("auto", "cuda")[:2] == ["cuda_graph_fp16", "cuda_graph"]


@pytest.fixture(scope="module")
def cuda_model() -> AdaptedSam:
    profile = load_profile(APP / "configs" / "lite_medsam.toml")
    model = AdaptedSam.from_profile(profile)
    AdapterCheckpoint.load(profile.adapter_checkpoint).apply_to(model)
    return model.to("cuda").eval()


@needs_cuda
@pytest.mark.parametrize(("name", "tolerance"), [("cuda_graph", 1e-4), ("cuda_graph_fp16", 0.01)])
def test_graph_replays_give_torchs_embeddings_at_every_batch_size(cuda_model, name, tolerance):
    encoder = RuntimeEncoder(cuda_model, name, max_batch=4)
    assert encoder.prepare().name == name, encoder.failures
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.inference_mode():
        for batch in (1, 3, 4, 1):
            x = torch.rand(batch, 3, 256, 256, device="cuda", generator=g)
            first = encoder(x)
            second = encoder(torch.rand(batch, 3, 256, 256, device="cuda", generator=g))
            reference = cuda_model.encode(x)
            assert relative_error(first, reference) < tolerance  # not overwritten by the next replay
            assert not torch.equal(first, second)


@needs_cuda
def test_concurrent_callers_are_batched_through_the_graphs_and_get_their_own_rows(cuda_model):
    encoder = RuntimeEncoder(cuda_model, "cuda_graph", max_batch=8)
    encoder.prepare()
    images = [torch.rand(1, 3, 256, 256, device="cuda") for _ in range(16)]
    with torch.inference_mode():
        with ThreadPoolExecutor(8) as pool:
            rows = list(pool.map(encoder, images))
        for image, row in zip(images, rows, strict=True):
            assert relative_error(row, cuda_model.encode(image)) < 1e-4
    assert encoder.batcher.items == 16 and encoder.batcher.calls <= 16
