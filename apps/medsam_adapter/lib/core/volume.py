"""Volumes as stored (array in file index order + RAS affine), read and written with nibabel / pynrrd."""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".seg.nrrd")


class VolumeError(ValueError):
    """A file is not a readable image volume of the kind expected."""


@dataclass(frozen=True)
class Volume:
    """A 3D array indexed [i, j, k] as stored in the file, and its voxel-to-RAS (mm) affine."""

    array: np.ndarray
    affine: np.ndarray
    # derived per-volume values (e.g. intensity windows), memoised with the volume in its cache
    derived: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".png", ".jpg", ".jpeg"):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _as_3d(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim == 4 and array.shape[3] == 1:
        return array[..., 0]
    if array.ndim != 3:
        raise VolumeError(f"{path.name}: expected a 3D image, got {array.ndim}D with shape {array.shape}")
    return array


def load_volume(path: str | Path) -> Volume:
    """Read a NIfTI, NRRD or 2D PNG/JPG file without reorienting it."""
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"image file not found: {path}")
    kind = _suffix(path)
    try:
        if kind in NIFTI_SUFFIXES:
            img = nib.load(str(path))
            array, affine = np.asanyarray(img.dataobj), img.affine
        elif kind in NRRD_SUFFIXES:
            array, header = nrrd.read(str(path))
            affine = nrrd_affine(header, array.ndim)
        elif kind in (".png", ".jpg", ".jpeg"):
            from PIL import Image

            with Image.open(path) as im:
                gray = np.asarray(im.convert("L"))
            # a 2D picture: rows top to bottom, columns left to right; store as [col, row] like a
            # NIfTI written from it (i = x), with an LPS-like affine so the display keeps its look.
            array = gray.T
            affine = np.diag([-1.0, -1.0, 1.0, 1.0])
        else:
            raise VolumeError(f"{path.name}: unsupported image format (use NIfTI, NRRD, PNG or JPG)")
    except VolumeError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise VolumeError(f"{path.name}: cannot read image ({type(e).__name__}: {e})") from None
    array = _as_3d(np.asarray(array), path)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(f"{path.name}: image has an invalid (singular or non-finite) affine")
    return Volume(array, np.asarray(affine, dtype=np.float64))


def volume_from_sitk(image) -> Volume:
    """A SimpleITK image (ITK's [k, j, i] array, LPS direction, spacing and origin) as a Volume."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # ITK [k, j, i] -> stored [i, j, k]
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return Volume(np.ascontiguousarray(array), LPS_TO_RAS @ lps)


def volume_from_bytes(content: bytes, suffix: str) -> Volume:
    """A volume from file bytes (an HTTP answer or upload); ``suffix`` names the format (``.nrrd``, ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"volume{suffix}"
        path.write_bytes(content)
        return load_volume(path)


def label_problem(label: Volume, image: Volume, max_value: int = 65535) -> str | None:
    """Why ``label`` cannot be a label of ``image`` (None when it fits): same voxel grid and
    geometry (affine within 1e-3 mm / 1e-4 of a direction), whole non-negative values."""
    if label.shape != image.shape:
        return f"label shape {label.shape} differs from the image's {image.shape}"
    scale = np.abs(image.affine[:3, :3]).max()
    if not np.allclose(label.affine[:3, :3], image.affine[:3, :3], atol=1e-4 * scale) or not np.allclose(
        label.affine[:3, 3], image.affine[:3, 3], atol=1e-3
    ):
        return "label geometry (spacing, direction or origin) differs from the image's"
    array = label.array
    if array.dtype.kind not in "biuf":
        return f"label voxels must be numbers, got dtype {array.dtype}"
    if array.dtype.kind == "f" and (not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array))):
        return "label voxels must be whole numbers (a float label has fractional or non-finite values)"
    if array.size and (array.min() < 0 or array.max() > max_value):
        return f"label values must lie in 0..{max_value}, got {array.min()}..{array.max()}"
    return None


def label_in_grid(label: Volume, grid: Volume) -> Volume:
    """``label`` placed into ``grid``'s voxels by nearest neighbour in physical space (0 outside it):
    for labels stored on a part of the image's grid, such as a DICOM-SEG that holds only the
    labelled slices."""
    if label.shape == grid.shape and np.allclose(label.affine, grid.affine, atol=1e-3):
        return Volume(label.array, grid.affine)
    to_label = np.linalg.inv(label.affine) @ grid.affine
    out = np.zeros(grid.shape, dtype=label.array.dtype)
    i, j = np.meshgrid(np.arange(grid.shape[0]), np.arange(grid.shape[1]), indexing="ij")
    for k in range(grid.shape[2]):  # slice by slice: bounded memory on large volumes
        ijk = np.stack([i, j, np.full_like(i, k)], -1) @ to_label[:3, :3].T + to_label[:3, 3]
        ijk = np.rint(ijk).astype(np.int64)
        inside = np.all((ijk >= 0) & (ijk < np.array(label.shape)), axis=-1)
        out[:, :, k][inside] = label.array[tuple(ijk[inside].T)]
    return Volume(out, grid.affine)


def nrrd_affine(header: dict, ndim: int) -> np.ndarray:
    """Voxel-to-RAS affine from an NRRD header (space directions are rows, one per axis)."""
    directions = header.get("space directions")
    origin = header.get("space origin")
    affine = np.eye(4)
    if directions is not None:
        rows = [np.asarray(d, dtype=np.float64) for d in directions if d is not None and np.all(np.isfinite(d))]
        if len(rows) < 2:
            raise VolumeError("NRRD header has no usable space directions")
        mat = np.stack(rows[:3], axis=1)
        if mat.shape[1] == 2:
            normal = np.cross(mat[:, 0], mat[:, 1])
            mat = np.column_stack([mat, normal / max(float(np.linalg.norm(normal)), 1e-12)])
        affine[:3, :3] = mat
    if origin is not None:
        affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("left-posterior-superior", "lps"):
        affine = LPS_TO_RAS @ affine
    elif space not in ("right-anterior-superior", "ras"):
        raise VolumeError(f"NRRD space {space!r} is not supported")
    return affine


def write_label(array: np.ndarray, affine: np.ndarray, path: str | Path, compress: bool = True) -> Path:
    """Write a label volume with the given affine; the format follows the suffix (.nrrd or .nii/.nii.gz).
    ``compress=False`` writes NRRD with raw encoding (what OHIF asks for)."""
    path = Path(path)
    kind = _suffix(path)
    if kind in NRRD_SUFFIXES:
        lps = np.linalg.inv(LPS_TO_RAS) @ affine
        header = {
            "space": "left-posterior-superior",
            "space directions": lps[:3, :3].T,
            "space origin": lps[:3, 3],
            "kinds": ["domain", "domain", "domain"],
            "encoding": "gzip" if compress else "raw",
        }
        # gzip level 1: labels are mostly zeros, so it is as small as level 9 and many times faster
        nrrd.write(str(path), np.asarray(array), header, index_order="F", compression_level=1)
    elif kind in NIFTI_SUFFIXES:
        img = nib.Nifti1Image(np.asarray(array), affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, str(path))
    else:
        raise VolumeError(f"unsupported result extension for {path.name} (use .nrrd, .nii or .nii.gz)")
    return path


def temp_label_path(extension: str) -> Path:
    fd, name = tempfile.mkstemp(suffix=extension, prefix="medsam_")
    os.close(fd)
    return Path(name)


class VolumeCache:
    """LRU cache of loaded volumes keyed by (path, size, mtime), bounded in megabytes, thread-safe."""

    def __init__(self, max_mb: float) -> None:
        self.max_bytes = int(max_mb * 1e6)
        self._items: OrderedDict[tuple, Volume] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0

    def get(self, path: str | Path) -> Volume:
        path = Path(path)
        try:
            st = path.stat()
        except OSError:
            raise VolumeError(f"image file not found: {path}") from None
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        volume = load_volume(path)
        with self._lock:
            if key not in self._items and volume.array.nbytes <= self.max_bytes:
                self._items[key] = volume
                self._bytes += volume.array.nbytes
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.array.nbytes
        return volume

    def peek(self, path: str | Path) -> Volume | None:
        """The volume when it is loaded already (never reads the file)."""
        path = Path(path)
        try:
            st = path.stat()
        except OSError:
            return None
        with self._lock:
            return self._items.get((str(path.resolve()), st.st_size, st.st_mtime_ns))

    @property
    def nbytes(self) -> int:
        return self._bytes
