"""The click adapter shipped for the bundled LiteMedSAM: fingerprinted, recorded, served by default,
and switchable back to the bare base model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from conftest import APP, SAMPLE, SHARED
from lib.core.annotator import dice, interior_point
from lib.core.checkpoint import AdapterCheckpoint
from lib.core.config import load_profile
from lib.core.datasets import load_dataset
from lib.core.encoder_stages import front_prefixes
from lib.core.engine import InteractiveSegmenter
from lib.core.eval_backends import InProcessBackend
from lib.core.evaluation import EvalSettings, evaluate_slice
from lib.core.model import AdaptedSam
from lib.core.prompts import parse_prompts

SHIPPED = APP / "adapters" / "lite_medsam_clicks.pt"


def test_shipped_checkpoint_is_small_fingerprinted_and_recorded():
    ckpt = AdapterCheckpoint.load(SHIPPED)
    assert SHIPPED.stat().st_size < 10e6
    assert ckpt.backbone == "lite_medsam" and len(ckpt.base_sha256) == 64
    assert ckpt.metrics["trained_with_mask_prompts"] and not ckpt.metrics["prompt_free_head_trained"]
    record = json.loads(SHIPPED.with_suffix(".json").read_text())
    assert record["command"].startswith("python scripts/train_click_adapter.py")
    assert record["settings"]["seed"] == ckpt.metrics["settings"]["seed"]
    # the held-out evaluation sets and the validation parts never reached training or checkpoint selection
    used = " ".join(record["train_cases"] + record["validation_cases"]).lower()
    for held_out in ("brats", "deeplesion", "ct_lesion", "validation_", "patient07"):
        assert held_out not in used, held_out
    for index in ("us_fetal_head_hc18", "cmr_lv_sunnybrook"):
        test_part = SHARED / index / "label2image_test.json"
        if test_part.is_file():
            images = {Path(v).stem.lower() for v in json.loads(test_part.read_text()).values()}
            assert not any(f"{index}/{image}" in used.split() for image in images), index
    after, before = record["validation_after"], record["validation_before"]
    assert after["box_dice"] >= before["box_dice"] - 0.01 and after["click1_dice"] > before["click1_dice"]


def test_served_by_default_and_switchable_to_the_base_model():
    profile = load_profile(APP / "configs" / "lite_medsam.toml")
    assert profile.adapter_checkpoint == SHIPPED.resolve()
    (case,) = [c for c in load_dataset(SAMPLE, SAMPLE / "reference") if c.case_id == "spleen_ct"]
    k = 12
    gt = case.label.array[:, :, k] > 0
    clicks = {}
    for name, prof in (("shipped", profile), ("base", replace(profile, adapter_checkpoint=None))):
        segmenter = InteractiveSegmenter(prof, adapter_dir=None, device="cpu")
        point = parse_prompts({"foreground": [[*interior_point(gt), k]]}, case.image.shape)
        out = segmenter.segment(case.image, point, three_d=False, state_key=("t", "spleen", "spleen"))
        assert out.params["model_version"] == name
        assert segmenter.feeds_logits(segmenter.current()) == (name == "shipped")
        record = evaluate_slice(InProcessBackend(segmenter), case, "spleen", gt, k, EvalSettings(max_clicks=3), name)
        clicks[name] = record.click_dice[-1]
    # LiteMedSAM alone ignores clicks; with the shipped adapter three clicks segment the organ
    assert clicks["shipped"] > 0.75 and clicks["shipped"] > clicks["base"] + 0.3, clicks


LONE = APP / "adapters" / "lite_medsam_lone_click.pt"


def test_the_lone_click_adapters_join_only_while_the_shipped_adapters_serve():
    """The lone-click adapters are decoder-side only (the bare base model's embedding) and answer a lone
    click next to the shipped click adapter; with the bare base model served, or switched off, they do not."""
    ckpt = AdapterCheckpoint.load(LONE)
    assert LONE.stat().st_size < 10e6 and ckpt.backbone == "lite_medsam"
    assert not ckpt.changes_encoder(fresh_model().adaptable_state())
    record = json.loads(LONE.with_suffix(".json").read_text())
    assert record["lone_click_adapter"] and record["settings"]["selection_metric"] == "click1_dice"
    assert record["validation_after"]["click1_dice"] > record["validation_before"]["click1_dice"]
    used = " ".join(record["train_cases"] + record["validation_cases"]).lower()
    for held_out in ("brats", "deeplesion", "ct_lesion", "validation_", "patient07"):
        assert held_out not in used, held_out

    profile = load_profile(APP / "configs" / "lite_medsam.toml")
    assert profile.lone_click_checkpoint == LONE.resolve()
    served = InteractiveSegmenter(profile, adapter_dir=None, device="cpu")
    lone = served.lone_click_model()
    assert lone is not None and lone.encoder_fingerprint == served.bare_model().encoder_fingerprint
    assert served.predictor(served.current()).lone is not None
    assert served.predictor(served.bare_model()).lone is None
    off = replace(profile, inference=replace(profile.inference, lone_click_adapter=False))
    assert InteractiveSegmenter(off, adapter_dir=None, device="cpu").lone_click_model() is None
    base = InteractiveSegmenter(replace(profile, adapter_checkpoint=None), adapter_dir=None, device="cpu")
    assert base.predictor(base.current()).lone is None


def fresh_model() -> AdaptedSam:
    """LiteMedSAM with untrained (zero-initialised) adapters."""
    profile = load_profile(APP / "configs" / "lite_medsam.toml")
    return AdaptedSam.from_profile(replace(profile, adapter_checkpoint=None))


def test_the_shipped_adapters_change_the_encoder_and_keep_lone_clicks_and_the_auto_head_on_the_base_embedding():
    """The shipped click adapter trains LiteMedSAM's last two encoder stages (its record says so). A lone
    click's scale candidates (the bare model's boxes, the lone-click adapters) and the shipped prompt-free
    head were made for the base model's embedding and keep answering on it; prefetch encodes both
    embeddings, so a lone click on a prefetched slice encodes nothing."""
    ckpt = AdapterCheckpoint.load(SHIPPED)
    record = json.loads(SHIPPED.with_suffix(".json").read_text())
    assert record["settings"]["train_encoder_adapters"] and record["settings"]["encoder_front_stages"] == 2
    model = fresh_model()
    assert ckpt.changes_encoder(model.adaptable_state())
    # the front (patch embedding, first two stages) is the base model's: kept fronts stay valid
    assert not ckpt.changes_encoder(model.adaptable_state(), front_prefixes(model, 2))
    profile = load_profile(APP / "configs" / "lite_medsam.toml")
    (case,) = [c for c in load_dataset(SAMPLE, SAMPLE / "reference") if c.case_id == "spleen_ct"]
    segmenter = InteractiveSegmenter(profile, adapter_dir=None, device="cpu")
    served, bare = segmenter.current(), segmenter.bare_model()
    assert served.encoder_fingerprint != bare.encoder_fingerprint
    # the automatic mode answers with the shipped head on the base model
    assert not served.model.prompt_free_head_trained and bare.model.prompt_free_head_trained
    computed = []
    real = segmenter.embeddings.get_or_compute

    def spy(fingerprint, key, compute):
        tensor, cached = real(fingerprint, key, compute)
        computed.extend([] if cached else [fingerprint])
        return tensor, cached

    segmenter.embeddings.get_or_compute = spy
    k = 15
    gt = case.label.array[:, :, k] > 0
    assert segmenter.prefetch(SAMPLE / "spleen_ct.nii.gz", k)
    assert sorted(computed) == sorted([served.encoder_fingerprint, bare.encoder_fingerprint])
    computed.clear()
    point = interior_point(gt)
    out = segmenter.segment(case.image, parse_prompts({"foreground": [[*point, k]]}, case.image.shape),
                            three_d=False)
    assert computed == [] and out.params["embedding_cached"]
    mask = out.label[:, :, k] > 0
    assert mask[tuple(point)] and dice(mask, gt) > 0.8
    auto = segmenter.segment_auto(case.image)
    assert auto.label.max() > 0


def test_a_round_started_from_the_shipped_adapters_keeps_the_automatic_mode(tmp_path):
    """A decoder-side round started from the shipped adapters inherits their encoder and trains no head: the
    automatic mode still answers, with the head shipped for the base model's embedding."""
    from lib.core.engine import publish_adapters
    from lib.core.volume import load_volume

    profile = load_profile(APP / "configs" / "lite_medsam.toml")
    model = AdaptedSam.from_profile(profile)
    AdapterCheckpoint.load(SHIPPED).apply_to(model)
    publish_adapters(model, tmp_path / "adapters", {"prompt_free_head_trained": False})
    segmenter = InteractiveSegmenter(profile, adapter_dir=tmp_path / "adapters", device="cpu")
    served = segmenter.current()
    assert served.version == 1 and not served.shipped and not served.model.prompt_free_head_trained
    assert served.encoder_fingerprint != segmenter.bare_model().encoder_fingerprint
    auto = segmenter.segment_auto(load_volume(SAMPLE / "abdomen_ct.nii.gz"))
    assert set(np.unique(auto.label).tolist()) - {0}, "the automatic mode found nothing"
