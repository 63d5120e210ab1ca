"""Backbones, adapters, freezing, adapter checkpoints and profiles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import APP
from lib.core.backbones import BackboneError, build_backbone
from lib.core.checkpoint import AdapterCheckpoint, CheckpointError
from lib.core.config import (
    AdapterSettings,
    ProfileError,
    load_profile,
    load_profiles,
    parse_profile,
    setting_pairs,
)
from lib.core.model import AdaptedSam


def _reference_forward(backbone, x, box):
    if backbone.normalize_pixels:
        x = (x * 255 - backbone.pixel_mean) / backbone.pixel_std
    emb = backbone.image_encoder(x)
    sparse, dense = backbone.prompt_encoder(points=None, boxes=box[:, None], masks=None)
    logits, iou = backbone.mask_decoder(emb, backbone.prompt_encoder.get_dense_pe(), sparse, dense, False)
    return emb, logits, iou


@pytest.mark.parametrize("name", ["lite_medsam", "tiny", "tiny_vit"])
def test_fresh_adapters_leave_outputs_exactly_unchanged(name):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 256, 256)
    box = torch.tensor([[40.0, 50.0, 160.0, 200.0]])
    with torch.inference_mode():
        emb0, logits0, iou0 = _reference_forward(build_backbone(name), x, box)
        model = AdaptedSam(build_backbone(name), AdapterSettings(), labels=("a", "b"))
        emb1 = model.encode(x)
        out = model.decode(emb1, boxes=box)
    assert (emb0 - emb1).abs().max().item() == 0
    assert (logits0 - out.low_res_logits).abs().max().item() == 0
    assert (iou0 - out.iou).abs().max().item() == 0


def test_adapters_are_placed_where_the_design_says(lite_model):
    names = [n for n, _ in lite_model.named_parameters() if ".adapter." in n]
    encoder = {n.split(".adapter.")[0] for n in names if n.startswith("image_encoder.")}
    decoder = {n.split(".adapter.")[0] for n in names if n.startswith("mask_decoder.")}
    # TinyViT has 10 transformer blocks (2 + 6 + 2): two adapters each
    assert len(encoder) == 20 and all(n.endswith((".attn", ".mlp")) for n in encoder)
    # two two-way blocks, three adapters each
    assert len(decoder) == 6
    assert sum(n.endswith(".self_attn") for n in decoder) == 2
    assert sum(n.endswith(".cross_attn_image_to_token") for n in decoder) == 2


def test_only_adapters_and_heads_can_train(lite_model):
    counts = lite_model.parameter_counts()
    trainable = {n for n, p in lite_model.named_parameters() if p.requires_grad}
    assert trainable, "nothing is trainable"
    assert all(
        ".adapter." in n
        or n.startswith(
            (
                "prompt_free_head.",
                "mask_decoder.output_upscaling.",
                "mask_decoder.output_hypernetworks_mlps.",
                "mask_decoder.iou_prediction_head.",
                "mask_decoder.iou_token.",
                "mask_decoder.mask_tokens.",
            )
        )
        for n in trainable
    )
    assert not any(n.startswith(("image_encoder.patch_embed", "prompt_encoder.")) for n in trainable)
    assert 9.5e6 < counts["total"] < 11e6
    assert 1.0e6 < counts["trainable"] < 2.0e6
    assert 0.35e6 < counts["encoder_adapters"] < 0.45e6
    assert 0.15e6 < counts["decoder_adapters"] < 0.25e6


def test_freeze_all_but_selects_parts(lite_model):
    try:
        lite_model.freeze_all_but(["decoder_adapters"])
        trainable = [n for n, p in lite_model.named_parameters() if p.requires_grad]
        assert trainable and all(n.startswith("mask_decoder.") and ".adapter." in n for n in trainable)
        with pytest.raises(ValueError):
            lite_model.freeze_all_but(["image_encoder"])
    finally:
        lite_model.freeze_all_but(lite_model.trainable_parts)


def test_checkpoint_round_trip_is_small_and_atomic(tmp_path, lite_model):
    trained = AdaptedSam(build_backbone("tiny"), AdapterSettings(), labels=("spleen",))
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.01)
    path = AdapterCheckpoint.from_model(trained, version=3, metrics={"dice": 0.9}).save(tmp_path / "a.pt")
    assert not [p for p in tmp_path.iterdir() if p.name != "a.pt"], "temporary file left behind"
    ckpt = AdapterCheckpoint.load(path)
    assert ckpt.version == 3 and ckpt.backbone == "tiny" and ckpt.labels == ["spleen"] and ckpt.metrics["dice"] == 0.9
    fresh = AdaptedSam(build_backbone("tiny"), AdapterSettings(), labels=("spleen",))
    ckpt.apply_to(fresh)
    for (n, a), (_, b) in zip(trained.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    # the lite checkpoint holds only trainable tensors: a few MB
    lite_path = AdapterCheckpoint.from_model(lite_model, version=1).save(tmp_path / "lite.pt")
    assert lite_path.stat().st_size < 8e6


def test_checkpoint_refuses_another_backbone_or_base_weights(tmp_path, lite_model):
    tiny = AdaptedSam(build_backbone("tiny"), AdapterSettings(), labels=("spleen",))
    path = AdapterCheckpoint.from_model(tiny, version=1).save(tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match="backbone 'tiny'"):
        AdapterCheckpoint.load(path).apply_to(lite_model)
    ckpt = AdapterCheckpoint.from_model(lite_model, version=1)
    ckpt.base_sha256 = "0" * 64
    with pytest.raises(CheckpointError, match="base weights"):
        ckpt.apply_to(lite_model)
    ckpt = AdapterCheckpoint.from_model(lite_model, version=1)
    ckpt.adapters = dict(ckpt.adapters, ratio=0.5)
    with pytest.raises(CheckpointError, match="adapters"):
        ckpt.apply_to(lite_model)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        AdapterCheckpoint.load(tmp_path / "junk.pt")


def test_missing_or_wrong_vit_checkpoint_names_path_and_backbone(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(BackboneError, match=f"sam_vit_b.*{missing}|{missing}.*sam_vit_b"):
        build_backbone("sam_vit_b", missing)
    wrong = tmp_path / "wrong.pth"
    torch.save({"image_encoder.foo": torch.zeros(1)}, wrong)
    with pytest.raises(BackboneError, match="does not match backbone 'medsam_vit_b'"):
        build_backbone("medsam_vit_b", wrong)


def test_segment_anything_checkpoint_loads_by_path(tmp_path):
    from segment_anything import sam_model_registry

    # a real segment-anything ViT-B state dict (random weights) written the way SAM/MedSAM ship theirs
    path = tmp_path / "sam_vit_b.pth"
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), path)
    backbone = build_backbone("sam_vit_b", path)
    assert backbone.img_size == 1024 and backbone.normalize_pixels
    assert not build_backbone("medsam_vit_b", path).normalize_pixels


def test_shipped_profiles_parse(tmp_path):
    profiles = load_profiles(APP / "configs")
    assert "lite_medsam" in profiles and profiles["lite_medsam"].checkpoint_problem() is None
    assert "checkpoint" in profiles["sam_vit_b"].checkpoint_problem()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "x"\nbackbone = "vit_q"', "unknown backbone"),
        ('name = "x"\nbackbone = "tiny"\ncolour = 1', "unknown key"),
        ('name = "x"\nbackbone = "tiny"\n[adapters]\nratio = 2.0', "ratio"),
        ('name = "x"\nbackbone = "tiny"\n[adapters]\nratio = "big"', "number"),
        ('name = "x"\nbackbone = "tiny"\ntrainable = ["everything"]', "trainable"),
        ('name = "x"\nbackbone = "tiny"\nlabels = ["background"]', "background"),
        ('name = "x"\nbackbone = "tiny"\n[preprocessing]\nct_window = "liver"', "ct_window"),
        ('name = "x"\nbackbone = "tiny"\n[preprocessing]\nintensity = "zscore"', "intensity"),
        ('name = "x"\nbackbone = "tiny"\n[inference]\nfeature_repair_reach = 0', "feature_repair_reach"),
        ('name = "x"\nbackbone = "tiny"\n[inference]\nfeature_repair_margin = 3', "feature_repair_margin"),
        ('name = "x"\nbackbone = "tiny"\n[inference]\ncorrection_prompt_release = -1', "correction_prompt_release"),
        ('name = "x"\nbackbone = "tiny"\n[inference]\nscale_recheck_depth = 2', "scale_recheck_depth"),
        ("name = [", "TOML"),
    ],
)
def test_bad_profiles_fail_with_a_clear_message(tmp_path, text, message):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=message):
        load_profile(path)


def test_command_line_settings_are_validated_like_the_profile_file():
    """scripts/evaluate.py --inference and bench_predictor.py --other-inference: key=value pairs read as TOML
    values, merged into the profile's [inference] table and checked by the same parser."""
    shipped = APP / "configs" / "lite_medsam.toml"
    pairs = setting_pairs(["feature_repair=false", "lone_click_scales_mm=[20, 40]", "encoder_runtime=torch"])
    assert pairs == {"feature_repair": False, "lone_click_scales_mm": [20, 40], "encoder_runtime": "torch"}
    inference = load_profile(shipped, pairs).inference
    assert not inference.feature_repair and inference.lone_click_scales_mm == (20.0, 40.0)
    assert load_profile(shipped).inference.feature_repair
    with pytest.raises(ProfileError, match="expected key=value"):
        setting_pairs(["feature_repair"])
    with pytest.raises(ProfileError, match="feature_repair_reach"):
        load_profile(shipped, {"feature_repair_reach": 9})
    with pytest.raises(ProfileError, match="unknown key"):
        load_profile(shipped, {"feature_repairs": True})


def test_profile_paths_resolve_relative_to_the_profile(tmp_path):
    profile = parse_profile(
        {"name": "v", "backbone": "sam_vit_b", "checkpoint": "w/sam.pth"}, source=tmp_path / "configs" / "v.toml"
    )
    assert profile.checkpoint == (tmp_path / "configs" / "w" / "sam.pth").resolve()
    assert str(profile.checkpoint) in profile.checkpoint_problem()
    assert isinstance(profile.checkpoint, Path)
