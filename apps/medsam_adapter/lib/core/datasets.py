"""Labelled datasets for training and evaluation: image/label volume pairs, 2D PNG slices with one mask
per structure, ``.npz`` volumes (MedSAM's ``imgs``/``gts`` layout) and DICOM series with a DICOM-SEG.
Every case becomes a pair of :class:`Volume` objects in the same grid plus the names of its label values."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .volume import LPS_TO_RAS, Volume, VolumeError, load_volume, volume_from_sitk

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd")


class DatasetError(ValueError):
    """A dataset folder or file cannot be read as labelled cases."""


@dataclass
class LabelledCase:
    case_id: str
    image: Volume
    label: Volume  # integer label values in the image's grid
    names: dict[int, str] = field(default_factory=dict)  # label value -> structure name
    source: str = ""  # dataset the case came from

    def structures(self, wanted: Sequence[str | int] | None = None) -> dict[int, str]:
        """Label values present in the case (optionally only those named or numbered in ``wanted``)."""
        present = [int(v) for v in np.unique(self.label.array) if v > 0]
        named = {v: self.names.get(v, str(v)) for v in present}
        if not wanted:
            return named
        keep = {str(w) for w in wanted}
        return {v: n for v, n in named.items() if n in keep or str(v) in keep}


def _checked(case_id: str, image: Volume, label: Volume) -> None:
    if image.shape != label.shape:
        raise DatasetError(f"{case_id}: label shape {label.shape} != image shape {image.shape}")
    if not np.allclose(image.affine, label.affine, atol=1e-3):
        raise DatasetError(f"{case_id}: label geometry differs from its image")


def read_label_names(path: Path) -> dict[int, str]:
    """A label-name file, {value: name} or {name: value} (MONAI Label's ``label_info`` style)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object of label names and values")
    try:
        return {int(k): str(v) for k, v in data.items()}
    except ValueError:
        return {int(v): str(k) for k, v in data.items()}


def volume_pair(image: Path, label: Path, names: dict[int, str] | None = None, case_id: str = "",
                source: str = "") -> LabelledCase:
    """One NIfTI/NRRD image and its label volume."""
    img, lab = load_volume(image), load_volume(label)
    case = LabelledCase(case_id or image.name, img, lab, dict(names or {}), source)
    _checked(case.case_id, img, lab)
    return case


def _stem(path: Path) -> str:
    name = path.name
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return path.stem


def image_label_folder(images: Path, labels: Path, source: str = "") -> list[LabelledCase]:
    """Images in ``images`` and labels of the same name (any volume suffix) in ``labels`` — the layout
    of a MONAI Label datastore (``labels/final``). Label values are named by ``<name>.labels.json`` next
    to a label, or by one ``labels.json`` in either folder."""
    shared_names = read_label_names(labels / "labels.json") or read_label_names(images / "labels.json")
    by_stem = {_stem(p): p for p in labels.iterdir() if p.name.endswith(IMAGE_SUFFIXES)}
    cases = []
    for image in sorted(p for p in images.iterdir() if p.name.endswith(IMAGE_SUFFIXES)):
        label = by_stem.get(_stem(image))
        if label is not None and label.resolve() != image.resolve():
            names = read_label_names(labels / f"{_stem(image)}.labels.json") or shared_names
            cases.append(volume_pair(image, label, names, _stem(image), source))
    if not cases:
        raise DatasetError(f"no image in {images} has a label of the same name in {labels}")
    return cases


def png_mask_set(index: Path, source: str = "") -> list[LabelledCase]:
    """2D PNG slices with one binary PNG mask per structure, listed in a JSON index, either
    {image: [mask, ...]} or {mask: image} (paths relative to the index's folder, any leading folder
    names that do not exist are dropped). The structure name is the mask name after the image's name.
    A ``pixel_spacing.json`` beside the index ({image file: [row_mm, col_mm]}) gives physical pixel sizes."""
    data = json.loads(index.read_text())
    if not isinstance(data, dict) or not data:
        raise DatasetError(f"{index}: expected a JSON object mapping images to masks or masks to images")
    pairs: dict[str, list[str]] = {}
    for key, value in data.items():
        if isinstance(value, list):
            pairs.setdefault(key, []).extend(value)
        else:
            pairs.setdefault(str(value), []).append(key)
    root = index.parent
    spacing_file = root / "pixel_spacing.json"
    spacings = json.loads(spacing_file.read_text()) if spacing_file.is_file() else {}

    def resolve(rel: str) -> Path:
        parts = Path(rel).parts
        for i in range(len(parts)):
            candidate = root.joinpath(*parts[i:])
            if candidate.is_file():
                return candidate
        raise DatasetError(f"{index.name}: {rel} not found under {root}")

    cases = []
    for image_rel, mask_rels in sorted(pairs.items()):
        image = load_volume(resolve(image_rel))
        row_mm, col_mm = spacings.get(Path(image_rel).name, (1.0, 1.0))
        if (row_mm, col_mm) != (1.0, 1.0):  # array axes are (col, row): see load_volume
            affine = image.affine.copy()
            affine[:3, 0] *= float(col_mm)
            affine[:3, 1] *= float(row_mm)
            image = Volume(image.array, affine)
        stem = Path(image_rel).stem
        label = np.zeros(image.shape, dtype=np.uint8)
        names: dict[int, str] = {}
        for value, mask_rel in enumerate(sorted(mask_rels), start=1):
            mask = load_volume(resolve(mask_rel)).array > 0
            if mask.shape != image.shape:
                raise DatasetError(f"{mask_rel}: mask shape {mask.shape} != image shape {image.shape}")
            label[mask & (label == 0)] = value  # the first mask keeps overlapping pixels
            name = Path(mask_rel).stem
            name = name[len(stem) + 1 :] if name.startswith(stem + "_") else name
            names[value] = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
        cases.append(LabelledCase(stem, image, Volume(label, image.affine), names, source))
    return cases


def npz_volume(path: Path, source: str = "") -> LabelledCase:
    """MedSAM-style ``.npz``: ``imgs`` and ``gts`` as (z, y, x), optional ITK ``spacing`` (x, y, z),
    ``direction`` (row-major 3x3) and ``origin`` (LPS)."""
    try:
        with np.load(path) as z:
            imgs, gts = np.asarray(z["imgs"]), np.asarray(z["gts"])
            spacing = np.asarray(z["spacing"], dtype=np.float64) if "spacing" in z else np.ones(3)
            direction = np.asarray(z["direction"], dtype=np.float64).reshape(3, 3) if "direction" in z else np.eye(3)
            origin = np.asarray(z["origin"], dtype=np.float64) if "origin" in z else np.zeros(3)
    except (OSError, KeyError, ValueError) as e:
        raise DatasetError(f"{path.name}: not a MedSAM npz with imgs/gts ({e})") from None
    if imgs.ndim == 2:
        imgs, gts = imgs[None], gts[None]
    if imgs.shape != gts.shape or imgs.ndim != 3:
        raise DatasetError(f"{path.name}: imgs {imgs.shape} and gts {gts.shape} must be matching (z, y, x) arrays")
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = origin
    affine = LPS_TO_RAS @ lps
    image = Volume(np.ascontiguousarray(imgs.transpose(2, 1, 0)), affine)
    label = Volume(np.ascontiguousarray(gts.transpose(2, 1, 0)), affine)
    return LabelledCase(path.stem, image, label, {}, source)


def dicom_series(folder: Path) -> Volume:
    """A DICOM image series (one folder), read by SimpleITK's series reader in position order."""
    import SimpleITK as sitk

    try:
        reader = sitk.ImageSeriesReader()
        names = reader.GetGDCMSeriesFileNames(str(folder))
        if not names:
            raise DatasetError(f"{folder}: no DICOM series")
        reader.SetFileNames(names)
        image = reader.Execute()
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad series
        raise DatasetError(f"{folder}: cannot read DICOM series ({type(e).__name__}: {e})") from None
    return volume_from_sitk(image)


def dicom_series_with_seg(folder: Path, seg: Path, source: str = "") -> LabelledCase:
    """A DICOM series and a DICOM-SEG of it, the SEG's segments placed into the series' grid and named
    by the SEG (``lib.core.dicom_seg``)."""
    from .dicom_seg import read_seg
    from .volume import label_in_grid

    image = dicom_series(folder)
    label, names = read_seg(seg)
    return LabelledCase(folder.name, image, label_in_grid(label, image), names, source)


def case_folders(root: Path, image_name: str, label_name: str, source: str = "") -> list[LabelledCase]:
    """One sub-folder per case holding ``image_name`` and ``label_name`` (e.g. BraTS' flair + label), or
    ``root`` itself as the one case; a ``labels.json`` in the case folder names the label values."""
    folders = [root] if (root / image_name).is_file() else sorted(d for d in root.iterdir() if d.is_dir())
    cases = [
        volume_pair(d / image_name, d / label_name, read_label_names(d / "labels.json"),
                    d.name if d != root else f"{root.name}_{_stem(Path(image_name))}", source)
        for d in folders
        if (d / image_name).is_file() and (d / label_name).is_file()
    ]
    if not cases:
        raise DatasetError(f"no sub-folder of {root} holds both {image_name} and {label_name}")
    return cases


def merge_structures(cases: Sequence[LabelledCase], name: str = "foreground") -> list[LabelledCase]:
    """Every label value > 0 as one structure (e.g. BraTS whole tumour)."""
    return [
        LabelledCase(c.case_id, c.image, Volume((c.label.array > 0).astype(np.uint8), c.label.affine), {1: name},
                     c.source)
        for c in cases
    ]


def load_dataset(
    path: str | Path,
    labels: str | Path | None = None,
    image_name: str | None = None,
    label_name: str | None = None,
) -> list[LabelledCase]:
    """Any supported dataset: a folder of ``.npz`` files, a PNG mask index (``.json``, or a folder that
    holds ``image2label_*.json`` / ``label2image_*.json``), one sub-folder per case (``image_name`` and
    ``label_name`` given), or an image folder with a label folder (``labels`` given, else
    ``<path>/labels/final`` or ``<path>/labels``)."""
    path = Path(path)
    if image_name and label_name:
        return case_folders(path, image_name, label_name, path.name)
    source = path.name
    if path.is_file() and path.suffix == ".json":
        return png_mask_set(path, source)
    if path.is_file() and path.suffix == ".npz":
        return [npz_volume(path, source)]
    if not path.is_dir():
        raise DatasetError(f"dataset not found: {path}")
    npz = sorted(path.glob("*.npz"))
    if npz:
        return [npz_volume(p, source) for p in npz]
    indexes = sorted(path.glob("image2label_*.json")) + sorted(path.glob("label2image_*.json"))
    if indexes:
        return [case for index in indexes for case in png_mask_set(index, source)]
    if labels is None:
        labels = next((p for p in (path / "labels" / "final", path / "labels") if p.is_dir()), None)
        if labels is None:
            raise DatasetError(f"{path}: no .npz, no PNG mask index and no labels folder; pass the label folder")
    return image_label_folder(path, Path(labels), source)


def iter_slices(case: LabelledCase, axis: int = 2) -> Iterator[int]:
    """Indices of the slices along ``axis`` that hold any label."""
    values = case.label.array
    other = tuple(a for a in range(3) if a != axis)
    yield from (int(k) for k in np.flatnonzero(values.any(axis=other)))


__all__ = [
    "DatasetError",
    "case_folders",
    "merge_structures",
    "LabelledCase",
    "VolumeError",
    "image_label_folder",
    "iter_slices",
    "load_dataset",
    "npz_volume",
    "png_mask_set",
    "read_label_names",
    "volume_pair",
]
