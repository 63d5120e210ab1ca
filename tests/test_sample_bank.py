"""Sample banks (lib/core/sample_bank.py): prepared training samples written once and read where the
scans are not (a lent GPU machine) give the same samples: labels and objects exact, model inputs within
8-bit rounding, slices kept at their own size or the model's, slice stacks for `depth`; a round trains
from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SAMPLE
from lib.core.backbones import build_backbone
from lib.core.config import AdapterSettings, PreprocessSettings
from lib.core.model import AdaptedSam
from lib.core.sample_bank import SampleBankError, load_samples, save_samples
from lib.core.training import AdapterTrainer, LabelledVolume, TrainSettings, prepare_samples
from lib.core.volume import Volume, load_volume

SPLEEN = LabelledVolume(SAMPLE / "spleen_ct.nii.gz", SAMPLE / "reference" / "spleen_ct.nii.gz", {1: "spleen"}, "s")
SETTINGS = TrainSettings(max_slices_per_volume=3, train_encoder_adapters=True, batch_size=2, click_rounds=2)


def _spleen_at_twice_the_resolution() -> LabelledVolume:
    """The shipped spleen CT with every in-plane voxel repeated 2x2 (328x332 slices, larger than 256)."""
    image, label = load_volume(SPLEEN.image), load_volume(SPLEEN.label)
    affine = image.affine @ np.diag([0.5, 0.5, 1.0, 1.0])
    twice = [Volume(np.repeat(np.repeat(v.array, 2, 0), 2, 1), affine) for v in (image, label)]
    return LabelledVolume(*twice, SPLEEN.names, "s2")


def _roundtrip(model: AdaptedSam, tmp_path, volume: LabelledVolume = SPLEEN) -> tuple[list, list]:
    samples = prepare_samples(model, [volume], PreprocessSettings(), SETTINGS, torch.device("cpu"), keep_slices=True)
    save_samples(samples, tmp_path / "bank.npz.xz")
    return samples, load_samples(tmp_path / "bank.npz.xz")


@pytest.mark.parametrize(
    ("backbone", "design", "twice"), [("lite_medsam", "msa", False), ("tiny", "msa", True), ("tiny", "depth", True)]
)
def test_a_bank_gives_back_the_prepared_samples(tmp_path, backbone, design, twice):
    """The 164x166 spleen slices are upsampled into the 256 px input: kept at their own size; at twice
    the resolution they are downsampled: kept as the model sees them; depth keeps the three-slice stack."""
    model = AdaptedSam(build_backbone(backbone), AdapterSettings(design=design), labels=("spleen",))
    samples, loaded = _roundtrip(model, tmp_path, _spleen_at_twice_the_resolution() if twice else SPLEEN)
    assert len(loaded) == len(samples) == 3
    frame = samples[0].frame
    assert (frame.rows * frame.cols > np.prod(frame.resized)) == twice  # both ways of keeping a slice
    for a, b in zip(samples, loaded, strict=True):
        assert (a.source, a.k, a.frame, a.geometry) == (b.source, b.k, b.frame, b.geometry)
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.head_target, b.head_target)
        assert len(a.objects) == len(b.objects)
        assert all(np.array_equal(x, y) for x, y in zip(a.objects, b.objects, strict=True))
        assert b.model_input.shape == a.model_input.shape
        assert float((a.model_input - b.model_input).abs().max()) <= 1 / 510 + 1e-6
    assert loaded[0].model_input.ndim == (5 if design == "depth" else 4)


def test_a_round_trains_from_a_bank(tmp_path):
    torch.manual_seed(0)
    model = AdaptedSam(build_backbone("tiny"), AdapterSettings(), labels=("spleen",))
    model.freeze_all_but(["decoder_adapters", "encoder_adapters"])
    _, loaded = _roundtrip(model, tmp_path)
    before = {k: v.clone() for k, v in model.adaptable_state().items()}
    settings = TrainSettings(max_epochs=1, steps_per_epoch=2, batch_size=2, click_rounds=2, train_encoder_adapters=True)
    result = AdapterTrainer(model, settings, torch.device("cpu")).fit(loaded, [], feed_logits_before=False)
    assert result.epochs_run == 1
    changed = [k for k, v in model.adaptable_state().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("image_encoder.") for k in changed) and any(k.startswith("mask_decoder.") for k in changed)


def test_samples_without_slices_and_other_files_are_refused(tmp_path):
    model = AdaptedSam(build_backbone("tiny"), AdapterSettings(), labels=("spleen",))
    samples = prepare_samples(model, [SPLEEN], PreprocessSettings(), SETTINGS, torch.device("cpu"))
    with pytest.raises(SampleBankError, match="keep_slices"):
        save_samples(samples, tmp_path / "bank.npz.xz")
    (tmp_path / "other.npz.xz").write_bytes(b"not a bank")
    with pytest.raises(SampleBankError, match="not a sample bank"):
        load_samples(tmp_path / "other.npz.xz")
