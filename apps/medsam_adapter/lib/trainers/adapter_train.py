"""Train task: one active-learning round on the submitted final labels, published as a new adapter version.

Runs in MONAI Label's training subprocess. Works with the clients' default requests: Slicer's Train
button (its trainer config, ``tracking: mlflow`` included — metrics go to ``train_stats.json`` and the
checkpoint, MLflow is not used) and OHIF's "Update Model" (``POST /train/`` with ``{}``).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import requests
import torch
from dicomweb_client.api import DICOMwebClient
from monailabel.config import settings as server_settings
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from lib.core.atomic import atomic_write
from lib.core.config import ADAPTER_DESIGNS, HEADS, TRAINABLE_PARTS, design_option_problem
from lib.core.dicom_seg import read_seg
from lib.core.distributed import DistributedJob, train_distributed
from lib.core.engine import InteractiveSegmenter, publish_adapters
from lib.core.model import AdaptedSam
from lib.core.training import (
    ENCODER_PRECISIONS,
    AdapterTrainer,
    LabelledVolume,
    TrainingDataError,
    TrainSettings,
    clone_for_training,
    encoder_option_problem,
    prepare_samples,
    split_volumes,
)
from lib.core.volume import VolumeError, label_in_grid, load_volume
from lib.pacs import seg_labels
from lib.serving.scheduler import lower_thread_priority

logger = logging.getLogger(__name__)


def names_from_label_info(info: dict[str, Any]) -> dict[int, str]:
    """Voxel value -> label name from a submission's ``label_info`` (names in order, values 1..N;
    the clients' ``idx`` is not trusted)."""
    entries = info.get("label_info") or info.get("params", {}).get("label_info") or []
    names = [e.get("name") for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)]
    return {i + 1: name for i, name in enumerate(names)}


def first_item(request: dict, key: str, default: Any) -> Any:
    """A request option; a list (a config option the client sent as shown) means its first item."""
    value = request.get(key, default)
    if isinstance(value, list):
        return value[0] if value else default
    return value


def write_json_atomic(path: Path, data: dict) -> None:
    with atomic_write(path, mode="w") as fh:
        json.dump(data, fh, indent=2, default=str)


class AdapterTrainTask(TrainTask):
    """Fine-tunes only adapters and heads of one profile from ``labels/final``."""

    def __init__(
        self,
        segmenter: InteractiveSegmenter,
        output_dir: Path,
        defaults: dict | None = None,
        dicomweb_url: str | None = None,
        nice: int = 10,
    ) -> None:
        """``nice``: how much lower than the server's the round's CPU priority is (Linux niceness of the
        training thread and every thread and process it starts), so annotators' clicks come first."""
        super().__init__(f"Fine-tune the adapters and heads of '{segmenter.profile.name}' on submitted labels")
        self.defaults = dict(defaults or {})  # server-side defaults for options a request leaves out
        self.segmenter = segmenter
        self.dicomweb_url = dicomweb_url  # labels are the DICOM-SEGs of this PACS
        self.output_dir = output_dir
        self.stats_path = output_dir / "train_stats.json"
        self.nice = nice

    def config(self) -> dict[str, Any]:
        defaults = TrainSettings()
        return {
            "max_epochs": defaults.max_epochs,
            "learning_rate": defaults.learning_rate,
            "val_split": defaults.val_fraction,
            "max_slices_per_volume": defaults.max_slices_per_volume,
            "train_encoder_adapters": torch.cuda.is_available(),
            "encoder_precision": list(ENCODER_PRECISIONS),  # bf16: encoder rounds faster on bf16 CPUs and GPUs
            "train_prompt_free_head": True,
            "publish": ["if_better", "always"],
            "seed": defaults.seed,
            "multi_gpu": torch.cuda.device_count() > 1,
            "gpus": "all",
            "adapter_design": ["", *ADAPTER_DESIGNS],  # "": keep the served design
            "head": ["", *HEADS],  # "": keep the served prompt-free head kind
            **self.defaults,
        }

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    # -- request parsing --------------------------------------------------------------------------
    @staticmethod
    def settings_from_request(request: dict) -> tuple[TrainSettings, str]:
        """Typed settings from a request (first item of lists, as clients send config options)."""

        def value(key: str, cast: type, default: Any) -> Any:
            raw = first_item(request, key, default)
            if cast is bool and isinstance(raw, str):
                return raw.strip().lower() in ("1", "true", "yes")
            try:
                return cast(raw)
            except (TypeError, ValueError):
                raise TrainingDataError(f"train option {key!r}: expected {cast.__name__}, got {raw!r}") from None

        d = TrainSettings()
        kwargs = {f.name: value(f.name, type(getattr(d, f.name)), getattr(d, f.name)) for f in fields(TrainSettings)}
        kwargs["max_epochs"] = value("max_epochs", int, d.max_epochs)
        kwargs["val_fraction"] = value("val_split", float, d.val_fraction)
        kwargs["train_encoder_adapters"] = value("train_encoder_adapters", bool, torch.cuda.is_available())
        settings = TrainSettings(**kwargs)
        if settings.max_epochs < 1 or settings.learning_rate <= 0 or not 0 <= settings.val_fraction < 1:
            raise TrainingDataError("train options: max_epochs >= 1, learning_rate > 0, 0 <= val_split < 1")
        metrics = ("score", "box_dice", "click1_dice", f"click{settings.val_clicks}_dice", "auto_dice")
        if settings.selection_metric not in metrics:
            raise TrainingDataError(f"train option 'selection_metric' must be one of {list(dict.fromkeys(metrics))}")
        if not 0 <= settings.lone_click_share <= 1:
            raise TrainingDataError("train option 'lone_click_share' must be between 0 and 1")
        problem = design_option_problem(asdict(settings)) or encoder_option_problem(settings)
        if problem:
            raise TrainingDataError(problem)
        publish = value("publish", str, "if_better")
        if publish not in ("if_better", "always"):
            raise TrainingDataError("train option 'publish' must be 'if_better' or 'always'")
        return settings, publish

    def parts(self, settings: TrainSettings) -> list[str]:
        allowed = self.segmenter.profile.trainable
        parts = [p for p in TRAINABLE_PARTS if p in allowed]
        if not settings.train_encoder_adapters:
            parts = [p for p in parts if p != "encoder_adapters"]
        if not settings.train_prompt_free_head:
            parts = [p for p in parts if p != "prompt_free_head"]
        return parts

    def _start_model(self, served: AdaptedSam, settings: TrainSettings, notes: list[str]) -> tuple[AdaptedSam, Any]:
        """(model to train, adapter file a distributed rank starts from): a copy of the served model, or,
        when the request asks for another adapter design or head, a model of that design with fresh
        adapters (same design, other head: the served adapters with a fresh head)."""
        current = served.adapter_settings
        wanted = replace(current, design=settings.adapter_design or current.design, head=settings.head or current.head)
        if wanted == current:
            return clone_for_training(served), self.segmenter.served_adapters()
        model = AdaptedSam.from_profile(replace(self.segmenter.profile, adapters=wanted))
        if wanted.design == current.design:
            own = dict(model.named_parameters())
            with torch.no_grad():
                for name, tensor in served.adaptable_state().items():
                    if not name.startswith("prompt_free_head.") and name in own:
                        own[name].copy_(tensor)
            model.trained_with_mask_prompts = served.trained_with_mask_prompts
        notes.append(
            f"adapter design '{wanted.design}', head '{wanted.head}' asked for (served: '{current.design}', "
            f"'{current.head}'): " + ("fresh head" if wanted.design == current.design else "fresh adapters")
        )
        return model, None

    # -- the round --------------------------------------------------------------------------------
    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        with lower_thread_priority(self.nice):
            return self._round(request, datastore)

    def _round(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        start = time.time()
        stats: dict[str, Any] = {"status": "RUNNING", "start_ts": int(start), "epoch": 0, "total_epochs": 0}
        write_json_atomic(self.stats_path, stats)
        try:
            settings, publish = self.settings_from_request({**self.defaults, **request})
            stats.update(total_epochs=settings.max_epochs, settings=asdict(settings), publish=publish)
            if str(request.get("tracking", "")).lower() == "mlflow":
                stats["tracking"] = "metrics are written to train_stats.json and the checkpoint; MLflow is not used"
            result = self._run(settings, publish, stats, datastore, request)
            stats.update(result, status="DONE")
        except TrainingDataError as e:
            stats.update(status="ERROR", error=str(e))
            write_json_atomic(self.stats_path, stats)
            raise
        finally:
            stats["total_time"] = round(time.time() - start, 1)
            write_json_atomic(self.stats_path, stats)
        return stats

    def _pacs_volumes(self, datastore: Datastore, notes: list[str]) -> list[LabelledVolume]:
        """The newest DICOM-SEG of every listed series, placed into the series' grid, names from the SEG."""
        session = None
        user, password = server_settings.MONAI_LABEL_DICOMWEB_USERNAME, server_settings.MONAI_LABEL_DICOMWEB_PASSWORD
        if user and password:
            session = requests.Session()
            session.auth = (user, password)
        client = DICOMwebClient(url=self.dicomweb_url, session=session)
        volumes = []
        for seg in seg_labels(client, datastore.list_images(), self.output_dir / "pacs_labels"):
            try:
                image = load_volume(datastore.get_image_uri(seg.image_id))
                label, names = read_seg(seg.path)
            except VolumeError as e:
                notes.append(f"skipped SEG {seg.seg_uid}: {e}")
                continue
            volumes.append(LabelledVolume(image, label_in_grid(label, image), names, seg.image_id))
        return volumes

    def _volumes(self, datastore: Datastore, notes: list[str]) -> list[LabelledVolume]:
        if self.dicomweb_url:
            volumes = self._pacs_volumes(datastore, notes)
            if not volumes:
                raise TrainingDataError("no DICOM-SEG in the PACS references a listed series: save a label first")
            notes.append(f"{len(volumes)} labelled series (DICOM-SEG): {[v.image_id for v in volumes]}")
            return volumes
        volumes = []
        for image_id in datastore.get_labeled_images(DefaultLabelTag.FINAL.value):
            label_uri = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL.value)
            info = datastore.get_label_info(image_id, DefaultLabelTag.FINAL.value) or {}
            names = names_from_label_info(info)
            volumes.append(LabelledVolume(Path(datastore.get_image_uri(image_id)), Path(label_uri), names, image_id))
        if not volumes:
            raise TrainingDataError("no submitted final labels yet: save at least one label before training")
        notes.append(f"{len(volumes)} labelled image(s): {[v.image_id for v in volumes]}")
        return volumes

    @staticmethod
    def world_size(request: dict) -> tuple[int, str]:
        """(processes, backend): MONAI Label's ``multi_gpu``/``gpus`` on a multi-GPU machine, or
        ``distributed_world_size`` CPU processes with gloo (for machines without GPUs, and tests)."""
        cpu_world = int(first_item(request, "distributed_world_size", 1) or 1)
        if cpu_world > 1:
            return cpu_world, "gloo"
        multi = str(first_item(request, "multi_gpu", False)).lower() in ("1", "true", "yes")
        gpus = torch.cuda.device_count()
        if multi and gpus > 1:
            wanted = str(first_item(request, "gpus", "all"))
            count = gpus if wanted in ("all", "") else len([g for g in wanted.split(",") if g.strip()])
            return min(count, gpus), "nccl"
        return 1, ""

    def _run(
        self, settings: TrainSettings, publish: str, stats: dict, datastore: Datastore, request: dict
    ) -> dict[str, Any]:
        notes: list[str] = []
        device = self.segmenter.device
        served = self.segmenter.current()
        model, start_adapters = self._start_model(served.model, settings, notes)
        model = model.to(device)
        model.freeze_all_but(self.parts(settings))
        volumes = self._volumes(datastore, notes)
        train_vols, val_vols, split_note = split_volumes(volumes, settings.val_fraction, settings.seed)
        notes.append(split_note)

        def usable(vols: list[LabelledVolume]) -> list:
            samples = []
            for vol in vols:
                try:
                    samples += prepare_samples(model, [vol], self.segmenter.profile.preprocessing, settings, device)
                except TrainingDataError as e:
                    notes.append(f"skipped {vol.image_id}: {e}")
            return samples

        world, backend = self.world_size(request)
        counts = model.parameter_counts()
        stats.update(
            notes=notes,
            validation=split_note,
            trainable_parameters=counts["trainable"],
            total_parameters=counts["total"],
            parts=self.parts(settings),
            world_size=world,
        )
        head_known = any(n in model.labels for v in train_vols for n in v.names.values())
        if world > 1:
            job = DistributedJob(
                replace(self.segmenter.profile, adapters=model.adapter_settings),
                start_adapters,
                tuple(self.parts(settings)),
                tuple(train_vols),
                tuple(val_vols),
                settings,
                self.segmenter.feeds_logits(served),
                Path(tempfile.mkdtemp(prefix="medsam_ddp_")),
                backend,
            )
            write_json_atomic(self.stats_path, stats)
            result = train_distributed(job, world)
        else:
            train, val = usable(train_vols), usable(val_vols)
            if not train:
                raise TrainingDataError("no usable training slices in the submitted labels: " + "; ".join(notes))

            def progress(entry: dict) -> None:
                stats.update(
                    epoch=entry["epoch"], best_metric=entry["best_metric"], best_epoch=entry["best_epoch"], last=entry
                )
                write_json_atomic(self.stats_path, stats)

            trainer = AdapterTrainer(model, settings, device)
            result = trainer.fit(train, val, self.segmenter.feeds_logits(served), progress=progress)
            head_known = any(s.head_target is not None for s in train)
        stats.update(epoch=result.epochs_run, best_epoch=result.best_epoch)
        notes += result.notes
        out: dict[str, Any] = {
            "before": result.before,
            "after": result.after,
            "history": result.history,
            "best_epoch": result.best_epoch,
            "train_seconds": round(result.seconds, 1),
            "started_from": served.name,
            "notes": notes,
        }
        if result.best_state is None and not (publish == "always" or not val_vols):
            out["published_version"] = None
            notes.append(f"not published: the served adapters ({served.name}) stay in use")
            return out
        state = result.best_state or model.adaptable_state()
        with torch.no_grad():
            own = dict(model.named_parameters())
            for name, tensor in state.items():
                own[name].copy_(tensor)
        directory = self.segmenter.adapter_dir
        head_trained = settings.train_prompt_free_head and head_known
        metrics = {
            "before": result.before,
            "after": result.after,
            "trained_with_mask_prompts": True,
            "trained_multimask_single_click": settings.multimask_single_click,
            "prompt_free_head_trained": head_trained or model.prompt_free_head_trained,
            "images": [v.image_id for v in train_vols],
            "validation_images": [v.image_id for v in val_vols],
            "settings": asdict(settings),
            "started_from": served.name,
        }
        from ..serving.decoder_runtime import export_ahead

        export_ahead(model, self.segmenter.profile.inference.decoder_runtime)  # the new version's decoder graph
        version = publish_adapters(model, directory, metrics)
        out["published_version"] = version
        notes.append(f"published adapters v{version}")
        return out
