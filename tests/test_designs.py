"""Adapter designs (msa, samus), AutoSAM's prompt-free heads, design-checked checkpoints and the shipped
prompt-free head (medsam_auto answers on a fresh install)."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
import requests
import torch

from conftest import APP, SAMPLE
from lib.core.backbones import build_backbone
from lib.core.checkpoint import AdapterCheckpoint, CheckpointError
from lib.core.config import AdapterSettings, ProfileError, design_option_problem, load_profile, parse_profile
from lib.core.heads import LinearHead, PromptFreeHead, UNetHead, build_head
from lib.core.model import AdaptedSam, part_of

LABELS = ("spleen", "liver")


def _model(backbone: str, design: str = "msa", head: str = "decoder", labels=LABELS) -> AdaptedSam:
    return AdaptedSam(build_backbone(backbone), AdapterSettings(design=design, head=head), labels=labels)


def _image(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(seed))


def _spleen_slice() -> torch.Tensor:
    """A real CT slice (the shipped spleen CT, soft-tissue window) as a [0, 1] RGB model input."""
    ct = np.asarray(nib.load(SAMPLE / "spleen_ct.nii.gz").dataobj, dtype=np.float32)[:, :, 13]
    x = np.clip((ct - (40 - 200)) / 400, 0, 1)
    t = torch.from_numpy(x)[None, None]
    return torch.nn.functional.interpolate(t, size=(256, 256), mode="bilinear").repeat(1, 3, 1, 1)


@torch.no_grad()
def _outputs(model: AdaptedSam, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    emb = model.encode(x)
    box = torch.tensor([[60.0, 70.0, 150.0, 170.0]])
    return emb, model.decode(emb, boxes=box).low_res_logits


def test_untrained_samus_gives_exactly_the_base_outputs_on_the_real_weights():
    x = _spleen_slice()
    base_emb, base_logits = _outputs(_model("lite_medsam", "msa"), x)
    samus = _model("lite_medsam", "samus")
    emb, logits = _outputs(samus, x)
    assert torch.equal(emb, base_emb) and torch.equal(logits, base_logits)
    counts = samus.parameter_counts()
    names = [n for n, _ in samus.named_parameters() if part_of(n) == "encoder_adapters"]
    # SAMUS parts on TinyViT: patch-embedding adapter, MLP adapters, CNN branch with cross-branch attention
    assert any(".patch_embed.adapter.feature." in n for n in names)
    assert any(".neck.adapter.cnn." in n for n in names) and any(".neck.adapter.attn." in n for n in names)
    assert any(".mlp.adapter." in n for n in names)
    assert not any(".attn.adapter." in n for n in names if ".neck." not in n)  # no MSA attention adapters
    assert 0 < counts["encoder_adapters"] < 400_000


def test_samus_parts_are_in_the_path_and_train():
    model = _model("lite_medsam", "samus")
    model.freeze_all_but(["encoder_adapters"])
    x = _spleen_slice()
    model.encode(x).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # zero-initialised up-projections get gradients first; the CNN branch's output projection too
    assert grads and all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if ".neck.adapter.out." in n)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if ".patch_embed.adapter.feature.adapter.up." in n)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("neck.adapter.out.weight"):
                p.normal_(0, 0.05)
        changed = model.encode(x)
    assert not torch.equal(changed, _outputs(_model("lite_medsam"), x)[0])


def test_samus_on_a_small_random_vit_adds_the_position_adapter_and_keeps_outputs():
    x = _image(1)
    base_emb, base_logits = _outputs(_model("tiny_vit"), x)
    samus = _model("tiny_vit", "samus")
    emb, logits = _outputs(samus, x)
    assert torch.equal(emb, base_emb) and torch.equal(logits, base_logits)
    names = [n for n, _ in samus.named_parameters()]
    assert any(".patch_embed.adapter.position." in n for n in names)
    assert all(part_of(n) == "encoder_adapters" for n in names if ".adapter." in n and n.startswith("image_encoder."))
    # the tiny TinyViT config works as well
    tiny_base, _ = _outputs(_model("tiny"), x)
    assert torch.equal(_outputs(_model("tiny", "samus"), x)[0], tiny_base)


def test_samus_encoder_is_thread_safe_across_a_cloned_model():
    import copy
    import threading

    model = _model("tiny", "samus")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("neck.adapter.out.weight"):
                p.normal_(0, 0.1)
    clone = copy.deepcopy(model)
    xs = [_image(i) for i in range(4)]
    with torch.no_grad():
        expected = [model.encode(x) for x in xs]
    got: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        with torch.no_grad():
            got[i] = (model if i % 2 else clone).encode(xs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.allclose(got[i], expected[i], atol=1e-6) for i in range(4))


@pytest.mark.parametrize(
    "kind,cls,max_params",
    [("decoder", PromptFreeHead, 320_000), ("unet", UNetHead, 900_000), ("linear", LinearHead, 5_000)],
)
def test_heads_give_all_classes_in_one_pass(kind, cls, max_params):
    head = build_head(kind, 7)
    assert isinstance(head, cls)
    for size in (64, 16):  # LiteMedSAM's and the small ViT's embedding grids
        out = head(torch.randn(2, 256, size, size))
        assert out.shape == (2, 8, 4 * size, 4 * size)
    assert sum(p.numel() for p in head.parameters()) <= max_params
    model = _model("tiny", head=kind)
    assert isinstance(model.prompt_free_head, cls)
    assert model.auto_segment(torch.randn(1, 256, 64, 64)).shape == (1, 3, 256, 256)


def test_default_design_and_head_are_initialised_exactly_as_before():
    """Zero-risk defaults: msa adapters and the 'decoder' head built the way the model built them before
    designs and heads were selectable (same modules, same fixed-seed initial values)."""
    from lib.core.adapters import add_decoder_adapters, add_encoder_adapters

    backbone = build_backbone("tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        add_encoder_adapters(backbone.image_encoder, AdapterSettings())
        add_decoder_adapters(backbone.mask_decoder, AdapterSettings())
        reference = PromptFreeHead(len(LABELS))
    model = _model("tiny")
    assert type(model.prompt_free_head) is PromptFreeHead
    ours = model.prompt_free_head.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in reference.state_dict().items())
    adapted = dict(backbone.named_parameters())
    assert all(torch.equal(p, adapted[n]) for n, p in model.named_parameters()
               if ".adapter." in n and n in adapted)


def test_checkpoint_records_design_and_head_and_refuses_another(tmp_path):
    msa = _model("tiny")
    path = AdapterCheckpoint.from_model(msa, 1).save(tmp_path / "adapter_v0001.pt")
    ckpt = AdapterCheckpoint.load(path)
    assert ckpt.adapters["design"] == "msa" and ckpt.adapters["head"] == "decoder"
    with pytest.raises(CheckpointError, match="design 'msa'.*built for design 'samus'"):
        ckpt.apply_to(_model("tiny", "samus"))
    with pytest.raises(CheckpointError, match="'decoder' prompt-free head.*'unet' head"):
        ckpt.apply_to(_model("tiny", head="unet"))
    samus = _model("tiny", "samus")
    AdapterCheckpoint.from_model(samus, 2).save(tmp_path / "samus.pt")
    with pytest.raises(CheckpointError, match="design 'samus'"):
        AdapterCheckpoint.load(tmp_path / "samus.pt").apply_to(_model("tiny"))
    AdapterCheckpoint.load(tmp_path / "samus.pt").apply_to(_model("tiny", "samus"))
    # a checkpoint written before the design and head fields existed reads as msa with the decoder head
    data = torch.load(path, weights_only=True)
    for key in ("design", "head"):
        data["meta"]["adapters"].pop(key)
    torch.save(data, tmp_path / "old.pt")
    old = AdapterCheckpoint.load(tmp_path / "old.pt")
    assert old.adapter_settings() == AdapterSettings()
    old.apply_to(_model("tiny"))
    with pytest.raises(CheckpointError, match="design 'msa'"):
        old.apply_to(_model("tiny", "samus"))


def test_head_checkpoint_loads_on_top_of_other_adapters(tmp_path):
    trained = _model("tiny")
    with torch.no_grad():
        for p in trained.prompt_free_head.parameters():
            p.add_(0.01)
    path = AdapterCheckpoint.head_from_model(trained).save(tmp_path / "head.pt")
    ckpt = AdapterCheckpoint.load(path)
    assert set(ckpt.parts) == {"prompt_free_head"} and all(k.startswith("prompt_free_head.") for k in ckpt.tensors)
    served = _model("tiny")
    with torch.no_grad():
        for n, p in served.named_parameters():
            if ".adapter.up." in n and n.startswith("mask_decoder."):
                p.fill_(0.5)  # stands for trained click adapters
    before = {n: p.clone() for n, p in served.named_parameters() if not n.startswith("prompt_free_head.")}
    ckpt.apply_head_to(served)
    assert served.prompt_free_head_trained
    assert all(torch.equal(p, before[n]) for n, p in served.named_parameters() if n in before)
    assert all(torch.equal(a, b) for a, b in zip(served.prompt_free_head.state_dict().values(),
                                                  trained.prompt_free_head.state_dict().values(), strict=True))
    with pytest.raises(CheckpointError, match="labels"):
        ckpt.apply_head_to(_model("tiny", labels=("liver", "spleen")))
    with pytest.raises(CheckpointError, match="'linear' head"):
        ckpt.apply_head_to(_model("tiny", head="linear"))


def test_profile_and_train_options_validate_design_names():
    profile = parse_profile({"name": "x", "backbone": "tiny", "adapters": {"design": "samus", "head": "unet"}})
    assert profile.adapters.design == "samus" and profile.adapters.head == "unet"
    with pytest.raises(ProfileError, match="design must be one of"):
        parse_profile({"name": "x", "backbone": "tiny", "adapters": {"design": "lora"}})
    with pytest.raises(ProfileError, match="head must be one of"):
        parse_profile({"name": "x", "backbone": "tiny", "adapters": {"head": "vit"}})
    assert design_option_problem({"adapter_design": "samus", "head": ["linear", "unet"], "max_epochs": 3}) is None
    assert design_option_problem({"adapter_design": ["", "msa"]}) is None
    assert "unknown 'lora'" in design_option_problem({"adapter_design": "lora"})
    shipped = load_profile(APP / "configs" / "lite_medsam.toml")
    assert shipped.adapters.design == "msa" and shipped.adapters.head == "decoder"
    assert shipped.auto_head_checkpoint.name == "lite_medsam_auto_head.pt"


def _shipped_head_or_skip():
    profile = load_profile(APP / "configs" / "lite_medsam.toml")
    if not profile.auto_head_checkpoint.is_file():
        pytest.skip(f"{profile.auto_head_checkpoint.name} not trained yet: run scripts/train_auto_head.py")
    return profile


def test_shipped_head_composes_with_the_shipped_click_adapter():
    profile = _shipped_head_or_skip()
    head = AdapterCheckpoint.load(profile.auto_head_checkpoint)
    clicks = AdapterCheckpoint.load(profile.adapter_checkpoint)
    assert head.labels == list(profile.labels) and head.base_sha256 == clicks.base_sha256
    assert not set(head.tensors) & {k for k in clicks.tensors if not k.startswith("prompt_free_head.")}
    record = json.loads(profile.auto_head_checkpoint.with_suffix(".json").read_text())
    for key in ("train_cases", "held_out_cases", "seed", "settings", "dice_held_out", "wall_seconds"):
        assert key in record


# -- a real server -----------------------------------------------------------------------------------


def test_fresh_install_answers_medsam_auto_on_the_abdomen_ct(server, tmp_path):
    """The shipped head: a multi-label result on the shipped abdomen CT, no training round needed.
    Its reference is TotalSegmentator output and this CT was in the head's training data: the numbers are
    agreement with TotalSegmentator on a training image (the held-out numbers are in the head's record)."""
    _shipped_head_or_skip()
    response = requests.post(
        f"{server.url}/infer/medsam_auto",
        params={"image": "abdomen_ct", "output": "image"},
        files={"params": (None, json.dumps({"result_extension": ".nii.gz"}))},
        timeout=600,
    )
    assert response.status_code == 200, response.text
    out = tmp_path / "auto.nii.gz"
    out.write_bytes(response.content)
    label = np.asarray(nib.load(out).dataobj)
    reference = np.asarray(nib.load(SAMPLE / "reference" / "abdomen_ct.nii.gz").dataobj)
    names = json.loads((SAMPLE / "reference" / "abdomen_ct.labels.json").read_text())
    assert label.shape == reference.shape
    profile = load_profile(APP / "configs" / "lite_medsam.toml")
    values = {name: i + 1 for i, name in enumerate(profile.labels)}
    present = sorted(int(v) for v in np.unique(label) if v > 0)
    assert len(present) >= 4, present  # multi-label
    agreement = {}
    for organ in ("spleen", "liver"):
        pred, ref = label == values[organ], reference == names[organ]
        agreement[organ] = 2 * np.logical_and(pred, ref).sum() / max(pred.sum() + ref.sum(), 1)
    print(f"\nmedsam_auto on abdomen_ct, agreement with TotalSegmentator (training image): "
          f"spleen Dice {agreement['spleen']:.3f}, liver Dice {agreement['liver']:.3f}")
    assert agreement["liver"] > 0.7 and agreement["spleen"] > 0.5


def test_bad_train_options_are_a_422_before_a_round(server):
    bad = (
        ({"adapter_design": "lora"}, "unknown"),
        ({"head": "vit", "max_epochs": 1}, "unknown"),
        ({"selection_metric": "f1"}, "selection_metric"),
        ({"lone_click_share": 2}, "lone_click_share"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"publish": "never"}, "publish"),
        ({"encoder_precision": "fp16"}, "encoder_precision"),
        ({"encoder_checkpointing": "always"}, "encoder_checkpointing"),
    )
    for body, named in bad:
        response = requests.post(f"{server.url}/train/medsam", json=body, timeout=60)
        assert response.status_code == 422, response.text
        assert named in response.json()["detail"], (body, response.text)
    status = requests.get(f"{server.url}/train/", params={"check_if_running": True}, timeout=30)
    assert status.status_code == 404, status.text  # no round was started


def test_served_design_is_in_the_infer_params(server):
    response = requests.post(
        f"{server.url}/infer/medsam_2d",
        params={"image": "spleen_ct", "output": "json"},
        files={"params": (None, json.dumps({"foreground": [[80, 90, 13]]}))},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    assert response.json()["adapter_design"] == "msa"


def test_dataclass_settings_round_trip():
    settings = AdapterSettings(design="samus", head="linear")
    assert AdapterSettings(**settings.as_dict()) == settings
    assert dataclasses.replace(settings, design="msa").as_dict()["design"] == "msa"


def test_a_published_checkpoint_of_another_design_is_served_with_that_design(tmp_path):
    """A round asked for 'samus' publishes samus adapters: the segmenter builds a samus model for them,
    answers say so, and the next msa version is served by an msa model again."""
    from lib.core.engine import InteractiveSegmenter, publish_adapters
    from lib.core.prompts import parse_prompts
    from lib.core.volume import load_volume

    profile = parse_profile({"name": "tiny", "backbone": "tiny", "labels": ["spleen"]})
    seg = InteractiveSegmenter(profile, adapter_dir=tmp_path / "adapters", device="cpu")
    volume = load_volume(SAMPLE / "spleen_ct.nii.gz")
    prompts = parse_prompts({"foreground": [[60, 80, 12]]}, volume.shape)
    assert seg.segment(volume, prompts, three_d=False).params["adapter_design"] == "msa"
    samus = AdaptedSam(build_backbone("tiny"), AdapterSettings(design="samus", head="linear"), labels=("spleen",))
    publish_adapters(samus, tmp_path / "adapters", {"prompt_free_head_trained": True})
    out = seg.segment(volume, prompts, three_d=False)
    assert out.params["adapter_design"] == "samus" and seg.current().model.adapter_settings.head == "linear"
    auto = seg.segment_auto(volume)
    assert auto.params["adapter_design"] == "samus" and auto.params["head"] == "linear"
    publish_adapters(_model("tiny", labels=("spleen",)), tmp_path / "adapters", {})
    assert seg.segment(volume, prompts, three_d=False).params["adapter_design"] == "msa"
