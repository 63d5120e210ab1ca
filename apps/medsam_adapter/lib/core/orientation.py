"""How a slice of a stored volume is shown to the model.

Clients address voxels by their indices ``[i, j, k]`` in the array as stored; ``k`` (or another
slice axis) selects the slice. The model, trained on images in radiological display orientation,
sees the slice the way a viewer shows it: superior (or anterior) at the top, patient right on the
left of the screen (anterior on the left for sagittal slices). This module maps both ways exactly,
whatever the orientation of the array (RAS, LPS, PSR, oblique).
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np


@dataclass(frozen=True)
class SliceView:
    """Display transform of the in-plane axes of one slice axis of a volume.

    The slice array ``vol.take(k, axis)`` has in-plane axes (a, b) in storage order; the display
    array has rows along ``row_axis`` (0 for a, 1 for b), optionally flipped.
    """

    axis: int
    transpose: bool  # display rows come from in-plane axis b
    flip_rows: bool
    flip_cols: bool
    spacing: tuple[float, float]  # display (row, col) spacing in mm

    @classmethod
    def from_affine(cls, affine: np.ndarray, axis: int = 2) -> SliceView:
        if axis not in (0, 1, 2):
            raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}")
        ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
        zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
        a, b = [d for d in range(3) if d != axis]
        world_a, world_b = int(ornt[a, 0]), int(ornt[b, 0])
        # vertical axis: superior-inferior if in plane, else anterior-posterior
        vertical = 2 if 2 in (world_a, world_b) else 1
        transpose = world_b == vertical if world_a != vertical else False
        row_axis, col_axis = (b, a) if transpose else (a, b)
        # top = superior/anterior and left = right/anterior: flip any axis whose index runs toward +RAS
        return cls(
            axis=axis,
            transpose=transpose,
            flip_rows=bool(ornt[row_axis, 1] > 0),
            flip_cols=bool(ornt[col_axis, 1] > 0),
            spacing=(float(zooms[row_axis]), float(zooms[col_axis])),
        )

    def in_plane_shape(self, volume_shape: tuple[int, ...]) -> tuple[int, int]:
        a, b = [d for d in range(3) if d != self.axis]
        shape = (volume_shape[a], volume_shape[b])
        return (shape[1], shape[0]) if self.transpose else shape

    def to_display(self, slice_ab: np.ndarray) -> np.ndarray:
        """Storage-order slice (a, b) -> display (rows, cols) (a view when possible)."""
        out = slice_ab.T if self.transpose else slice_ab
        if self.flip_rows:
            out = out[::-1, :]
        if self.flip_cols:
            out = out[:, ::-1]
        return out

    def from_display(self, display: np.ndarray) -> np.ndarray:
        """Display (rows, cols) -> storage-order slice (a, b)."""
        out = display
        if self.flip_rows:
            out = out[::-1, :]
        if self.flip_cols:
            out = out[:, ::-1]
        return out.T if self.transpose else out

    def slice(self, volume: np.ndarray, k: int) -> np.ndarray:
        """Display-oriented slice ``k`` of a 3D volume."""
        index = [slice(None)] * 3
        index[self.axis] = k
        return self.to_display(volume[tuple(index)])  # a view: np.take would copy the strided slice

    def stack(self, volume: np.ndarray, k: int, depth: int = 1) -> np.ndarray:
        """Slice ``k`` (depth 1), or slices ``k - depth // 2 .. k + depth // 2`` as a (depth, rows, cols)
        stack, the end slices repeated past the volume's ends (what the ``depth`` design encodes)."""
        if depth <= 1:
            return self.slice(volume, k)
        last = volume.shape[self.axis] - 1
        return np.stack([self.slice(volume, min(max(j, 0), last)) for j in range(k - depth // 2, k + depth // 2 + 1)])

    def voxel_to_display(self, ijk: np.ndarray, volume_shape: tuple[int, ...]) -> np.ndarray:
        """(N, 3) voxel indices -> (N, 2) display (row, col) indices on their slice."""
        ijk = np.asarray(ijk).reshape(-1, 3)
        a, b = [d for d in range(3) if d != self.axis]
        ra, rb = ijk[:, a], ijk[:, b]
        rows, cols = (rb, ra) if self.transpose else (ra, rb)
        n_rows, n_cols = self.in_plane_shape(volume_shape)
        if self.flip_rows:
            rows = n_rows - 1 - rows
        if self.flip_cols:
            cols = n_cols - 1 - cols
        return np.stack([rows, cols], axis=1)

    def display_box(
        self, lo_ab: tuple[int, int], hi_ab: tuple[int, int], volume_shape: tuple[int, ...]
    ) -> tuple[int, int, int, int]:
        """Inclusive in-plane box (storage a/b bounds) -> inclusive display box (r0, c0, r1, c1)."""
        corners = np.array([[lo_ab[0], lo_ab[1]], [hi_ab[0], hi_ab[1]]])
        ijk = np.zeros((2, 3), dtype=np.int64)
        a, b = [d for d in range(3) if d != self.axis]
        ijk[:, a], ijk[:, b] = corners[:, 0], corners[:, 1]
        rc = self.voxel_to_display(ijk, volume_shape)
        r0, r1 = sorted(rc[:, 0].tolist())
        c0, c1 = sorted(rc[:, 1].tolist())
        return int(r0), int(c0), int(r1), int(c1)
