"""MONAI Label app: SAM-style interactive segmentation with adapters that learn from annotators.

Options (``--conf KEY VALUE``):
  models   comma-separated profile names from configs/ (default: every profile that can load)
  device   cpu | cuda (default: cuda when available)
  embedding_cache_mb   override the profiles' embedding cache size (0 re-encodes on every click)
  adapter_version      serve this published adapter version instead of the newest (rollback)
  encoder_runtime      auto (default) | torch | torch_bf16 | torch_fp16 | openvino_fp32 | openvino_bf16 |
                       openvino_mixed | cuda_graph | cuda_graph_fp16: overrides the profiles' [inference]
                       encoder_runtime (auto on a CPU with native bf16: the faster of openvino_fp32 and
                       openvino_mixed measured there; on CUDA the fastest of cuda_graph_fp16, cuda_graph and
                       torch_fp16 measured there; lib/serving/runtimes.py)
  decoder_runtime      auto (default) | torch | openvino_fp32 | openvino_bf16: overrides [inference]
                       decoder_runtime (lib/serving/decoder_runtime.py; bf16: ~1.5x faster clicks where
                       the CPU has native bf16, opt-in: it can change a lone click's scale choice)
  encode_batch         encode concurrent requests' new slices as one batch of up to N (0, default: auto,
                       8 on CUDA and 1 on a CPU; lib/serving/encode_batching.py); on a GPU give the
                       scheduler more workers too (scheduler_workers 8) so that requests meet
  warm_up              true (default) | false: build the served and bare models and their encoder and
                       decoder runtimes in the background at startup (else at the first prompts)
  shipped_adapters     true (default) | false: start from the adapters shipped with a profile (the
                       click adapter of lite_medsam) or from the bare base model
  max_upload_mb        largest accepted upload (image, label, request body) in MiB (default 2048);
                       bodies above it get HTTP 413 when served through lib.server (scripts/serve.sh)
  auto_train_after     start a training round after this many newly saved labels (0, default: off)
  ohif_dicomweb        with a local --studies folder: the DICOMweb server the bundled OHIF reads the
                       images from (named by SeriesInstanceUID in the folder), through /ohif-dicomweb/
  training_nice        how much lower the training round's CPU priority is than the server's (10; 0: same),
                       so annotators' clicks come first while a round runs
  train_<option>       server-side default of a train option (e.g. train_max_epochs 5), used when a
                       request leaves it out (OHIF's "Update Model" sends nothing)
  scheduler            true (default) | false: run /infer in lib.server's scheduler threads (priorities,
                       fairness, 503 when full) or in MONAI Label's event loop; also scheduler_workers (2),
                       scheduler_click_lane (true), scheduler_queue_limit (32),
                       scheduler_client_queue_limit (8), scheduler_torch_threads (0: torch's default)
  prefetch_slices      neighbours encoded each side of a prompted slice in the background (2; 0: off);
                       also prefetch_queue_limit (64), prefetch_on_open (false: true encodes a whole image
                       on its first prompt). All parsed once by lib/serving/scheduler.py
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib.activelearning import HeadUncertaintyScoring, UncertaintyStrategy
from lib.conf_values import conf_flag, conf_float, conf_int
from lib.core.config import (
    DECODER_RUNTIMES,
    ENCODER_RUNTIMES,
    ModelProfile,
    ProfileError,
    check_encoder_runtime,
    load_profiles,
)
from lib.core.engine import InteractiveSegmenter
from lib.datastore import GuardedDatastore, max_upload_mb
from lib.infers.tasks import AutoTask, DeepEditTask, PromptedTask
from lib.ohif import note_infer_answer
from lib.serving.infer_route import serving_status
from lib.trainers.adapter_train import AdapterTrainTask, write_json_atomic

logger = logging.getLogger(__name__)

DEFAULT_PROFILE = "lite_medsam"


class MedSamAdapterApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.profiles = self._select_profiles(Path(app_dir) / "configs", conf.get("models", ""))
        if not conf_flag(conf, "shipped_adapters", True, ProfileError):
            self.profiles = {n: replace(p, adapter_checkpoint=None) for n, p in self.profiles.items()}
        for key, known in (("encoder_runtime", ENCODER_RUNTIMES), ("decoder_runtime", DECODER_RUNTIMES)):
            if conf.get(key):
                runtime = check_encoder_runtime(conf[key], f"--conf {key}", known)
                self.profiles = {
                    n: replace(p, inference=replace(p.inference, **{key: runtime})) for n, p in self.profiles.items()
                }
        if conf.get("encode_batch"):
            batch = conf_int(conf, "encode_batch", 0, 0, 256, ProfileError)
            self.profiles = {
                n: replace(p, inference=replace(p.inference, encode_batch=batch)) for n, p in self.profiles.items()
            }
        device = conf.get("device") or None
        cache_mb = None  # the profiles' own size
        if str(conf.get("embedding_cache_mb", "")).strip():
            cache_mb = conf_float(conf, "embedding_cache_mb", 0, 0, ProfileError)
        self.segmenters = {
            name: InteractiveSegmenter(
                p,
                adapter_dir=Path(app_dir) / "model" / name / "adapters",
                device=device,
                embedding_cache_mb=cache_mb,
            )
            for name, p in self.profiles.items()
        }
        if conf.get("adapter_version"):
            version = conf_int(conf, "adapter_version", 0, 1, 10**9, ProfileError)
            for segmenter in self.segmenters.values():
                segmenter.pinned_version = version
        self.auto_train_after = conf_int(conf, "auto_train_after", 0, 0, 10**6, ProfileError)
        self.training_nice = conf_int(conf, "training_nice", 10, 0, 19, ProfileError)
        self._label_count_lock = threading.Lock()  # saves arrive on several worker threads at once
        self.max_upload_mb = max_upload_mb(conf)
        self._warm_up_wanted = conf_flag(conf, "warm_up", True, ProfileError)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MedSAM Adapter",
            description="LiteMedSAM / SAM / MedSAM with adapters: boxes, clicks, refinement, 3D propagation",
            version="0.1.0",
        )

    def on_init_complete(self) -> None:
        """The server started (not called in MONAI Label's training subprocess): warm up in the background."""
        super().on_init_complete()
        if self._warm_up_wanted:
            threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        """Models and their encoder and decoder runtimes built ahead of the first prompts."""
        for name, segmenter in self.segmenters.items():
            try:
                segmenter.warm_up()
            except Exception:  # noqa: BLE001 - the first prompt builds them again and reports the problem
                logger.exception("warm-up of %s failed", name)

    @staticmethod
    def _select_profiles(config_dir: Path, models: str) -> dict[str, ModelProfile]:
        available = load_profiles(config_dir)
        wanted = [m.strip() for m in models.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in available]
        if unknown:
            raise ProfileError(f"--conf models: unknown profile(s) {unknown}; available: {sorted(available)}")
        selected = {}
        for name in wanted or sorted(available, key=lambda n: (n != DEFAULT_PROFILE, n)):
            problem = available[name].checkpoint_problem()
            if problem:
                if wanted:
                    raise ProfileError(problem)
                logger.warning("model profile unavailable: %s", problem)
                continue
            selected[name] = available[name]
        return selected

    def dicomweb_url(self) -> str | None:
        """The PACS serving the images (``--studies http(s)://...``), None for a local folder."""
        return self.studies if self.studies.startswith(("http://", "https://")) else None

    def init_datastore(self) -> Datastore:
        """A local folder gets the guarded datastore (checked uploads, atomic writes, label history)."""
        if self.dicomweb_url():
            return super().init_datastore()
        return GuardedDatastore(
            self.studies,
            max_upload_mb=self.max_upload_mb,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for n, (name, segmenter) in enumerate(self.segmenters.items()):
            prefix = self.task_prefix(n, name)
            infers[f"{prefix}_2d"] = PromptedTask(segmenter, three_d=False)
            infers[f"{prefix}_3d"] = PromptedTask(segmenter, three_d=True)
            if segmenter.profile.labels:
                infers[f"{prefix}_deepedit"] = DeepEditTask(segmenter)
                infers[f"{prefix}_auto"] = AutoTask(segmenter)
        return infers

    def task_prefix(self, index: int, name: str) -> str:
        return "medsam" if index == 0 else name  # the first (default) profile gets the public names

    def init_trainers(self) -> dict:
        defaults = {k[len("train_") :]: v for k, v in self.conf.items() if k.startswith("train_")}
        return {
            self.task_prefix(n, name): AdapterTrainTask(
                segmenter,
                Path(self.app_dir) / "model" / name,
                defaults,
                dicomweb_url=self.dicomweb_url(),
                nice=self.training_nice,
            )
            for n, (name, segmenter) in enumerate(self.segmenters.items())
        }

    def on_save_label(self, image_id: str, label_id: str) -> dict:
        """Optionally start an active-learning round after every N newly saved labels."""
        result = super().on_save_label(image_id, label_id)
        if self.auto_train_after <= 0 or not self._trainers:
            return result
        counter = Path(self.app_dir) / "model" / "labels_since_round.json"
        with self._label_count_lock:
            try:
                count = int(json.loads(counter.read_text()).get("count", 0)) + 1
            except (OSError, ValueError):
                count = 1
            start_round = count >= self.auto_train_after
            write_json_atomic(counter, {"count": 0 if start_round else count})
        if start_round:
            logger.info("%d new labels: starting an automatic training round", count)
            self.async_training(next(iter(self._trainers)), enqueue=True)
        return result

    def init_strategies(self) -> dict:
        strategies = {"random": Random(), "first": First()}
        if self.segmenters:
            strategies["uncertainty"] = UncertaintyStrategy(next(iter(self.segmenters.values())))
        return strategies

    def init_scoring_methods(self) -> dict:
        if not self.segmenters:
            return {}
        return {"uncertainty": HeadUncertaintyScoring(next(iter(self.segmenters.values())))}

    def next_sample(self, request: dict) -> dict:
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise HTTPException(
                status_code=404, detail=f"unknown strategy {strategy!r}; available: {sorted(self._strategies)}"
            )
        return super().next_sample(request)

    def info(self) -> dict:
        """MONAI Label's app info plus ``serving``: inference queues and precomputed slice ranges."""
        meta = super().info()
        serving = serving_status()
        if serving is not None:
            meta["serving"] = serving
        return meta

    def infer(self, request: dict, datastore=None) -> dict:
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; available: {sorted(self._infers)}")
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise HTTPException(status_code=422, detail="'image' must name an image of the datastore")
        store = datastore or self.datastore()
        uploaded = Path(image).is_file() and Path(image).resolve().parent == Path(tempfile.gettempdir()).resolve()
        if not uploaded and image not in store.list_images():
            raise HTTPException(status_code=404, detail=f"unknown image {image!r}")
        result = super().infer(request, datastore)
        note_infer_answer(model, image, result)  # the answer's X-Model-Version header (lib/ohif.py)
        return result
