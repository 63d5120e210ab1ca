"""Final labels kept in a PACS: the newest DICOM-SEG of each image series, fetched over DICOMweb."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegLabel:
    image_id: str  # SeriesInstanceUID of the labelled image series
    seg_uid: str  # SeriesInstanceUID of the SEG
    path: Path  # the SEG file, downloaded


def _created(meta: Dataset) -> str:
    for date, time in (("ContentDate", "ContentTime"), ("SeriesDate", "SeriesTime"), ("StudyDate", "StudyTime")):
        if meta.get(date):
            return f"{meta.get(date)}{meta.get(time) or ''}"
    return ""


def seg_labels(client: DICOMwebClient, image_ids: Iterable[str], cache: Path) -> list[SegLabel]:
    """The newest SEG (by content date and time) that references each of ``image_ids``, downloaded
    into ``cache`` once. SEGs referencing other series, or none, are skipped with a log line."""
    wanted = set(image_ids)
    newest: dict[str, tuple[str, str, str]] = {}  # image -> (created, study uid, seg uid)
    for record in client.search_for_series(search_filters={"Modality": "SEG"}):
        series = Dataset.from_json(record)
        study, seg = str(series.StudyInstanceUID), str(series.SeriesInstanceUID)
        meta = Dataset.from_json(client.retrieve_series_metadata(study, seg)[0])
        refs = meta.get("ReferencedSeriesSequence")
        image = str(refs[0].SeriesInstanceUID) if refs else ""
        if image not in wanted:
            logger.info("SEG %s skipped: it references no listed image series (%r)", seg, image)
            continue
        candidate = (_created(meta), study, seg)
        if image not in newest or candidate > newest[image]:
            newest[image] = candidate
    labels = []
    for image, (_, study, seg) in sorted(newest.items()):
        folder = cache / seg
        files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
        if not files:
            folder.mkdir(parents=True, exist_ok=True)
            for instance in client.retrieve_series(study, seg):
                target = folder / f"{instance.SOPInstanceUID}.dcm"
                partial = target.with_suffix(".partial")
                instance.save_as(str(partial))
                partial.replace(target)
            files = sorted(folder.glob("*.dcm"))
        if files:
            labels.append(SegLabel(image, seg, files[0]))
    return labels
