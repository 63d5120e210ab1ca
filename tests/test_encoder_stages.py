"""The encoder split into a kept front and a trained back: the same embedding as the whole encoder, and
training from kept fronts changes the same parameters, by the same amount, as training the whole encoder
with its front frozen."""

from __future__ import annotations

import pytest
import torch

from conftest import SAMPLE
from lib.core.backbones import build_backbone
from lib.core.checkpoint import AdapterCheckpoint
from lib.core.config import AdapterSettings, PreprocessSettings
from lib.core.encoder_stages import (
    EncoderSplitError,
    encode_back,
    encode_front,
    freeze_front,
    front_prefixes,
    stage_count,
)
from lib.core.model import AdaptedSam, part_of
from lib.core.training import AdapterTrainer, LabelledVolume, TrainSettings, prepare_samples

SPLEEN = LabelledVolume(SAMPLE / "spleen_ct.nii.gz", SAMPLE / "reference" / "spleen_ct.nii.gz", {1: "spleen"}, "s")


def _trained_looking(backbone: str) -> AdaptedSam:
    """A model whose encoder adapters are not inert (random up-projections), so they change the embedding."""
    model = AdaptedSam(build_backbone(backbone), AdapterSettings(), labels=("spleen",))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if name.startswith("image_encoder.") and ".adapter.up." in name:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("backbone", ["tiny", "tiny_vit"])
def test_front_then_back_is_the_whole_encoder(backbone):
    model = _trained_looking(backbone)
    x = torch.rand(2, 3, model.img_size, model.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model.encode(x)
        for n in range(1, stage_count(model)):
            assert torch.allclose(encode_back(model, encode_front(model, x, n), n), whole, atol=1e-5), n


@pytest.mark.parametrize("backbone", ["tiny", "tiny_vit"])
def test_adapters_trained_in_the_back_leave_the_kept_fronts_valid(backbone):
    """A round that continues from a back-trained checkpoint reuses the stored fronts: the front's part of
    the checkpoint is fresh, and the front's output equals the base model's."""
    base = AdaptedSam(build_backbone(backbone), AdapterSettings(), labels=("spleen",))
    fresh = base.adaptable_state()
    trained = _trained_looking(backbone)
    n = stage_count(trained) - 1
    front = front_prefixes(trained, n)
    with torch.no_grad():  # the front's adapters back to fresh: only the back stays trained
        for name, p in trained.named_parameters():
            if name.startswith(front) and name in fresh:
                p.copy_(fresh[name])
    checkpoint = AdapterCheckpoint.from_model(trained, 1)
    assert front[0] == "image_encoder.patch_embed." and len(front) == n + 1
    assert checkpoint.changes_encoder(fresh) and not checkpoint.changes_encoder(fresh, front)
    x = torch.rand(1, 3, base.img_size, base.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(encode_front(trained, x, n), encode_front(base, x, n))
        assert not torch.allclose(trained.encode(x), base.encode(x))
    # a checkpoint whose front is trained changes the kept fronts
    assert AdapterCheckpoint.from_model(_trained_looking(backbone), 1).changes_encoder(fresh, front)


def test_designs_and_split_points_that_cannot_split_are_refused():
    model = AdaptedSam(build_backbone("tiny"), AdapterSettings())
    for n in (0, stage_count(model), -1):
        with pytest.raises(EncoderSplitError, match="kept front must be 1 to"):
            encode_front(model, torch.zeros(1, 3, 256, 256), n)
    for design in ("depth", "samus"):
        other = AdaptedSam(build_backbone("tiny"), AdapterSettings(design=design))
        with pytest.raises(EncoderSplitError, match=f"not '{design}'"):
            stage_count(other)


def test_training_from_kept_fronts_equals_training_the_whole_encoder_with_its_front_frozen():
    parts = ["decoder_adapters", "hypernetworks", "encoder_adapters"]
    settings = TrainSettings(
        max_epochs=1, steps_per_epoch=2, max_slices_per_volume=2, batch_size=2, train_encoder_adapters=True,
        train_prompt_free_head=False, learning_rate=1e-3,
    )
    states = []
    for front in (2, 0):
        model = _trained_looking("tiny")
        model.freeze_all_but(parts)
        if not front:
            freeze_front(model, 2)  # the whole encoder runs every step, its first two stages frozen
        use = TrainSettings(**{**settings.__dict__, "encoder_front_stages": front})
        samples = prepare_samples(model, [SPLEEN], PreprocessSettings(), use, torch.device("cpu"))
        kept = [s.encoder_front is not None for s in samples]
        assert all(kept) if front else not any(kept)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        AdapterTrainer(model, use, torch.device("cpu")).fit(samples, [], feed_logits_before=False)
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        front_modules = ("image_encoder.patch_embed.", "image_encoder.layers.0.", "image_encoder.layers.1.")
        assert not any(k.startswith(front_modules) for k in changed), sorted(changed)[:3]
        assert any(part_of(k) == "encoder_adapters" for k in changed)  # the back's adapters trained
        states.append(after)
    kept, whole = states
    # Adam's steps are about the learning rate wherever a gradient is not zero; float rounding of the two
    # paths' sums differs, so allow a twentieth of one step
    worst = max((kept[n] - whole[n]).abs().max().item() for n in kept)
    assert worst < 0.05 * settings.learning_rate, worst
