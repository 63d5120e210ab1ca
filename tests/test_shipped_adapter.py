"""The click adapter shipped for the bundled LiteMedSAM: fingerprinted, recorded, served by default,
and switchable back to the bare base model."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np

from conftest import APP, SAMPLE
from lib.core.checkpoint import AdapterCheckpoint
from lib.core.config import load_profile
from lib.core.engine import InteractiveSegmenter
from lib.core.prompts import parse_prompts
from lib.core.volume import load_volume

SHIPPED = APP / "adapters" / "lite_medsam_clicks.pt"


def test_shipped_checkpoint_is_small_fingerprinted_and_recorded():
    ckpt = AdapterCheckpoint.load(SHIPPED)
    assert SHIPPED.stat().st_size < 10e6
    assert ckpt.backbone == "lite_medsam" and len(ckpt.base_sha256) == 64
    assert ckpt.metrics["trained_with_mask_prompts"] and not ckpt.metrics["prompt_free_head_trained"]
    record = json.loads(SHIPPED.with_suffix(".json").read_text())
    assert record["command"].startswith("python scripts/train_click_adapter.py")
    assert record["settings"]["seed"] == ckpt.metrics["settings"]["seed"]
    # the held-out evaluation sets never reached training or checkpoint selection
    used = " ".join(record["train_cases"] + record["validation_cases"])
    assert "brats" not in used.lower() and "lesion" not in used.lower()
    after, before = record["validation_after"], record["validation_before"]
    assert after["box_dice"] >= before["box_dice"] - 0.01 and after["click1_dice"] > before["click1_dice"]


def test_served_by_default_and_switchable_to_the_base_model():
    profile = load_profile(APP / "configs" / "lite_medsam.toml")
    assert profile.adapter_checkpoint == SHIPPED.resolve()
    volume = load_volume(SAMPLE / "spleen_ct.nii.gz")
    reference = load_volume(SAMPLE / "reference" / "spleen_ct.nii.gz").array > 0
    k = 12
    inside = np.argwhere(reference[:, :, k])
    click = parse_prompts({"foreground": [[*map(int, inside[len(inside) // 2]), k]]}, volume.shape)
    results = {}
    for name, prof in (("shipped", profile), ("base", replace(profile, adapter_checkpoint=None))):
        segmenter = InteractiveSegmenter(prof, adapter_dir=None, device="cpu")
        out = segmenter.segment(volume, click, three_d=False, state_key=("t", "spleen", "spleen"))
        assert out.params["model_version"] == name
        assert segmenter.feeds_logits(segmenter.current()) == (name == "shipped")
        mask = out.label[:, :, k] > 0
        results[name] = 2 * (mask & reference[:, :, k]).sum() / (mask.sum() + reference[:, :, k].sum())
    # LiteMedSAM alone ignores a click; the shipped adapter segments the organ from it
    assert results["shipped"] > 0.8 > results["base"]
