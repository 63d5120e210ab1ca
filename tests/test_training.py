"""Training core on the tiny model: only adapters and heads change, splits are reproducible, the
simulated annotator places clicks where the protocol says, request options are parsed strictly."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import SAMPLE
from lib.core.annotator import dice, interior_point, jittered_box, largest_error_click
from lib.core.backbones import build_backbone
from lib.core.config import AdapterSettings, PreprocessSettings
from lib.core.model import AdaptedSam, part_of
from lib.core.training import (
    AdapterTrainer,
    LabelledVolume,
    TrainingDataError,
    TrainSettings,
    object_weights,
    prepare_samples,
    split_volumes,
    trained_rounds,
)
from lib.trainers.adapter_train import AdapterTrainTask, names_from_label_info

SPLEEN = LabelledVolume(SAMPLE / "spleen_ct.nii.gz", SAMPLE / "reference" / "spleen_ct.nii.gz", {1: "spleen"}, "s")


def test_interior_point_is_the_distance_transform_maximum():
    m = np.zeros((9, 15), bool)
    m[2:7, 1:14] = True  # 5 x 13 rectangle: centre row 4, any column far from the short sides
    r, c = interior_point(m)
    assert r == 4 and 3 <= c <= 11


def test_next_click_goes_to_the_largest_error_with_the_right_sign():
    gt = np.zeros((20, 20), bool)
    gt[2:12, 2:12] = True
    pred = gt.copy()
    pred[2:12, 2:5] = False  # 30 missed pixels
    pred[15:18, 15:17] = True  # 6 extra pixels
    r, c, positive = largest_error_click(pred, gt)
    assert positive and 2 <= c < 5 and 2 <= r < 12
    pred = gt.copy()
    pred[14:20, 14:20] = True  # only an extra region
    r, c, positive = largest_error_click(pred, gt)
    assert not positive and r >= 14 and c >= 14
    assert largest_error_click(gt, gt) is None


def test_box_jitter_only_grows_the_box():
    gt = np.zeros((30, 30), bool)
    gt[10:20, 12:18] = True
    rng = np.random.default_rng(0)
    for _ in range(20):
        r0, c0, r1, c1 = jittered_box(gt, rng, 5)
        assert 5 <= r0 <= 10 and 7 <= c0 <= 12 and 19 <= r1 <= 24 and 17 <= c1 <= 22
    assert jittered_box(gt, None, 5) == (10, 12, 19, 17)
    assert dice(gt, gt) == 1.0 and dice(gt, ~gt) == 0.0


def test_split_is_shuffled_reproducible_and_explains_small_sets():
    vols = [LabelledVolume(SAMPLE / f"{i}.nii.gz", SAMPLE / f"{i}.nii.gz", {}, str(i)) for i in range(10)]
    a = split_volumes(vols, 0.2, seed=3)
    b = split_volumes(vols, 0.2, seed=3)
    assert [v.image_id for v in a[1]] == [v.image_id for v in b[1]] and len(a[1]) == 2
    assert [v.image_id for v in a[1]] != ["0", "1"] or [v.image_id for v in split_volumes(vols, 0.2, 4)[1]] != [
        "0",
        "1",
    ]
    train, val, note = split_volumes(vols[:1], 0.2, seed=0)
    assert val == [] and "no validation split" in note and "at least 2" in note


def test_training_changes_only_adapters_and_heads():
    torch.manual_seed(0)
    model = AdaptedSam(build_backbone("tiny"), AdapterSettings(), labels=("spleen",))
    model.freeze_all_but(["decoder_adapters", "hypernetworks", "prompt_free_head", "encoder_adapters"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(max_epochs=1, steps_per_epoch=2, max_slices_per_volume=2, train_encoder_adapters=True)
    samples = prepare_samples(model, [SPLEEN], PreprocessSettings(), settings, torch.device("cpu"))
    assert samples and samples[0].model_input is not None and samples[0].embedding is None
    assert samples[0].head_target is not None and set(np.unique(samples[0].head_target)) <= {0, 1}
    result = AdapterTrainer(model, settings, torch.device("cpu")).fit(samples, [], feed_logits_before=False)
    assert result.best_state is not None and result.epochs_run == 1
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing was trained"
    # every changed tensor belongs to a trainable part; batch-norm statistics of the encoder are untouched
    assert all(
        part_of(k) in ("decoder_adapters", "hypernetworks", "prompt_free_head", "encoder_adapters") for k in changed
    ), sorted(changed)[:5]
    assert any(part_of(k) == "encoder_adapters" for k in changed)


def test_bf16_encoder_training_autocasts_the_trained_passes_only():
    torch.manual_seed(0)
    model = AdaptedSam(build_backbone("tiny"), AdapterSettings(), labels=("spleen",))
    model.freeze_all_but(["decoder_adapters", "encoder_adapters"])
    settings = TrainSettings(max_epochs=1, steps_per_epoch=2, max_slices_per_volume=2, train_encoder_adapters=True,
                             encoder_precision="bf16")
    cpu = torch.device("cpu")
    samples = prepare_samples(model, [SPLEEN], PreprocessSettings(), settings, cpu)
    bf16 = AdapterTrainer(model, settings, cpu)
    fp32 = AdapterTrainer(model, replace(settings, encoder_precision="fp32"), cpu)
    reference = fp32._embed(samples[:1], grad=False)
    assert torch.equal(bf16._embed(samples[:1], grad=False), reference)  # validation is never autocast
    trained = bf16._embed(samples[:1], grad=True)
    assert trained.dtype == torch.float32 and trained.requires_grad  # the decoder and the losses stay fp32
    assert torch.equal(fp32._embed(samples[:1], grad=True).detach(), reference)
    error = float((trained.detach() - reference).norm() / reference.norm())
    assert 0 < error < 0.05, error  # bf16 rounding, nothing more
    encoder = {k: v.clone() for k, v in model.state_dict().items() if part_of(k) == "encoder_adapters"}
    result = bf16.fit(samples, [], feed_logits_before=False)
    assert result.epochs_run == 1 and np.isfinite(result.history[0]["loss"])
    after = model.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in encoder.items())
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())


def test_a_training_step_encodes_each_slice_once_for_sessions_and_head():
    """Objects of one slice and the prompt-free head share one encoder pass (with gradients) per step,
    and the step's loss is the sessions' plus the head's, as when each encoded its own."""
    torch.manual_seed(0)
    model = AdaptedSam(build_backbone("tiny"), AdapterSettings(), labels=("spleen", "other"))
    model.freeze_all_but(["decoder_adapters", "encoder_adapters", "prompt_free_head"])
    settings = TrainSettings(max_slices_per_volume=2, train_encoder_adapters=True, box_probability=0.5)
    samples = prepare_samples(model, [SPLEEN], PreprocessSettings(), settings, torch.device("cpu"))
    obj = samples[0].objects[0]
    halves = np.zeros_like(obj)
    halves[:, : int(np.flatnonzero(obj.any(0)).mean())] = True  # two objects of one slice
    items = [(samples[0], obj & halves), (samples[0], obj & ~halves), (samples[1], samples[1].objects[0])]
    trainer = AdapterTrainer(model, settings, torch.device("cpu"))
    encoded = []
    encode = model.encode
    model.encode = lambda x: encoded.append(len(x)) or encode(x)
    shared = trainer.step_loss(items, np.random.default_rng(2))
    assert encoded == [2], encoded  # two slices, one pass
    encoded.clear()
    separate = trainer.interactive_loss(items, np.random.default_rng(2)) + trainer.head_step_loss(samples[:2])
    assert len(encoded) >= 2 and sum(encoded) > 2  # the old way: once per prompt group and again for the head
    assert torch.allclose(shared, separate, atol=1e-5), (float(shared), float(separate))
    shared.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if part_of(n) == "encoder_adapters")


def test_labels_of_the_wrong_shape_are_refused(tmp_path):
    import nibabel as nib

    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), np.eye(4)), str(bad))
    model = AdaptedSam(build_backbone("tiny"), AdapterSettings())
    with pytest.raises(TrainingDataError, match="shape"):
        prepare_samples(model, [LabelledVolume(SPLEEN.image, bad)], PreprocessSettings(), TrainSettings(), "cpu")


def test_label_names_come_from_label_info_in_order():
    info = {"label_info": [{"name": "spleen", "idx": 7}, {"name": "liver", "idx": 1}], "client_id": "x"}
    assert names_from_label_info(info) == {1: "spleen", 2: "liver"}
    assert names_from_label_info({}) == {}


def test_train_options_parse_like_clients_send_them():
    settings, publish = AdapterTrainTask.settings_from_request(
        {
            "max_epochs": "3",
            "learning_rate": [0.001, 0.01],
            "val_split": 0.25,
            "train_encoder_adapters": "false",
            "publish": ["always", "if_better"],
            "tracking": "mlflow",
            "client_id": "slicer",
        }
    )
    assert settings.max_epochs == 3 and settings.learning_rate == 0.001 and settings.val_fraction == 0.25
    assert settings.train_encoder_adapters is False and publish == "always"
    chosen, _ = AdapterTrainTask.settings_from_request({"selection_metric": "click1_dice"})
    assert chosen.selection_metric == "click1_dice"
    for bad in ({"max_epochs": "many"}, {"max_epochs": 0}, {"learning_rate": -1}, {"publish": "sometimes"},
                {"selection_metric": "loss"}, {"lone_click_share": 1.5}, {"encoder_precision": "fp16"},
                {"encoder_checkpointing": "sometimes"}):
        with pytest.raises(TrainingDataError):
            AdapterTrainTask.settings_from_request(bad)


def test_distributed_training_with_two_gloo_processes_keeps_ranks_in_step(tmp_path):
    from lib.core.config import parse_profile
    from lib.core.distributed import DistributedJob, train_distributed

    profile = parse_profile({"name": "tiny", "backbone": "tiny", "labels": ["spleen"]})
    settings = TrainSettings(max_epochs=2, steps_per_epoch=2, max_slices_per_volume=2, batch_size=2)
    parts = ("decoder_adapters", "hypernetworks", "prompt_free_head")
    job = DistributedJob(profile, None, parts, (SPLEEN,), (SPLEEN,), settings, False, tmp_path, "gloo")
    result = train_distributed(job, world=2)
    assert result.epochs_run >= 1 and "box_dice" in result.before
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)["final_state"]
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)["final_state"]
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks diverged: gradients were not averaged"
    fresh = AdaptedSam.from_profile(profile).adaptable_state()
    assert any(not torch.equal(rank0[k], fresh[k]) for k in rank0 if part_of(k) in parts)


def test_size_balanced_sampling_gives_every_size_class_the_same_share():
    def square(side: int) -> np.ndarray:
        m = np.zeros((64, 64), bool)
        m[:side, :side] = True
        return m

    # nine large organ cross-sections (~1000 px) and one small lesion (9 px)
    masks = [square(32)] * 9 + [square(3)]
    w = object_weights(masks)
    assert w.sum() == pytest.approx(1.0)
    assert w[-1] == pytest.approx(0.5) and w[:9].sum() == pytest.approx(0.5)


def test_a_lone_click_trains_only_the_best_of_three_masks():
    torch.manual_seed(0)
    model = AdaptedSam(build_backbone("tiny"), AdapterSettings(), labels=("spleen",))
    trainer = AdapterTrainer(model, TrainSettings(multimask_single_click=True), torch.device("cpu"))
    one = torch.zeros(1, 1, 4, 4)
    one[..., :2, :2] = 1
    good = (one * 2 - 1) * 20  # logits that match the target
    bad = -good
    three = torch.cat([bad, good, bad], dim=1)
    perfect_iou = torch.tensor([[0.0, 1.0, 0.0]])
    # the loss of three masks is the loss of the best one (plus the IoU head's error on all three)
    best_alone = float(trainer._round_loss(good, perfect_iou[:, 1:2], one))
    assert float(trainer._round_loss(three, perfect_iou, one)) == pytest.approx(best_alone, abs=1e-4)
    assert trainer._round_loss(three, perfect_iou, one) < trainer._round_loss(bad, torch.zeros(1, 1), one)
    # three masks only for one click alone: not with a box, a second click or fed-back logits
    click = (torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.int64))
    two = (torch.zeros(1, 2, 2), torch.ones(1, 2, dtype=torch.int64))
    assert trainer._multimask(click, None, None)
    assert not trainer._multimask(two, None, None)
    assert not trainer._multimask(click, torch.zeros(1, 4), None)
    assert not trainer._multimask(click, None, torch.zeros(1, 1, 8, 8))
    off = AdapterTrainer(model, TrainSettings(multimask_single_click=False), torch.device("cpu"))
    assert not off._multimask(click, None, None)


def test_negative_click_rounds_get_the_requested_share_of_training():
    rng = np.random.default_rng(0)
    negative = np.zeros((10, 2), bool)
    negative[[3, 6], 0] = True  # object 0 had two removing clicks, object 1 none
    drawn = np.array([1, 1])
    picks = np.array([trained_rounds(drawn, negative, 0.5, rng) for _ in range(2000)])
    assert set(picks[:, 1]) == {1}, "an object without a negative click keeps its drawn round"
    assert set(picks[:, 0]) == {1, 3, 6}
    assert np.mean(picks[:, 0] != 1) == pytest.approx(0.5, abs=0.05)
    assert (trained_rounds(drawn, negative, 0.0, rng) == drawn).all()


def test_lone_click_share_trains_the_click_alone_that_often():
    """``lone_click_share = 1``: a session started by a click always trains its first answer (one click, no
    fed-back logits); without it, later rounds are trained too."""
    torch.manual_seed(0)
    model = AdaptedSam(build_backbone("tiny"), AdapterSettings(), labels=("spleen",))
    model.freeze_all_but(["decoder_adapters"])
    settings = TrainSettings(max_slices_per_volume=2, click_rounds=3, box_probability=0.0)
    samples = prepare_samples(model, [SPLEEN], PreprocessSettings(), settings, torch.device("cpu"))
    items = [(s, o) for s in samples for o in s.objects][:2]

    def trained_prompts(share: float) -> list[tuple[int, bool]]:
        """(clicks, logits fed back) of the trained round of each session over several seeds."""
        trainer = AdapterTrainer(model, replace(settings, lone_click_share=share), torch.device("cpu"))
        seen = []
        original = trainer._decode_each

        def spy(emb, boxes, prompts):
            seen.append([(p[0][0].shape[1], p[1] is not None) for p in prompts])
            return original(emb, boxes, prompts)

        trainer._decode_each = spy
        out = []
        for seed in range(6):
            trainer.interactive_loss(items, np.random.default_rng(seed))
            out += seen[-1]  # the last decode of a step is the trained one
        return out

    assert set(trained_prompts(1.0)) == {(1, False)}
    assert any(fed for _, fed in trained_prompts(0.0)), "without the share later rounds are trained"


def test_a_session_trains_the_chosen_rounds_end_to_end():
    """With every trained round a negative one when possible, a step still runs, yields a finite loss and
    gradients for the decoder's adapters only."""
    torch.manual_seed(0)
    model = AdaptedSam(build_backbone("tiny"), AdapterSettings(), labels=("spleen",))
    model.freeze_all_but(["decoder_adapters"])
    settings = TrainSettings(max_slices_per_volume=2, click_rounds=4, negative_click_share=1.0, box_probability=0.5)
    samples = prepare_samples(model, [SPLEEN], PreprocessSettings(), settings, torch.device("cpu"))
    items = [(s, o) for s in samples for o in s.objects][:4]
    loss = AdapterTrainer(model, settings, torch.device("cpu")).interactive_loss(items, np.random.default_rng(1))
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(part_of(n) == "decoder_adapters" for n in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_served_sessions_refine_what_inference_shows_and_never_train_the_first_answer():
    """With ``served`` answers the simulated annotator starts from what inference shows (a box alone: the
    bare model's answer; a lone click: its scale choice), which is never a trained round, and a correction
    keeps the previous answer away from the clicks it got wrong."""
    from lib.core.config import InferenceSettings
    from lib.core.served_session import ServedAnswers

    torch.manual_seed(0)
    model = AdaptedSam(build_backbone("tiny"), AdapterSettings(), labels=("spleen",))
    bare = AdaptedSam(build_backbone("tiny"), AdapterSettings(), labels=("spleen",))
    with torch.no_grad():  # the trained model differs from the bare one
        for p in model.mask_decoder.output_upscaling.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.freeze_all_but(["decoder_adapters", "output_upscaling"])
    served = ServedAnswers(bare, InferenceSettings())
    settings = TrainSettings(max_slices_per_volume=2, click_rounds=2)
    samples = prepare_samples(model, [SPLEEN], PreprocessSettings(), settings, torch.device("cpu"))
    assert all(s.geometry is not None and s.geometry.mm_per_pixel > 0 for s in samples)
    sample, obj = samples[0], samples[0].objects[0]
    box = AdapterTrainer(model, settings, torch.device("cpu"), served)._box([jittered_box(obj, None, 0)])
    assert torch.equal(served.box(sample.embedding, box), bare.decode(sample.embedding, boxes=box).low_res_logits)
    for box_probability in (1.0, 0.0):  # box sessions, click sessions
        trainer = AdapterTrainer(model, replace(settings, box_probability=box_probability), torch.device("cpu"),
                                 served)
        calls = []
        original = trainer._decode_each

        def spy(emb, boxes, prompts, calls=calls, original=original):
            calls.append([p[1] is not None for p in prompts])  # rounds after the first have fed-back logits
            return original(emb, boxes, prompts)

        trainer._decode_each = spy
        for seed in range(4):
            loss = trainer.interactive_loss([(sample, obj)] * 2, np.random.default_rng(seed))
            assert torch.isfinite(loss) and all(calls[-1]), "the trained round is a correction round"
    # a correction: the leak under the background click goes, an unrelated change is not taken
    previous = torch.full((1, 1, 8, 8), -5.0)
    previous[..., :5, :5] = 5.0
    previous[..., 6:, 6:] = 5.0  # a leak, clicked away at (7, 7)
    new = previous.clone()
    new[..., 6:, 6:] = -5.0  # the model removed it ...
    new[..., :3, 6:] = 5.0  # ... and grew elsewhere, where no click asked
    kept = served.correction(previous, new, [(1, 1, 1), (7, 7, 0)])
    assert kept[0, 0, 7, 7] < 0 and kept[0, 0, 1, 1] > 0 and not (kept[0, 0, :3, 6:] > 0).any()
