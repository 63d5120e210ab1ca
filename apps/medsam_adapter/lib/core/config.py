"""Model profiles: one TOML file per profile in ``configs/``, parsed once into typed settings."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

TRAINABLE_PARTS = (
    "encoder_adapters",
    "decoder_adapters",
    "output_upscaling",
    "hypernetworks",
    "iou_head",
    "mask_tokens",
    "prompt_free_head",
)
INTENSITY_MODES = ("auto", "ct", "percentile", "minmax")
# image-encoder runtimes (lib/serving/runtimes.py); auto: on a CPU with OpenVINO, openvino_fp32 or, where bf16
# is native, the faster of it and openvino_mixed measured there; on CUDA the fastest of cuda_graph_fp16,
# cuda_graph (the encoder replayed from CUDA graphs, lib/serving/cuda_graphs.py) and torch_fp16 measured there
ENCODER_RUNTIMES = (
    "auto",
    "torch",
    "torch_bf16",
    "torch_fp16",
    "openvino_fp32",
    "openvino_bf16",
    "openvino_mixed",
    "cuda_graph",
    "cuda_graph_fp16",
)
# mask-decoder runtimes (lib/serving/decoder_runtime.py); auto: OpenVINO fp32 on a CPU where installed;
# openvino_bf16: bf16 where the CPU computes it natively (fp32 elsewhere)
DECODER_RUNTIMES = ("auto", "torch", "openvino_fp32", "openvino_bf16")
# adapter designs (lib/core/adapters.py): msa = Medical SAM Adapter (default), samus = SAMUS's encoder parts,
# depth = 3DSAM-adapter style (each slice encoded with its neighbours, lib/core/depth.py)
ADAPTER_DESIGNS = ("msa", "samus", "depth")
HEADS = ("decoder", "unet", "linear")  # AutoSAM's prompt-free heads (lib/core/heads.py)
DESIGN_OPTIONS = {"adapter_design": ADAPTER_DESIGNS, "head": HEADS}  # train request options


def design_option_problem(options: dict[str, Any]) -> str | None:
    """Why a train request's ``adapter_design`` / ``head`` option is unusable (None when fine or absent).
    A list means its first item (clients send config options as shown)."""
    for key, known in DESIGN_OPTIONS.items():
        value = options.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if value in (None, ""):
            continue
        if value not in known:
            return f"train option {key!r}: unknown {value!r}; known: {list(known)}"
    return None


class ProfileError(ValueError):
    """A model profile is missing, malformed or inconsistent."""


def check_encoder_runtime(name: str, where: str, known: tuple[str, ...] = ENCODER_RUNTIMES) -> str:
    """``name`` when it is one of ``known`` runtimes (the encoder's by default), else a
    :class:`ProfileError` saying ``where``."""
    if name not in known:
        raise ProfileError(f"{where}: unknown runtime {name!r}; known: {list(known)}")
    return name


@dataclass(frozen=True)
class AdapterSettings:
    encoder: bool = True
    decoder: bool = True
    ratio: float = 0.25
    mlp_scale: float = 0.5
    design: str = "msa"  # one of ADAPTER_DESIGNS
    head: str = "decoder"  # prompt-free head, one of HEADS

    def as_dict(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder,
            "decoder": self.decoder,
            "ratio": self.ratio,
            "mlp_scale": self.mlp_scale,
            "design": self.design,
            "head": self.head,
        }


@dataclass(frozen=True)
class PreprocessSettings:
    intensity: str = "auto"  # auto | ct | percentile | minmax
    ct_window: str = "soft_tissue"
    percentiles: tuple[float, float] = (0.5, 99.5)
    per_slice_minmax: bool = True  # LiteMedSAM's own inference rescales each slice to [0, 1]


@dataclass(frozen=True)
class InferenceSettings:
    # a lone click is ambiguous: three masks, the one with the highest predicted IoU kept (SAM).
    # auto: only when the served adapters were trained that way (the base models' extra mask outputs
    # were never trained by MedSAM/LiteMedSAM)
    multimask_for_single_click: str = "auto"  # auto | always | never
    # DeepEdit-style refinement: feed the previous low-res logits back with new clicks.
    # auto: only when the served adapters were trained with mask prompts (the base models never were,
    # and measured on spleen CT, fed-back logits pull a good box result down from Dice 0.96 to 0.85)
    refine_with_logits: str = "auto"  # auto | always | never
    propagate_with_logits: bool = False
    # 3D: prompt the neighbouring slices with the shipped adapters (true) or the bare base model (false);
    # adapters published by training rounds are always used
    propagate_with_shipped_adapters: bool = True
    # a lone foreground click at its object's scale: besides the click alone, the answers to square boxes of
    # these physical sizes (mm) around it (the bare base model's to each box alone when it shares the
    # embedding or the served adapters are the shipped ones, on its own embedding; else the served model's
    # to the click in each box); answers running into more than
    # lone_click_max_contact of their box's sides are dropped and the most stable answer wins, the click
    # alone unless another beats its stability by lone_click_alone_margin / sqrt(its area in pixels)
    # (a small mask's stability is noisier). Empty list: the click alone.
    lone_click_scales_mm: tuple[float, ...] = field(
        default=(20.0, 30.0, 40.0, 60.0, 80.0, 120.0, 160.0, 240.0), metadata={"any_length": True}
    )
    lone_click_max_contact: float = 0.2
    lone_click_alone_margin: float = 3.0
    # ... and to the same boxes moved onto the centroids of their answers (one more decoder pass; people click
    # off an object's centre, where a box of its size centred on the click cuts it), box answers only
    # counting when they hold the click (lib/core/clicks.py recentred_boxes). Off here; lite_medsam.toml: README
    lone_click_recentre: bool = False
    # a moved box's answer replaces the one chosen without them only when at most this many times its area
    lone_click_recentre_growth: float = 1.5
    # ... then the bare model's answer to the kept answer's own tight box (2 model pixels of margin) replaces
    # it when it holds the click, does not run into the box's sides, is at least as stable and overlaps it by
    # IoU >= lone_click_refit (0: off). Off: 0.5 gains a little on CT (whole 512 x 512 slices +0.005 after 5
    # clicks) and loses on the hippocampus (1 click -0.026), where the bare model's boxes are weak (README,
    # round 31)
    lone_click_refit: float = 0.0
    # with the profile's lone_click_checkpoint (shipped adapters only): the lone-click adapters' answer to
    # the click competes too, ahead unless another beats its stability by this margin / sqrt(its area)
    lone_click_adapter: bool = True
    lone_click_adapter_margin: float = 6.0
    # every foreground click inside the answer and every background click outside it (local repair)
    respect_clicks: bool = True
    # the logits fed to the next round give the answer shown: +repair_logit where it shows what they would
    # not (a click's repair), -repair_logit where they hold what it does not (0: the logits as they come)
    repair_logit: float = 4.0
    # a correction click the model ignored also changes the region its image-embedding token says it is
    # about (lib/core/click_features.py): the connected pixels whose tokens are more like the clicked one
    # than like the other side by feature_repair_margin (cosine), within feature_repair_reach times the
    # answer's equivalent radius of the click; a removal over local_max_removal of the answer is not taken
    feature_repair: bool = True
    feature_repair_reach: float = 0.5
    feature_repair_margin: float = 0.05
    # a correction click (previous logits fed back) changes the answer only where the previous answer got
    # a click wrong, and only the way that click asks: the additions touching a missed foreground click, the
    # removals touching a held background click; the rest of the previous answer is kept unless the other
    # changes together are at most local_total_share of the previous answer's area (a refinement)
    local_corrections: bool = True
    local_total_share: float = 0.0
    # ... and never takes a removal at a background click (holding it or touching it, round 25) of more than
    # this share of the previous answer (the previous answer stays there; respect_clicks cuts around the
    # click): a negative click on a leak must not take a large part of the object with it
    local_max_removal: float = 0.25
    # a correction asks the model about one object (lib/core/clicks.py correction_query): part_corrections,
    # only the clicks of the previous answer's part (connected component) its wrong clicks are on; a
    # foreground click outside the answer farther from its nearest part than new_part_gap times that part's
    # equivalent radius starts a new part, answered alone at its own scale and added (0: off), that scale
    # chosen among answers no larger than new_part_max_ratio times the answer's largest part (0: no limit).
    # Off here, on in lite_medsam.toml since round 23 (measured with its shipped adapters; README)
    part_corrections: bool = False
    new_part_gap: float = 0.0
    new_part_max_ratio: float = 1.5
    # a correction's mask prompt (the previous logits) is set to 0, undecided, within this many times the
    # previous answer's equivalent radius of each click the previous answer has on the wrong side, so the
    # model may move the answer there instead of holding to it (lib/core/clicks.py undecided_near_wrong_clicks;
    # 0: off). Off here, 0.5 in lite_medsam.toml since round 24 (measured with its shipped adapters; README)
    correction_prompt_release: float = 0.0
    # a first correction that is a background click at least this many times the answer's equivalent radius
    # inside the lone click's answer (which holds the foreground click) says the answer is the wrong object or
    # scale, not a leak: the click's scale is chosen again among the answers that get both clicks right, and
    # taken when its area differs by 2x or more (lib/core/clicks.py deep_negative; 0: off). Off by default:
    # held-out pooled Dice after 2 clicks fell 0.005 although BraTS gained 0.037 after 5 (README, round 26)
    scale_recheck_depth: float = 0.0
    # box-only requests with the profile's shipped (click) adapters: true uses them, false the bare base
    # model (boxes are what the base model was trained for); adapters from training rounds always serve boxes
    boxes_with_shipped_adapters: bool = False
    propagation_box_margin: int = 3
    propagation_min_area: int = 10
    propagation_min_iou: float = 0.0
    embedding_cache_mb: int = 512
    volume_cache_mb: int = 1024
    encoder_runtime: str = "auto"  # one of ENCODER_RUNTIMES
    decoder_runtime: str = "auto"  # one of DECODER_RUNTIMES
    # concurrent requests' slices encoded as one batch of up to this many (lib/serving/encode_batching.py):
    # 0 (auto) is 8 on CUDA and 1 (each alone) on a CPU
    encode_batch: int = 0


@dataclass(frozen=True)
class ModelProfile:
    """Everything that decides how one model is built, adapted and run."""

    name: str
    backbone: str
    checkpoint: Path | None = None
    adapters: AdapterSettings = field(default_factory=AdapterSettings)
    trainable: tuple[str, ...] = TRAINABLE_PARTS
    preprocessing: PreprocessSettings = field(default_factory=PreprocessSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    labels: tuple[str, ...] = ()
    adapter_checkpoint: Path | None = None  # default adapters shipped with the app (None: bare base model)
    # prompt-free head shipped with the app, loaded on top of whatever is served when that has no trained head
    auto_head_checkpoint: Path | None = None
    # decoder-side adapters trained on lone clicks only, shipped with the app: while the shipped adapters
    # serve, their answer to a lone click is one more candidate of the scale choice
    lone_click_checkpoint: Path | None = None
    description: str = ""
    source: Path | None = None

    def checkpoint_problem(self) -> str | None:
        """Why this profile cannot be built now (missing checkpoint file), or None when it can."""
        from .backbones import BACKBONES

        spec = BACKBONES[self.backbone]
        if spec.needs_checkpoint and self.checkpoint is None:
            return f"profile '{self.name}': backbone '{self.backbone}' needs `checkpoint = \"/path/to/file.pth\"`"
        if spec.needs_checkpoint and not self.checkpoint.is_file():
            return f"profile '{self.name}': checkpoint for backbone '{self.backbone}' not found at {self.checkpoint}"
        return None


def _section(data: dict[str, Any], key: str, cls: type, where: str) -> Any:
    raw = data.pop(key, {})
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: [{key}] must be a table")
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) in [{key}]: {unknown}; allowed: {sorted(allowed)}")
    values = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        value = raw[f.name]
        default = getattr(cls(), f.name)
        if isinstance(default, tuple) and f.metadata.get("any_length"):
            if not isinstance(value, list) or not all(isinstance(v, (int, float)) and v > 0 for v in value):
                raise ProfileError(f"{where}: [{key}].{f.name} must be a list of positive numbers")
            value = tuple(float(v) for v in value)
        elif isinstance(default, tuple):
            if not isinstance(value, list) or len(value) != len(default):
                raise ProfileError(f"{where}: [{key}].{f.name} must be a list of {len(default)} numbers")
            value = tuple(float(v) for v in value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ProfileError(f"{where}: [{key}].{f.name} must be true or false")
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ProfileError(f"{where}: [{key}].{f.name} must be a number")
            value = type(default)(value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ProfileError(f"{where}: [{key}].{f.name} must be a string")
        values[f.name] = value
    return cls(**values)


def _path(value: Any, base: Path, where: str, key: str) -> Path | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ProfileError(f"{where}: `{key}` must be a path string")
    path = Path(os.path.expandvars(os.path.expanduser(value)))
    return path if path.is_absolute() else (base / path).resolve()


def parse_profile(data: dict[str, Any], source: Path | None = None) -> ModelProfile:
    """Validate a profile dictionary (as read from TOML) into a :class:`ModelProfile`."""
    from .backbones import BACKBONES
    from .preprocess import CT_WINDOWS

    data = dict(data)
    where = str(source) if source else "profile"
    base = source.parent if source else Path.cwd()
    name = data.pop("name", source.stem if source else None)
    backbone = data.pop("backbone", None)
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{where}: `name` must be a non-empty string")
    if backbone not in BACKBONES:
        raise ProfileError(f"{where}: unknown backbone {backbone!r}; known: {sorted(BACKBONES)}")
    checkpoint = _path(data.pop("checkpoint", None), base, where, "checkpoint")
    adapter_checkpoint = _path(data.pop("adapter_checkpoint", None), base, where, "adapter_checkpoint")
    auto_head_checkpoint = _path(data.pop("auto_head_checkpoint", None), base, where, "auto_head_checkpoint")
    lone_click_checkpoint = _path(data.pop("lone_click_checkpoint", None), base, where, "lone_click_checkpoint")
    adapters = _section(data, "adapters", AdapterSettings, where)
    if not 0 < adapters.ratio <= 1:
        raise ProfileError(f"{where}: [adapters].ratio must be in (0, 1], got {adapters.ratio}")
    if adapters.design not in ADAPTER_DESIGNS:
        raise ProfileError(
            f"{where}: [adapters].design must be one of {list(ADAPTER_DESIGNS)}, got {adapters.design!r}"
        )
    if adapters.head not in HEADS:
        raise ProfileError(f"{where}: [adapters].head must be one of {list(HEADS)}, got {adapters.head!r}")
    preprocessing = _section(data, "preprocessing", PreprocessSettings, where)
    if preprocessing.intensity not in INTENSITY_MODES:
        raise ProfileError(f"{where}: [preprocessing].intensity must be one of {INTENSITY_MODES}")
    if preprocessing.ct_window not in CT_WINDOWS:
        raise ProfileError(f"{where}: [preprocessing].ct_window must be one of {sorted(CT_WINDOWS)}")
    inference = _section(data, "inference", InferenceSettings, where)
    if not 0 <= inference.lone_click_max_contact <= 1:
        raise ProfileError(f"{where}: [inference].lone_click_max_contact must be between 0 and 1")
    for option in ("refine_with_logits", "multimask_for_single_click"):
        if getattr(inference, option) not in ("auto", "always", "never"):
            raise ProfileError(f"{where}: [inference].{option} must be auto, always or never")
    check_encoder_runtime(inference.encoder_runtime, f"{where}: [inference].encoder_runtime")
    check_encoder_runtime(inference.decoder_runtime, f"{where}: [inference].decoder_runtime", DECODER_RUNTIMES)
    if not 0 <= inference.encode_batch <= 256:
        raise ProfileError(f"{where}: [inference].encode_batch must be between 0 (auto) and 256")
    if not inference.lone_click_recentre_growth > 0:
        raise ProfileError(f"{where}: [inference].lone_click_recentre_growth must be above 0 (inf: any size)")
    for option in ("lone_click_alone_margin", "lone_click_adapter_margin", "repair_logit"):
        if not getattr(inference, option) >= 0:
            raise ProfileError(f"{where}: [inference].{option} must be at least 0")
    if not 0 < inference.feature_repair_reach <= 4:
        raise ProfileError(f"{where}: [inference].feature_repair_reach must be above 0 and at most 4")
    if not -2 < inference.feature_repair_margin < 2:
        raise ProfileError(f"{where}: [inference].feature_repair_margin must be between -2 and 2 (a cosine difference)")
    for option in ("new_part_gap", "new_part_max_ratio", "correction_prompt_release"):
        if not 0 <= getattr(inference, option) <= 100:
            raise ProfileError(f"{where}: [inference].{option} must be between 0 (off) and 100")
    for option in ("local_total_share", "local_max_removal", "scale_recheck_depth", "lone_click_refit"):
        if not 0 <= getattr(inference, option) <= 1:
            raise ProfileError(f"{where}: [inference].{option} must be between 0 and 1")
    trainable = data.pop("trainable", list(TRAINABLE_PARTS))
    if not isinstance(trainable, list) or any(p not in TRAINABLE_PARTS for p in trainable):
        raise ProfileError(f"{where}: `trainable` must be a list drawn from {list(TRAINABLE_PARTS)}")
    labels = data.pop("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        raise ProfileError(f"{where}: `labels` must be a list of non-empty strings")
    if len(set(labels)) != len(labels) or "background" in labels:
        raise ProfileError(f"{where}: `labels` must be unique and must not contain 'background'")
    description = data.pop("description", "")
    if data:
        raise ProfileError(f"{where}: unknown key(s): {sorted(data)}")
    return ModelProfile(
        name=name,
        backbone=backbone,
        checkpoint=checkpoint,
        adapters=adapters,
        trainable=tuple(trainable),
        preprocessing=preprocessing,
        inference=inference,
        labels=tuple(labels),
        adapter_checkpoint=adapter_checkpoint,
        auto_head_checkpoint=auto_head_checkpoint,
        lone_click_checkpoint=lone_click_checkpoint,
        description=str(description),
        source=source,
    )


def setting_pairs(pairs: list[str], option: str = "--inference") -> dict[str, Any]:
    """Command-line ``key=value`` pairs as a TOML table (values read as TOML, else kept as strings)."""
    table: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ProfileError(f"{option} {pair!r}: expected key=value")
        try:
            table[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            table[key.strip()] = value
    return table


def load_profile(path: str | Path, inference: dict[str, Any] | None = None) -> ModelProfile:
    """Read and validate one profile file; ``inference`` overrides keys of its [inference] table (validated
    like the file's own)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"profile file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from None
    if inference:
        data["inference"] = {**data.get("inference", {}), **inference}
    return parse_profile(data, source=path)


def load_profiles(directory: str | Path) -> dict[str, ModelProfile]:
    """All profiles in a directory, by name (file order is alphabetical)."""
    profiles: dict[str, ModelProfile] = {}
    for path in sorted(Path(directory).glob("*.toml")):
        profile = load_profile(path)
        if profile.name in profiles:
            raise ProfileError(f"{path}: profile name {profile.name!r} is used twice")
        profiles[profile.name] = profile
    return profiles
