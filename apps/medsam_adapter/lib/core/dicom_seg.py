"""DICOM-SEG files as label volumes: decoded with pydicom-seg, segment names from the SEG itself."""

from __future__ import annotations

from pathlib import Path

import pydicom

from .volume import Volume, VolumeError, volume_from_sitk


def label_name(segment_label: str) -> str:
    """A SEG's segment label as a label name: lower case, spaces as underscores ("Kidney right" ->
    "kidney_right"), the convention of the profiles' label lists."""
    return "_".join(segment_label.strip().lower().split())


def read_seg(path: str | Path) -> tuple[Volume, dict[int, str]]:
    """A DICOM-SEG as (label volume with values = segment numbers, {segment number: label name}).
    The volume covers the SEG's frames only; place it into its image with ``label_in_grid``."""
    import pydicom_seg

    try:
        dcm = pydicom.dcmread(str(path))
        if dcm.Modality != "SEG":
            raise VolumeError(f"{Path(path).name} is a {dcm.Modality} object, not a DICOM-SEG")
        result = pydicom_seg.MultiClassReader().read(dcm)
    except VolumeError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file for the user
        raise VolumeError(f"{Path(path).name}: cannot decode DICOM-SEG ({type(e).__name__}: {e})") from None
    names = {int(s.SegmentNumber): label_name(str(s.SegmentLabel)) for s in dcm.SegmentSequence}
    return volume_from_sitk(result.image), names
