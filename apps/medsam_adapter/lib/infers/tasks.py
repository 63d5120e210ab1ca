"""Infer tasks for 3D Slicer and OHIF: each a small BasicInferTask that hands the request to the engine.

What differs from MONAI Label's pipeline: no transforms (the engine reads the image as stored and
caches it), the inferer is the engine, and the writer keeps the image's exact grid and geometry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from lib.core.checkpoint import CheckpointError
from lib.core.engine import InteractiveSegmenter, SegmentationOutput
from lib.core.preprocess import CT_WINDOWS
from lib.core.prompts import PromptError, VoxelPrompts, parse_points, parse_prompts, parse_slice
from lib.core.volume import Volume, VolumeError, temp_label_path, write_label

logger = logging.getLogger(__name__)

RESULT_EXTENSIONS = (".nrrd", ".nii.gz", ".nii")
RESULT_DTYPES = ("uint8", "uint16", "int16", "int32", "float32")
WINDOWS = ["auto", *CT_WINDOWS, "percentile", "minmax"]


@contextmanager
def client_errors() -> Iterator[None]:
    """Turn problems with the request or its image into HTTP 4xx answers with the reason."""
    try:
        yield
    except (PromptError, CheckpointError) as e:
        raise HTTPException(status_code=422, detail=str(e)) from None
    except VolumeError as e:
        status = 404 if "not found" in str(e) else 415
        raise HTTPException(status_code=status, detail=str(e)) from None


def _text(data: dict, key: str, default: str = "") -> str:
    value = data.get(key, default)
    if isinstance(value, list) and value and key in ("window",):
        value = value[0]  # a config option not sent by the client: its first item is the default
    if value is None:
        return default
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise PromptError(f"'{key}' must be a string, got {type(value).__name__}")
    return str(value)


def _flag(data: dict, key: str) -> bool:
    value = data.get(key, False)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def fortran_label(pred: np.ndarray, dtype: str) -> np.ndarray:
    """The label as a Fortran-ordered array of ``dtype``, the order NRRD and NIfTI store, so the writer
    copies bytes instead of transposing the volume (a 512x512x100 CT: 26 MB); only slices holding
    labels are copied, the rest stays zero."""
    pred = np.asarray(pred)
    if pred.dtype == np.dtype(dtype) and pred.flags.f_contiguous:
        return pred  # the engine's labels already are (no copy)
    out = np.zeros(pred.shape, dtype=dtype, order="F")
    if pred.ndim != 3:
        out[...] = pred
        return out
    for k in np.flatnonzero(pred.any(axis=(0, 1))):
        out[:, :, k] = pred[:, :, k]
    return out


class MedSamInferTask(BasicInferTask):
    """Shared glue for every task of one model profile."""

    def __init__(
        self,
        segmenter: InteractiveSegmenter,
        type: InferType,
        dimension: int,
        description: str,
        labels: Any = None,
    ) -> None:
        super().__init__(
            path=None,
            network=None,
            type=type,
            labels=labels,
            dimension=dimension,
            description=description,
            config={"window": WINDOWS, "profile": segmenter.profile.name},
        )
        self.segmenter = segmenter

    def is_valid(self) -> bool:
        return True

    def pre_transforms(self, data: dict | None = None) -> list:
        return []

    def post_transforms(self, data: dict | None = None) -> list:
        return []

    def segment(self, volume: Volume, data: dict) -> SegmentationOutput:
        raise NotImplementedError

    def client(self, data: dict) -> str:
        """The requesting client's id; its refinement state is cleared first when it asks to reset."""
        client = _text(data, "client_id", "user")
        if _flag(data, "reset_state"):
            self.segmenter.clients.reset(client)
        return client

    def run_inferer(self, data: dict, convert_to_batch: bool = True, device: str = "cuda") -> dict:
        image = data.get("image")
        with client_errors():
            if not isinstance(image, str) or not image:
                raise VolumeError("image not found: the request names no image known to the datastore")
            volume = self.segmenter.volumes.get(image)
            self.check_output_options(data)
            output = self.segment(volume, data)
        data["pred"] = output.label
        data["affine"] = volume.affine
        data["result"] = output.params
        return data

    @staticmethod
    def check_output_options(data: dict) -> None:
        ext = data.get("result_extension") or ".nrrd"
        if ext not in RESULT_EXTENSIONS:
            raise PromptError(f"result_extension {ext!r} is not supported; use one of {list(RESULT_EXTENSIONS)}")
        dtype = data.get("result_dtype") or "uint8"
        if dtype not in RESULT_DTYPES:
            raise PromptError(f"result_dtype {dtype!r} is not supported; use one of {list(RESULT_DTYPES)}")

    def window(self, data: dict) -> str | None:
        value = _text(data, "window", "auto")
        if value not in WINDOWS:
            raise PromptError(f"window {value!r} is not one of {WINDOWS}")
        return None if value == "auto" else value

    def writer(self, data: dict, extension: str | None = None, dtype: str | None = None) -> tuple[str, dict]:
        ext = data.get("result_extension") or ".nrrd"
        dtype = data.get("result_dtype") or "uint8"
        path = temp_label_path(ext)
        compress = _flag(data, "result_compress") if "result_compress" in data else True
        write_label(fortran_label(data["pred"], dtype), data["affine"], path, compress=compress)
        return str(path), data["result"]


class PromptedTask(MedSamInferTask):
    """``medsam_2d`` / ``medsam_3d``: clicks and/or a box for one object (deepgrow type)."""

    def __init__(self, segmenter: InteractiveSegmenter, three_d: bool) -> None:
        super().__init__(
            segmenter,
            InferType.DEEPGROW,
            3 if three_d else 2,
            "Clicks and/or an ROI box -> "
            + ("the object through the volume" if three_d else "the object on that slice"),
        )
        self.three_d = three_d

    def segment(self, volume: Volume, data: dict) -> SegmentationOutput:
        client = self.client(data)
        prompts = parse_prompts(data, volume.shape)
        k = parse_slice(data.get("slice"), volume.shape, 2)
        state = (client, str(data["image"]), _text(data, "label", "object"), "3d" if self.three_d else "2d")
        return self.segmenter.segment(
            volume,
            prompts,
            three_d=self.three_d,
            slice_index=None if self.three_d else k,
            state_key=state,
            window=self.window(data),
        )


def label_indices(segmenter: InteractiveSegmenter) -> dict[str, int]:
    """The profile's label names and their values in multi-label results (1..N)."""
    return {name: i + 1 for i, name in enumerate(segmenter.profile.labels)}


class DeepEditTask(MedSamInferTask):
    """``medsam_deepedit``: clicks per label name (``{"spleen": [[i, j, k]], "background": [...]}``),
    each label propagated in 3D from its clicks; one multi-label result."""

    def __init__(self, segmenter: InteractiveSegmenter) -> None:
        super().__init__(
            segmenter, InferType.DEEPEDIT, 3, "Clicks per label -> multi-label 3D result", label_indices(segmenter)
        )

    def segment(self, volume: Volume, data: dict) -> SegmentationOutput:
        client = self.client(data)
        roi = parse_prompts({"roi": data.get("roi")}, volume.shape).roi
        clicks = {name: parse_points(data.get(name), name, volume.shape) for name in self.labels}
        background = parse_points(data.get("background"), "background", volume.shape)
        edited = [name for name, c in clicks.items() if len(c)]
        if not edited:
            raise PromptError(f"no clicks for any label: send clicks under one of {list(self.labels)}")
        if roi is not None and len(edited) > 1:
            raise PromptError(f"an ROI box belongs to one object, but clicks were sent for {edited}")
        label = np.zeros(volume.shape, dtype=np.uint8, order="F")  # the order label files store
        params: dict[str, Any] = {"labels": {}}
        for name, idx in self.labels.items():
            if not len(clicks[name]):
                continue
            others = [c for n, c in clicks.items() if n != name and len(c)]
            negatives = np.concatenate([background, *others]) if others else background
            out = self.segmenter.segment(
                volume,
                VoxelPrompts(clicks[name], negatives, roi),
                three_d=True,
                state_key=(client, str(data["image"]), name, "deepedit"),
                window=self.window(data),
            )
            label[(out.label > 0) & (label == 0)] = idx
            params["labels"][name] = out.params
            params["model_version"] = out.params["model_version"]
        return SegmentationOutput(label, params)


class AutoTask(MedSamInferTask):
    """``medsam_auto``: the prompt-free head, every slice, all labels (segmentation type)."""

    def __init__(self, segmenter: InteractiveSegmenter) -> None:
        super().__init__(
            segmenter,
            InferType.SEGMENTATION,
            3,
            "Automatic first pass from the prompt-free head",
            label_indices(segmenter),
        )

    def segment(self, volume: Volume, data: dict) -> SegmentationOutput:
        return self.segmenter.segment_auto(volume, window=self.window(data))
