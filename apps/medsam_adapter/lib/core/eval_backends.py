"""Backends for :mod:`evaluation`: the product's engine in this process, or a live server over HTTP
(requests exactly as the Slicer plugin sends them, results read back from the returned NRRD)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from .datasets import LabelledCase
from .engine import InteractiveSegmenter
from .prompts import parse_prompts, parse_slice
from .volume import volume_from_bytes

if TYPE_CHECKING:
    import requests


def decode_infer_answer(response: requests.Response) -> tuple[dict, bytes]:
    """(params, label file bytes) of a MONAI Label ``output=all`` multipart answer (b"" without a label)."""
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    params, image = {}, b""
    for part in MultipartDecoder.from_response(response).parts:
        disposition = part.headers.get(b"Content-Disposition", b"").decode()
        if 'name="params"' in disposition:
            params = json.loads(part.content)
        elif 'name="image"' in disposition:
            image = part.content
    return params, image


class InProcessBackend:
    """Runs the same :class:`InteractiveSegmenter` code the infer tasks use (state, caches, policies)."""

    def __init__(self, segmenter: InteractiveSegmenter) -> None:
        self.segmenter = segmenter

    def segment(self, case: LabelledCase, request: dict, three_d: bool) -> tuple[np.ndarray, dict[str, float]]:
        client = str(request.get("client_id", "eval"))
        if request.get("reset_state"):
            self.segmenter.clients.reset(client)
        prompts = parse_prompts(request, case.image.shape)
        k = parse_slice(request.get("slice"), case.image.shape, 2)
        state = (client, case.case_id, str(request.get("label", "object")), "3d" if three_d else "2d")
        out = self.segmenter.segment(
            case.image, prompts, three_d=three_d, slice_index=None if three_d else k, state_key=state
        )
        return out.label, dict(out.params.get("latency_ms", {}))


class HttpBackend:
    """POSTs to ``/infer/<task>?image=<case id>`` on a running server whose datastore holds the cases'
    images under their case ids; reads the label and the reported latencies from the multipart answer."""

    def __init__(self, url: str, task_2d: str = "medsam_2d", task_3d: str = "medsam_3d", timeout: float = 600) -> None:
        import requests

        self.url = url.rstrip("/")
        self.task_2d, self.task_3d = task_2d, task_3d
        self.timeout = timeout
        self.session = requests.Session()

    def segment(self, case: LabelledCase, request: dict, three_d: bool) -> tuple[np.ndarray, dict[str, float]]:
        body = {"result_extension": ".nrrd", "result_dtype": "uint8", **request}
        r = self.session.post(
            f"{self.url}/infer/{self.task_3d if three_d else self.task_2d}",
            params={"image": case.case_id, "output": "all"},
            files={"params": (None, json.dumps(body))},
            timeout=self.timeout,
        )
        if r.status_code != 200:
            raise RuntimeError(f"server answered {r.status_code} for {case.case_id}: {r.text[:300]}")
        params, image = decode_infer_answer(r)
        if not image:
            raise RuntimeError(f"no label in the server's answer for {case.case_id}")
        label = volume_from_bytes(image, ".nrrd").array
        if label.shape != case.image.shape:
            raise RuntimeError(f"{case.case_id}: server label shape {label.shape} != image {case.image.shape}")
        return label, dict(params.get("latency_ms", {}))
