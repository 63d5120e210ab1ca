"""The ``depth`` design (lib/core/depth.py): each slice encoded with its neighbours, a depth adapter per
encoder block; exact base outputs when untrained, neighbour context once trained, through inference
(cache, prefetch, 3D), training samples and the encoder runtimes."""

from __future__ import annotations

import copy
import threading

import nibabel as nib
import numpy as np
import torch

from conftest import SAMPLE
from lib.core.backbones import build_backbone
from lib.core.config import AdapterSettings, parse_profile
from lib.core.model import AdaptedSam, part_of
from lib.core.orientation import SliceView

LABELS = ("spleen",)


def _model(backbone: str, design: str = "depth") -> AdaptedSam:
    return AdaptedSam(build_backbone(backbone), AdapterSettings(design=design), labels=LABELS)


def _ct_stack(k: int = 13) -> torch.Tensor:
    """Slices k-1, k, k+1 of the shipped spleen CT (soft-tissue window) as a (1, 3, 3, 256, 256) input."""
    ct = np.asarray(nib.load(SAMPLE / "spleen_ct.nii.gz").dataobj, dtype=np.float32)[:, :, k - 1 : k + 2]
    x = torch.from_numpy(np.clip((ct - (40 - 200)) / 400, 0, 1)).permute(2, 0, 1)[:, None]
    x = torch.nn.functional.interpolate(x, size=(256, 256), mode="bilinear")
    return x.repeat(1, 3, 1, 1)[None]


def _depth_outputs(model: AdaptedSam) -> dict[str, torch.nn.Parameter]:
    """The depth adapters' zero-initialised output projections."""
    return {n: p for n, p in model.named_parameters() if n.startswith("image_encoder.") and ".mlp.adapter.up." in n}


def _perturb_depth_adapters(model: AdaptedSam, std: float = 0.05) -> None:
    with torch.no_grad():
        for name, p in _depth_outputs(model).items():
            p.normal_(0, std, generator=torch.Generator().manual_seed(len(name)))


def test_untrained_depth_gives_exactly_the_base_outputs_on_the_real_weights():
    stack = _ct_stack()
    base, depth = _model("lite_medsam", "msa"), _model("lite_medsam")
    assert depth.depth_slices == 3 and base.depth_slices == 1
    box = torch.tensor([[60.0, 70.0, 150.0, 170.0]])
    with torch.no_grad():
        base_emb = base.encode(stack[:, 1])
        emb = depth.encode(stack)
        assert torch.equal(emb, base_emb)
        assert torch.equal(depth.decode(emb, boxes=box).low_res_logits, base.decode(base_emb, boxes=box).low_res_logits)
        assert torch.equal(base.encode(stack), base_emb)  # other designs embed a stack's middle slice alone
    names = [n for n, _ in depth.named_parameters() if part_of(n) == "encoder_adapters"]
    assert any(".mlp.adapter.mix." in n for n in names)  # the depth branch
    assert any(".mlp.inner.adapter." in n for n in names) and any(".attn.adapter." in n for n in names)  # msa's
    counts, msa_counts = depth.parameter_counts(), base.parameter_counts()
    assert msa_counts["encoder_adapters"] < counts["encoder_adapters"] < 2 * msa_counts["encoder_adapters"]


def test_untrained_depth_on_a_small_random_vit_keeps_the_base_outputs():
    stack = torch.rand(1, 3, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(_model("tiny_vit").encode(stack), _model("tiny_vit", "msa").encode(stack[:, 1]))


def test_depth_adapters_train_and_mix_the_neighbours_thread_safely():
    model = _model("tiny")
    model.freeze_all_but(["encoder_adapters"])
    stack = torch.rand(2, 3, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    model.encode(stack).square().mean().backward()
    grads = {n: p.grad for n, p in _depth_outputs(model).items()}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    _perturb_depth_adapters(model)
    other = stack.clone()
    other[:, 0] = 0  # another slice above
    with torch.no_grad():
        emb = model.encode(stack)
        assert not torch.allclose(model.encode(other), emb)
        assert torch.allclose(model.encode(stack[1:]), emb[1:], atol=1e-5)  # items never mix
    clone = copy.deepcopy(model)
    got: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        with torch.no_grad():
            got[i] = (model if i % 2 else clone).encode(stack if i < 2 else stack[:, 1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with torch.no_grad():
        single = model.encode(stack[:, 1])  # one slice alone: a stack of three copies of it
        assert torch.allclose(single, model.encode(stack[:, 1:2].expand(-1, 3, -1, -1, -1)), atol=1e-6)
    assert all(torch.allclose(got[i], emb, atol=1e-5) for i in (0, 1))
    assert all(torch.allclose(got[i], single, atol=1e-5) for i in (2, 3))


def test_activation_checkpointing_gives_the_same_gradients_with_less_kept():
    from lib.core.adapters import set_checkpointing

    grads = []
    for on in (False, True):
        model = _model("tiny")
        _perturb_depth_adapters(model)
        model.freeze_all_but(["encoder_adapters"])
        assert set_checkpointing(model.image_encoder, on) > 0
        stack = torch.rand(2, 3, 3, 256, 256, generator=torch.Generator().manual_seed(3))
        model.encode(stack).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(grads[0], grads[1])


def test_slice_stack_repeats_the_end_slices():
    volume = np.arange(4 * 5 * 3).reshape(4, 5, 3)
    view = SliceView(axis=2, transpose=False, flip_rows=False, flip_cols=False, spacing=(1.0, 1.0))
    assert np.array_equal(view.stack(volume, 1, 1), view.slice(volume, 1))
    for k, expected in ((0, (0, 0, 1)), (1, (0, 1, 2)), (2, (1, 2, 2))):
        stack = view.stack(volume, k, 3)
        assert stack.shape == (3, 4, 5)
        assert all(np.array_equal(stack[i], view.slice(volume, j)) for i, j in enumerate(expected))


def test_segmenter_serves_depth_with_neighbour_context(tmp_path):
    """A published depth checkpoint is served by a depth model: answers say so, an edit of a neighbouring
    slice is a new embedding, prefetch and 3D work, and the OpenVINO encoder graph takes slice stacks."""
    from lib.core.engine import InteractiveSegmenter, publish_adapters
    from lib.core.prompts import parse_prompts
    from lib.core.volume import Volume, load_volume
    from lib.serving.runtimes import RuntimeEncoder, relative_error

    profile = parse_profile({"name": "tiny", "backbone": "tiny", "labels": list(LABELS)})
    seg = InteractiveSegmenter(profile, adapter_dir=tmp_path / "adapters", device="cpu")
    depth = _model("tiny")
    _perturb_depth_adapters(depth)
    publish_adapters(depth, tmp_path / "adapters", {})
    path = SAMPLE / "spleen_ct.nii.gz"
    volume = load_volume(path)
    prompts = parse_prompts({"foreground": [[60, 80, 12]]}, volume.shape)
    first = seg.segment(volume, prompts, three_d=False)
    assert first.params["adapter_design"] == "depth" and not first.params["embedding_cached"]
    assert seg.segment(volume, prompts, three_d=False).params["embedding_cached"]
    edited = volume.array.copy()
    edited[:, :, 13] += 100.0  # only the slice above the prompted one changes
    other = Volume(edited, volume.affine)
    assert not seg.segment(other, prompts, three_d=False).params["embedding_cached"]
    assert seg.prefetch(path, 5) and seg.has_embedding(path, 5) and not seg.prefetch(path, 5)
    box = parse_prompts({"roi": [40, 50, 12, 90, 110, 12]}, volume.shape)
    assert seg.segment(volume, box, three_d=True).label.any()
    model = seg.current().model
    encoder = RuntimeEncoder(model, "openvino_fp32", cache_dir=tmp_path / "ov")
    assert encoder.prepare().name == "openvino_fp32", encoder.failures  # the graph takes slice stacks
    stack = torch.rand(1, 3, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_error(encoder(stack), model.encode(stack)) < 1e-3


def test_depth_training_samples_carry_the_neighbours(tmp_path):
    from lib.core.config import PreprocessSettings
    from lib.core.training import AdapterTrainer, LabelledVolume, TrainSettings, prepare_samples

    model = _model("tiny")
    model.freeze_all_but(["encoder_adapters", "decoder_adapters"])
    settings = TrainSettings(max_epochs=1, steps_per_epoch=1, batch_size=2, max_slices_per_volume=2,
                             train_encoder_adapters=True, patience=1)
    label = SAMPLE / "reference" / "spleen_ct.nii.gz"
    volumes = [LabelledVolume(SAMPLE / "spleen_ct.nii.gz", label, {1: "spleen"}, "spleen")]
    samples = prepare_samples(model, volumes, PreprocessSettings(), settings, torch.device("cpu"))
    assert samples and all(s.model_input.shape == (1, 3, 3, 256, 256) for s in samples)
    before = {n: p.detach().clone() for n, p in _depth_outputs(model).items()}
    AdapterTrainer(model, settings, torch.device("cpu")).fit(samples, [], feed_logits_before=False)
    assert any(not torch.equal(p, before[n]) for n, p in _depth_outputs(model).items())
