"""A local MONAI Label datastore that refuses what would damage it and never loses a label.

Over MONAI Label's ``LocalDatastore`` it adds: ids and tags that cannot name a path outside the
datastore; uploads checked (size, readable 3D image, label in the image's exact grid and geometry)
before anything on disk changes; atomic writes (temporary file, fsync, rename) of images, labels and
``datastore_v2.json``; and a history that keeps every replaced or removed label.

Several processes share one datastore: the server, and the subprocesses MONAI Label starts for scoring
and training, each with its own copy of ``datastore_v2.json`` in memory. Every change is therefore a
transaction under the folder's file lock: reload the file if another process replaced it, apply the
change, write. (MONAI Label's own read-modify-write wrote a stale copy: a scoring subprocess started
before a label was saved dropped that label from the file when it stored its scores.)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from watchdog.events import FileSystemEvent

from lib.conf_values import conf_float
from lib.core.atomic import atomic_write
from lib.core.volume import VolumeError, label_problem, load_volume

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
HISTORY_DIR = ".label_history"
DEFAULT_MAX_UPLOAD_MB = 2048.0
logger = logging.getLogger(__name__)
FILE_MODE = 0o644  # what shutil.copy would give; mkstemp's 0600 would hide files from other users


def max_upload_mb(conf: dict[str, str] | None) -> float:
    """The upload limit in MiB from ``--conf max_upload_mb`` (default 2048; a finite number above 0)."""
    return conf_float(conf or {}, "max_upload_mb", DEFAULT_MAX_UPLOAD_MB, 0, above=True)


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
    """``LocalDatastore`` with input checks, atomic writes, a label history and changes made as
    transactions across processes (see module doc)."""

    def __init__(self, datastore_path: str, max_upload_mb: float, **kwargs: Any) -> None:
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        # one lock object: re-entrant within a thread, exclusive between threads and processes
        self._lock = FileLock(os.path.join(datastore_path, ".lock"))
        self._loaded: tuple[int, int, int] | None = None  # (inode, mtime ns, size) of the file in memory
        super().__init__(datastore_path, **kwargs)
        handler = getattr(self, "_handler", None)
        if handler is not None:  # auto reload: atomic writes by other processes arrive as moves
            handler.on_moved = self._on_moved_event

    # -- the file shared with other processes ------------------------------------------------------
    def _file_identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._datastore_config_path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        """Load ``datastore_v2.json`` unless the copy in memory is the one on disk."""
        with self._lock:
            identity = self._file_identity()
            if identity is None or identity == self._loaded:
                return
            try:
                text = Path(self._datastore_config_path).read_text()
                model = LocalDatastoreModel.model_validate_json(text)
            except ValueError as e:
                if throw_exception:
                    raise
                logger.error("datastore file not reloaded: %s", e)
                return
            model.base_path = self._datastore_path
            self._datastore, self._loaded = model, identity

    def _update_datastore_file(self, lock: bool = True) -> None:
        """Write ``datastore_v2.json`` atomically: a server killed mid-write must still start. (``lock`` is
        MONAI Label's argument; the lock here is re-entrant, so it is always taken.)"""
        with self._lock:
            path = Path(self._datastore_config_path)
            with atomic_write(path, mode="w", suffix=".partial", file_mode=FILE_MODE) as fh:
                fh.write(self._datastore.model_dump_json(exclude={"base_path"}, indent=2))
            self._loaded = self._file_identity()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """Hold the lock, start from the file on disk, write it back when the block succeeds."""
        with self._lock:
            self._init_from_datastore_file()
            try:
                yield
            except BaseException:
                self._loaded = None  # memory may hold half a change: start again from the file
                self._init_from_datastore_file()
                raise
            self._update_datastore_file()

    def _reconcile_datastore(self) -> None:
        """MONAI Label's reconciliation with the files on disk, as one transaction."""
        with self._lock:
            super()._reconcile_datastore()

    def _on_moved_event(self, event: FileSystemEvent) -> None:
        if os.fsdecode(event.dest_path) == self._datastore_config_path:
            self._init_from_datastore_file()
        else:
            self.refresh()  # an image or label moved into (or out of) the datastore

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

    def _known_label(self, image_id: str, tag: str) -> DataModel:
        label = self._known_image(image_id).labels.get(tag)
        if label is None:
            raise HTTPException(status_code=404, detail=f"image {image_id!r} has no {tag!r} label")
        return label

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

    # -- writes (each one a transaction) ---------------------------------------------------------
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        derived, image_ext = self._to_id(os.path.basename(image_filename))
        image_id = check_name(image_id or derived, "image id")
        self._check_upload(image_filename)
        self._read(image_filename, "image")
        dest = Path(self._datastore.image_path()) / self._filename(image_id, image_ext)
        with self._transaction():
            if image_id in self._datastore.objects:
                raise HTTPException(
                    status_code=409, detail=f"image {image_id!r} exists already; its labels refer to it"
                )
            fsync_copy(image_filename, dest)
            info = dict(image_info or {}, ts=int(time.time()), name=dest.name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=image_ext))
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_name(label_tag, "label tag")
        self._known_image(image_id)
        self._check_upload(label_filename)
        label = self._read(label_filename, "label")
        image = self._read(self.get_image_uri(image_id), "stored image")
        problem = label_problem(label, image)
        if problem:
            raise HTTPException(status_code=422, detail=f"label does not fit image {image_id!r}: {problem}")
        _, label_ext = self._to_id(os.path.basename(label_filename))
        folder = Path(self._datastore.label_path(label_tag))
        dest = folder / self._filename(image_id, label_ext)
        with self._transaction():
            obj = self._known_image(image_id)
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
        return image_id

    def _drop_label(self, obj: ImageLabelModel, image_id: str, tag: str) -> None:
        """Archive the ``tag`` label of ``image_id``, then remove it (file and entry)."""
        label = obj.labels.pop(tag)
        current = Path(self._datastore.label_path(tag)) / self._filename(image_id, label.ext)
        if current.is_file():
            self._archive(current, image_id, tag, label.ext)
            current.unlink()

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_name(label_tag, "label tag")
        with self._transaction():
            self._known_label(label_id, label_tag)
            self._drop_label(self._known_image(label_id), label_id, label_tag)

    def remove_image(self, image_id: str) -> None:
        with self._transaction():
            obj = self._known_image(image_id)
            for tag in list(obj.labels):
                self._drop_label(obj, image_id, tag)
            image = Path(self._datastore.image_path()) / self._filename(image_id, obj.image.ext)
            image.unlink(missing_ok=True)
            del self._datastore.objects[image_id]

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        with self._transaction():
            self._known_image(image_id).image.info.update(info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        with self._transaction():
            self._known_label(label_id, label_tag).info.update(info)
