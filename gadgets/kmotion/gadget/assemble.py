"""Stage 2 of the streaming gadget: :func:`assemble` places a slice group's lines on the centred k-space grid.

:func:`line_layout` and :func:`upsample_readout` invert that placement: the correction stage writes its
result back onto each raw line's own samples with them (``LinePlace.samples``, :meth:`LinePlace.kx`).

Reversed readouts (``ACQ_IS_REVERSE``, e.g. the even echoes of a bipolar multi-echo or EPI): the samples
are stored in acquisition (time) order, so their k-space order is the reverse.  Assembly reads them
reversed, write-back writes into them reversed.  ``center_sample`` of a reversed line counts in k-space
order (after the reversal), as the scanner's reflected lines do (Siemens ICE reflects the line and keeps
the centre column); ``discard_pre``/``discard_post`` count in acquisition order (they cut the first/last
samples *in time*), so after the reversal ``discard_post`` samples are dropped at the low-k end.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import ismrmrd
import numpy as np
import torch

from kmotion.gadget.buffer import SliceBuffer, SliceKey
from kmotion.io.ismrmrd_h5 import centred_length, crop_readout, readout_grid
from kmotion.physics.fft import fft1c, ifft1c
from kmotion.physics.validate import InputError

__all__ = ["AssembledSlice", "LinePlace", "assemble", "line_layout", "upsample_readout"]

log = logging.getLogger("kmotion.gadget")


@dataclass
class AssembledSlice:
    """One slice on the centred grid of ``docs/conventions.md``.

    ``kspace`` ``(n_coils, n_ky, n_kx)`` complex64 (readout oversampling removed), ``mask`` ``(n_ky,)`` of
    acquired rows, ``segment`` ``(n_ky,)`` the echo-train segment of each row (-1: not acquired; the last
    arrival for averaged rows), ``acceleration`` and ``parity`` measured from the mask (acquired rows have
    ``(row - n_ky // 2) % acceleration == parity``), ``fov_mm``, ``pixel_spacing_mm`` and ``matrix`` in
    (y, x) order, geometry of the first acquisition.  ``correctable`` is False with a ``reason`` when the
    slice cannot be motion corrected soundly (NaN, incomplete, lines off the grid).  ``sample_mask``
    ``(n_ky, n_kx)`` marks the samples that hold data (an asymmetric echo's zero-filled part is False;
    readout columns within ``EDGE_MARGIN`` grid samples of a zero-filled edge too, because the readout crop
    smears the edge); ``notes`` names the sampling (partial Fourier, asymmetric echo, missing lines).

    3D encoding (encoded z > 1 and a line with ``kspace_encode_step_2 != 0``): ``partitions`` holds the
    volume ``(n_coils, n_z, n_ky, n_kx)`` transformed along kz (hybrid space: z in the image domain, one
    2D k-space per partition; partition row ``kz - center + n_z // 2`` before the transform,
    ``encodingLimits.kspace_encoding_step_2`` centre, else ``n_z // 2``), ``partition_mask`` ``(n_z, n_ky)``
    the acquired (kz, ky) lines, ``kspace`` the central partition ``partitions[:, n_z // 2]`` and ``mask``
    the rows acquired in every acquired partition; ``correctable`` is False with a reason starting
    ``3D encoding:`` (the estimation of a slab's in-plane motion on all partitions jointly is not done yet).
    """

    key: SliceKey
    kspace: np.ndarray
    mask: np.ndarray
    segment: np.ndarray
    acceleration: int
    parity: int
    fov_mm: tuple[float, float]
    pixel_spacing_mm: tuple[float, float]
    matrix: tuple[int, int]
    read_dir: tuple[float, float, float]
    phase_dir: tuple[float, float, float]
    slice_dir: tuple[float, float, float]
    position: tuple[float, float, float]
    correctable: bool = True
    reason: str = ""
    sample_mask: np.ndarray | None = None
    notes: str = ""
    partitions: np.ndarray | None = None
    partition_mask: np.ndarray | None = None

    def samples(self) -> np.ndarray:
        """``(n_ky, n_kx)`` bool: the acquired samples (``sample_mask``, else every sample of the rows)."""
        if self.sample_mask is not None:
            return self.sample_mask
        return np.broadcast_to(self.mask[:, None], self.kspace.shape[1:]).copy()


def _vec3(v: Iterable[float]) -> tuple[float, float, float]:
    x, y, z = (float(a) for a in v)
    return x, y, z


def _kspace_order(acq: ismrmrd.Acquisition) -> tuple[np.ndarray, int, int]:
    """The kept samples of a raw line in k-space order (module docstring, reversed readouts).

    Returns the raw sample indices ``(n_kept,)`` in order of increasing kx, the position of the centre
    sample among them, and ``center_sample`` on the whole line in k-space order (0 = unset: the middle).
    """
    n_s, pre, post = int(acq.number_of_samples), int(acq.discard_pre), int(acq.discard_post)
    centre = int(acq.center_sample) or n_s // 2
    if acq.is_flag_set(ismrmrd.ACQ_IS_REVERSE):  # k-space index i holds raw sample n_s - 1 - i
        return np.arange(n_s - 1 - post, pre - 1, -1), centre - post, centre
    return np.arange(pre, n_s - post), centre - pre, centre


def _measure_pattern(rows: np.ndarray, n_ky: int) -> tuple[int, int]:
    """(acceleration, parity) of acquired ``rows``: the commonest row step and residue about the centre."""
    if rows.size < 2:
        return 1, 0
    steps, counts = np.unique(np.diff(rows), return_counts=True)
    accel = int(steps[np.argmax(counts)])
    res, rc = np.unique((rows - n_ky // 2) % accel, return_counts=True)
    return accel, int(res[np.argmax(rc)])


def assemble(buffer: SliceBuffer, quiet: bool = False) -> AssembledSlice:
    """Place the lines of ``buffer`` on the centred k-space grid.

    Rows: ``row = ky - center + n_ky // 2`` (``center`` from ``encodingLimits.kspace_encoding_step_1``);
    columns: after ``discard_pre``/``discard_post`` the ``center_sample`` (0 = unset: middle) goes to
    ``n_ro // 2``; reversed lines (``ACQ_IS_REVERSE``) are read in reverse (module docstring).  3D
    encodings: see :class:`AssembledSlice`.  Readout oversampling (row length a multiple of the encoded x)
    is cropped in the image domain as :mod:`kmotion.io.ismrmrd_h5` does.  Repeated lines (averages) are
    averaged.  Problems that make motion correction unsound set ``correctable=False`` with a ``reason``
    rather than raising.

    Raises
    ------
    InputError
        For an empty buffer or acquisitions with different channel counts.
    """
    acqs = buffer.acquisitions
    geo = buffer.geometry
    enc = geo.encoding
    if not acqs:
        raise InputError(f"slice {tuple(buffer.key)}: expected at least one acquisition, got none")
    n_ch = {int(a.active_channels) for a in acqs}
    if len(n_ch) != 1:
        raise InputError(f"slice {tuple(buffer.key)}: expected one channel count, got {sorted(n_ch)}")
    reasons: list[str] = []
    if not buffer.complete:
        reasons.append("incomplete slice (end of stream before all lines arrived)")

    lines = []
    for a in acqs:
        order, centre, _ = _kspace_order(a)
        lines.append((a, np.array(a.data[:, order], dtype=np.complex64), centre))
    n_ky = enc.encoded_matrix[1]
    c_ky = geo.step1_range[2]
    lengths = [centred_length(d.shape[1], c) for _, d, c in lines if 0 <= c < d.shape[1]]
    n_ro, n_x, fov_x = readout_grid(enc, max(lengths, default=enc.encoded_matrix[0]))
    kz_values = sorted({int(a.idx.kspace_encode_step_2) for a in acqs})
    three_d = enc.encoded_matrix[2] > 1 and kz_values != [0]
    n_z = enc.encoded_matrix[2] if three_d else 1
    c_kz = geo.partition_range[2] if three_d else 0
    kspace = np.zeros((n_ch.pop(), n_z, n_ky, n_ro), dtype=np.complex128)
    counts = np.zeros((n_z, n_ky), dtype=np.int64)
    segment = np.full(n_ky, -1, dtype=np.int64)
    row_lo = np.full(n_ky, n_ro, dtype=np.int64)  # acquired columns [row_lo, row_hi) on the n_ro grid
    row_hi = np.zeros(n_ky, dtype=np.int64)
    n_nonfinite = 0
    asymmetric = False
    notes: list[str] = []
    for a, data, centre in lines:
        ky = int(a.idx.kspace_encode_step_1)
        row = ky - c_ky + n_ky // 2
        col = n_ro // 2 - centre
        plane = int(a.idx.kspace_encode_step_2) - c_kz + n_z // 2 if three_d else 0
        if not 0 <= row < n_ky or not 0 <= centre < data.shape[1] or col + data.shape[1] > n_ro:
            reasons.append(f"line ky={ky} (center_sample {a.center_sample}) outside the grid: dropped")
            continue
        if not 0 <= plane < n_z:
            reasons.append(f"line kz={a.idx.kspace_encode_step_2} outside the {n_z} partitions: dropped")
            continue
        if col > 0 or col + data.shape[1] < n_ro:
            asymmetric = True
        bad = ~np.isfinite(data)
        if bad.any():
            n_nonfinite += int(bad.sum())
            data = np.where(bad, 0, data)
        kspace[:, plane, row, col : col + data.shape[1]] += data
        row_lo[row] = min(row_lo[row], col)
        row_hi[row] = max(row_hi[row], col + data.shape[1])
        counts[plane, row] += 1
        segment[row] = int(a.idx.segment)
    kspace /= np.maximum(counts, 1)[None, :, :, None]
    if n_nonfinite:
        reasons.append(f"{n_nonfinite} NaN/Inf samples (set to zero)")
    if asymmetric:
        notes.append("asymmetric echo (readout zero filled)")

    planes = counts.any(1)
    mask: np.ndarray = np.all(counts[planes] > 0, axis=0) if planes.any() else np.zeros(n_ky, dtype=bool)
    if three_d:
        reasons.append(
            f"3D encoding: {int(planes.sum())} of {n_z} partitions (kspace_encode_step_2 "
            f"{kz_values[0]}..{kz_values[-1]}) assembled and transformed along kz; the in-plane motion of a "
            "3D slab is not estimated yet: passed through untouched"
        )
    rows = np.flatnonzero(mask)
    accel, parity = _measure_pattern(rows, n_ky)
    if rows.size:
        below, above = n_ky // 2 - int(rows[0]), int(rows[-1]) - n_ky // 2
        if abs(below - above) > max(accel, geo.acceleration):
            notes.append(
                f"partial Fourier along y (acquired rows {int(rows[0])}..{int(rows[-1])} about centre "
                f"row {n_ky // 2})"
            )
        pattern = np.arange(int(rows[0]), int(rows[-1]) + 1)
        pattern = pattern[(pattern - n_ky // 2) % accel == parity]
        n_missing = int((~mask[pattern]).sum())
        if n_missing:
            notes.append(f"{n_missing} lines missing from the {accel}-fold pattern")

    ks = torch.from_numpy(kspace.astype(np.complex64))
    if n_ro != n_x:
        ks = fft1c(crop_readout(ifft1c(ks, dim=-1), n_x), dim=-1)
    partitions = None
    if three_d:
        partitions = ifft1c(ks, dim=1).numpy().astype(np.complex64, copy=False)
        ks = torch.from_numpy(partitions[:, n_z // 2])
    else:
        ks = ks[:, 0]
    fov_y = enc.encoded_fov_mm[1]
    first = acqs[0]
    if reasons and not quiet:
        log.debug("slice %s not correctable: %s", tuple(buffer.key), "; ".join(reasons))  # in its report
    return AssembledSlice(
        key=buffer.key,
        kspace=ks.numpy().astype(np.complex64, copy=False),
        mask=mask,
        segment=segment,
        acceleration=accel,
        parity=parity,
        fov_mm=(fov_y, fov_x),
        pixel_spacing_mm=(fov_y / n_ky, fov_x / n_x),
        matrix=(n_ky, n_x),
        read_dir=_vec3(first.read_dir),
        phase_dir=_vec3(first.phase_dir),
        slice_dir=_vec3(first.slice_dir),
        position=_vec3(first.position),
        correctable=not reasons,
        reason="; ".join(reasons),
        sample_mask=_sample_mask(mask, row_lo, row_hi, n_ro, n_x) if asymmetric else None,
        notes="; ".join(notes),
        partitions=partitions,
        partition_mask=counts > 0 if three_d else None,
    )


EDGE_MARGIN = 2
"""Grid samples next to a zero-filled readout edge left out of ``AssembledSlice.sample_mask``."""


def _sample_mask(mask: np.ndarray, lo: np.ndarray, hi: np.ndarray, n_ro: int, n_x: int) -> np.ndarray:
    """``(n_ky, n_x)`` acquired samples: the columns ``[lo, hi)`` of the ``n_ro`` grid, on the ``n_x`` grid.

    The readout crop keeps the k-space extent, so column ``i`` of the ``n_x`` grid sits at ``(i - n_x // 2)
    * n_ro / n_x`` samples of the ``n_ro`` grid from its centre; columns within ``EDGE_MARGIN`` of a
    zero-filled edge are left out (the crop smears the edge).
    """
    pos = (np.arange(n_x) - n_x // 2) * (n_ro / n_x) + n_ro // 2
    step = n_ro / n_x
    left = np.where(lo > 0, lo + EDGE_MARGIN * step, lo)
    right = np.where(hi < n_ro, hi - 1 - EDGE_MARGIN * step, hi - 1)
    return mask[:, None] & (pos[None, :] >= left[:, None]) & (pos[None, :] <= right[:, None])


# write-back helpers (inverse of the placement in ``assemble``)


@dataclass
class LinePlace:
    """Where one raw line's samples sit on the grid of :func:`assemble` (see :func:`line_layout`).

    The kept samples ``samples`` (raw indices, in k-space order) occupy grid columns ``col .. col + n - 1``
    of row ``row``: ``grid[:, row, col : col + n]`` is ``acq.data[:, samples]``.
    """

    acq: ismrmrd.Acquisition
    row: int
    col: int  # grid column (readout grid of n_ro samples) of the first kept sample in k-space order
    pre: int
    n: int  # samples kept (after discard_pre / discard_post)
    centre: int  # centre sample in k-space order on the whole line (center_sample, 0 -> n_samples // 2)
    samples: np.ndarray  # (n,) raw sample indices of the kept samples in k-space order
    reverse: bool = False  # ACQ_IS_REVERSE: raw samples in time order, k-space order reversed
    plane: int = 0  # 3D encodings: the partition's index on the kz grid of ``assemble`` (0 for 2D)

    def kx(self) -> np.ndarray:
        """``(number_of_samples,)`` float: k-space position of every raw sample (in stored order), in
        samples of the ``n_ro`` readout grid from the centre (reversed for a reversed line)."""
        j = np.arange(int(self.acq.number_of_samples), dtype=np.float64)
        if self.reverse:
            j = j[::-1].copy()
        return j - self.centre


def line_layout(buffer: SliceBuffer) -> tuple[int, int, list[LinePlace]]:
    """Readout grid length ``n_ro``, returned ``n_x`` and each line's place, exactly as ``assemble`` (for a
    3D group, ``LinePlace.plane`` is the line's partition on the kz grid before the transform along kz)."""
    geo = buffer.geometry
    enc = geo.encoding
    n_ky = enc.encoded_matrix[1]
    c_ky = geo.step1_range[2]
    lines = []
    lengths = []
    for a in buffer.acquisitions:
        order, centre, k_centre = _kspace_order(a)
        n = order.size
        if 0 <= centre < n:
            lengths.append(centred_length(n, centre))
        lines.append((a, order, centre, k_centre))
    n_ro, n_x, _ = readout_grid(enc, max(lengths, default=enc.encoded_matrix[0]))
    n_z = enc.encoded_matrix[2]
    three_d = n_z > 1 and any(int(a.idx.kspace_encode_step_2) != 0 for a in buffer.acquisitions)
    c_kz = geo.partition_range[2]
    out = []
    for a, order, centre, k_centre in lines:
        row = int(a.idx.kspace_encode_step_1) - c_ky + n_ky // 2
        plane = int(a.idx.kspace_encode_step_2) - c_kz + n_z // 2 if three_d else 0
        out.append(
            LinePlace(
                a,
                row,
                n_ro // 2 - centre,
                int(a.discard_pre),
                order.size,
                k_centre,
                order,
                a.is_flag_set(ismrmrd.ACQ_IS_REVERSE),
                plane,
            )
        )
    return n_ro, n_x, out


def upsample_readout(k: np.ndarray, n_ro: int) -> np.ndarray:
    """Inverse of the readout crop of ``assemble``: zero-pad the image along x from ``n_x`` to ``n_ro``."""
    n_x = k.shape[-1]
    if n_ro == n_x:
        return k
    img = ifft1c(torch.from_numpy(k), -1)
    pad = torch.zeros((*img.shape[:-1], n_ro), dtype=img.dtype)
    start = n_ro // 2 - n_x // 2
    pad[..., start : start + n_x] = img
    return fft1c(pad, -1).numpy()
