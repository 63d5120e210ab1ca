"""A local MONAI Label datastore that refuses what would damage it and never loses a label.

Over MONAI Label's ``LocalDatastore`` it adds: ids and tags that cannot name a path outside the
datastore; uploads checked (size, readable 3D image, label in the image's exact grid and geometry)
before anything on disk changes; atomic writes (temporary file, fsync, rename) of images, labels and
``datastore_v2.json``; and a history that keeps every replaced or removed label.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from lib.core.atomic import atomic_write
from lib.core.volume import VolumeError, label_problem, load_volume

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
HISTORY_DIR = ".label_history"
DEFAULT_MAX_UPLOAD_MB = 2048.0
FILE_MODE = 0o644  # what shutil.copy would give; mkstemp's 0600 would hide files from other users


def max_upload_mb(conf: dict[str, str] | None) -> float:
    """The upload limit in MiB from ``--conf max_upload_mb`` (default 2048)."""
    raw = (conf or {}).get("max_upload_mb", DEFAULT_MAX_UPLOAD_MB)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"--conf max_upload_mb: expected a number of MiB, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"--conf max_upload_mb must be positive, got {raw!r}")
    return value


def check_name(value: str, what: str) -> str:
    """An image id or label tag usable as a file name inside the datastore (no path components)."""
    if not isinstance(value, str) or not SAFE_NAME.match(value) or ".." in value:
        raise HTTPException(
            status_code=422,
            detail=f"{what} {value!r} is not allowed: use letters, digits, '.', '_' and '-' (no path components)",
        )
    return value


def fsync_copy(source: str | Path, destination: Path) -> None:
    """Copy ``source`` over ``destination`` atomically (a partial file is never visible)."""
    with atomic_write(destination, suffix=".partial", file_mode=FILE_MODE) as out, open(source, "rb") as src:
        shutil.copyfileobj(src, out, 1 << 20)


class GuardedDatastore(LocalDatastore):
    """``LocalDatastore`` with input checks, atomic writes and a label history (see module doc)."""

    def __init__(self, datastore_path: str, max_upload_mb: float, **kwargs: Any) -> None:
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        self._write_lock = threading.Lock()
        super().__init__(datastore_path, **kwargs)

    # -- checks -----------------------------------------------------------------------------------
    def _check_upload(self, filename: str) -> None:
        size = os.path.getsize(filename)
        if size > self.max_upload_bytes:
            raise HTTPException(
                status_code=413,
                detail=f"upload of {size} bytes exceeds the limit of {self.max_upload_bytes} (--conf max_upload_mb)",
            )
        if size == 0:
            raise HTTPException(status_code=422, detail="the uploaded file is empty")

    @staticmethod
    def _read(filename: str, what: str):
        try:
            return load_volume(filename)
        except VolumeError as e:
            raise HTTPException(status_code=415, detail=f"{what}: {e}") from None

    def _known_image(self, image_id: str) -> ImageLabelModel:
        obj = self._datastore.objects.get(image_id) if isinstance(image_id, str) else None
        if obj is None:
            raise HTTPException(status_code=404, detail=f"unknown image {image_id!r}")
        return obj

    # -- history ----------------------------------------------------------------------------------
    def history_dir(self, image_id: str, tag: str) -> Path:
        """Where earlier versions of the ``tag`` label of ``image_id`` are kept (oldest first by name)."""
        return Path(self._datastore_path) / HISTORY_DIR / tag / image_id

    def label_history(self, image_id: str, tag: str) -> list[Path]:
        folder = self.history_dir(image_id, tag)
        return sorted(folder.iterdir()) if folder.is_dir() else []

    def _archive(self, current: Path, image_id: str, tag: str, ext: str) -> None:
        folder = self.history_dir(image_id, tag)
        folder.mkdir(parents=True, exist_ok=True)
        fsync_copy(current, folder / f"{time.time_ns()}{ext}")

    # -- writes -----------------------------------------------------------------------------------
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        derived, image_ext = self._to_id(os.path.basename(image_filename))
        image_id = check_name(image_id or derived, "image id")
        self._check_upload(image_filename)
        self._read(image_filename, "image")
        dest = Path(self._datastore.image_path()) / self._filename(image_id, image_ext)
        with self._write_lock, FileLock(self._lock_file):
            if image_id in self._datastore.objects:
                raise HTTPException(
                    status_code=409, detail=f"image {image_id!r} exists already; its labels refer to it"
                )
            fsync_copy(image_filename, dest)
            info = dict(image_info or {}, ts=int(time.time()), name=dest.name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=image_ext))
            self._update_datastore_file(lock=False)
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_name(label_tag, "label tag")
        obj = self._known_image(image_id)
        self._check_upload(label_filename)
        label = self._read(label_filename, "label")
        image = self._read(self.get_image_uri(image_id), "stored image")
        problem = label_problem(label, image)
        if problem:
            raise HTTPException(status_code=422, detail=f"label does not fit image {image_id!r}: {problem}")
        _, label_ext = self._to_id(os.path.basename(label_filename))
        folder = Path(self._datastore.label_path(label_tag))
        dest = folder / self._filename(image_id, label_ext)
        with self._write_lock, FileLock(self._lock_file):
            folder.mkdir(parents=True, exist_ok=True)
            previous = obj.labels.get(label_tag)
            if previous is not None:
                current = folder / self._filename(image_id, previous.ext)
                if current.is_file():
                    self._archive(current, image_id, label_tag, previous.ext)
                if current != dest:
                    current.unlink(missing_ok=True)  # the same label in another format: archived above
            fsync_copy(label_filename, dest)
            info = dict(label_info or {}, ts=int(time.time()), name=dest.name)
            obj.labels[label_tag] = DataModel(info=info, ext=label_ext)
            self._update_datastore_file(lock=False)
        return image_id

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_name(label_tag, "label tag")
        obj = self._known_image(label_id)
        label = obj.labels.get(label_tag)
        if label is None:
            raise HTTPException(status_code=404, detail=f"image {label_id!r} has no {label_tag!r} label")
        current = Path(self._datastore.label_path(label_tag)) / self._filename(label_id, label.ext)
        with self._write_lock:
            if current.is_file():
                self._archive(current, label_id, label_tag, label.ext)
        super().remove_label(label_id, label_tag)

    def remove_image(self, image_id: str) -> None:
        self._known_image(image_id)
        super().remove_image(image_id)

    def _update_datastore_file(self, lock: bool = True) -> None:
        """Write ``datastore_v2.json`` atomically: a server killed mid-write must still start."""

        def write() -> None:
            self._ignore_event_config = True
            path = Path(self._datastore_config_path)
            with atomic_write(path, mode="w", suffix=".partial", file_mode=FILE_MODE) as fh:
                fh.write(self._datastore.model_dump_json(exclude={"base_path"}, indent=2))
            self._config_ts = os.stat(path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()
