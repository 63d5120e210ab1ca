"""DICOM-SEG files as label volumes: decoded with pydicom-seg, segment names from the SEG itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from .volume import LPS_TO_RAS, Volume, VolumeError


def label_name(segment_label: str) -> str:
    """A SEG's segment label as a label name: lower case, spaces as underscores ("Kidney right" ->
    "kidney_right"), the convention of the profiles' label lists."""
    return "_".join(segment_label.strip().lower().split())


def read_seg(path: str | Path) -> tuple[Volume, dict[int, str]]:
    """A DICOM-SEG as (label volume with values = segment numbers, {segment number: label name}).
    The volume covers the SEG's frames only; place it into its image with ``label_in_grid``."""
    import pydicom_seg
    import SimpleITK as sitk

    try:
        dcm = pydicom.dcmread(str(path))
        if dcm.Modality != "SEG":
            raise VolumeError(f"{Path(path).name} is a {dcm.Modality} object, not a DICOM-SEG")
        result = pydicom_seg.MultiClassReader().read(dcm)
    except VolumeError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file for the user
        raise VolumeError(f"{Path(path).name}: cannot decode DICOM-SEG ({type(e).__name__}: {e})") from None
    image = result.image
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # ITK [k, j, i] -> stored [i, j, k]
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    names = {int(s.SegmentNumber): label_name(str(s.SegmentLabel)) for s in dcm.SegmentSequence}
    return Volume(np.ascontiguousarray(array), LPS_TO_RAS @ lps), names
