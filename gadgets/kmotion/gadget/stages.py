"""First stages of the streaming gadget: :func:`buffer_slices` and :func:`assemble`.

Each stage is a plain function over Python objects and knows nothing of sockets.

Ownership of acquisitions
-------------------------
Every input item leaves :func:`buffer_slices` exactly once: items that are not imaging lines are yielded
immediately (in their arrival order), imaging lines are yielded *inside* exactly one :class:`SliceBuffer`
(``SliceBuffer.acquisitions``, in arrival order).  The buffer owns them; the stage downstream of the
estimation/correction re-emits them.  Imaging lines are held back until their slice is complete, so
their order relative to pass-through items changes, never their order within a slice.

Completion rule
---------------
A group (slice, contrast, repetition, set) is complete at the first line flagged ``ACQ_LAST_IN_SLICE``,
or, while the stream has not yet shown that it sets that flag, when every expected
``(kspace_encode_step_1, average)`` pair has arrived.  Expected lines are those in
``encodingLimits.kspace_encoding_step_1 [minimum, maximum]`` with ``(ky - ky_first) % R == 0``, where R
is the header's ``parallelImaging`` acceleration in step 1 and ``ky_first`` is the first line of the group
that is not a calibration-and-imaging (ACS) line: the acquired parity may be either one relative to the
centre line, so it is read from the data, not assumed.  Averages come from
``encodingLimits.average.maximum``.  Once a ``ACQ_LAST_IN_SLICE`` flag has been seen, count completion is
switched off (flags are then trusted; this keeps late ACS lines and averages in their slice).  A line
arriving for a key whose group has already completed starts a new group.  Groups still open at the end of
the stream are flushed with ``complete=False`` (never dropped) and a warning is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import ismrmrd
import ismrmrd.xsd
import numpy as np
import torch

from kmotion.io.ismrmrd_h5 import (
    SKIP_FLAGS,
    HeaderEncoding,
    centred_length,
    crop_readout,
    parse_encoding,
    readout_grid,
)
from kmotion.physics.fft import fft1c, ifft1c
from kmotion.physics.validate import InputError

__all__ = ["AssembledSlice", "SliceBuffer", "SliceGeometry", "SliceKey", "assemble", "buffer_slices"]

log = logging.getLogger("kmotion.gadget")


class SliceKey(NamedTuple):
    """Counters that separate the images of a stream."""

    slice: int
    contrast: int
    repetition: int
    set: int


@dataclass(frozen=True)
class SliceGeometry:
    """Header-derived geometry shared by all slices of a stream."""

    encoding: HeaderEncoding
    acceleration: int  # parallelImaging accelerationFactor.kspace_encoding_step_1 (1 if absent)
    step1_range: tuple[int, int, int]  # (minimum, maximum, center) of kspace_encode_step_1
    n_averages: int  # encodingLimits.average.maximum + 1 (1 if absent)
    echo_train_length: int | None  # encoding echoTrainLength, if given

    @classmethod
    def from_header(cls, header: ismrmrd.xsd.ismrmrdHeader) -> SliceGeometry:
        """Read the geometry from the first encoding of ``header`` (raises :class:`InputError`)."""
        enc = parse_encoding(ismrmrd.xsd.ToXML(header), "ISMRMRD stream header")
        if enc.trajectory.lower() != "cartesian":
            raise InputError(
                f"ISMRMRD stream header: trajectory: expected 'cartesian', got '{enc.trajectory}'"
            )
        n_ky = enc.encoded_matrix[1]
        if enc.step1_limits is not None:
            step1 = enc.step1_limits
        else:
            step1 = (0, n_ky - 1, n_ky // 2)
        e0 = header.encoding[0]
        accel = 1
        pi = getattr(e0, "parallelImaging", None)
        if pi is not None and pi.accelerationFactor is not None:
            accel = max(1, int(pi.accelerationFactor.kspace_encoding_step_1))
        n_avg = 1
        lim = getattr(e0, "encodingLimits", None)
        if lim is not None and lim.average is not None:
            n_avg = max(1, int(lim.average.maximum) + 1)
        etl = getattr(e0, "echoTrainLength", None)
        return cls(enc, accel, step1, n_avg, None if etl is None else int(etl))


@dataclass
class SliceBuffer:
    """The imaging lines of one (slice, contrast, repetition, set), in arrival order.

    The buffer owns ``acquisitions``: they are not yielded elsewhere; the stage downstream re-emits them.
    Each acquisition keeps its echo-train identity in ``idx.segment``.
    """

    key: SliceKey
    acquisitions: list[ismrmrd.Acquisition]
    geometry: SliceGeometry
    complete: bool = True
    expected_ky: frozenset[int] = field(default_factory=frozenset)


@dataclass
class AssembledSlice:
    """One slice on the centred grid of ``docs/conventions.md``.

    ``kspace`` ``(n_coils, n_ky, n_kx)`` complex64 (readout oversampling removed), ``mask`` ``(n_ky,)`` of
    acquired rows, ``segment`` ``(n_ky,)`` the echo-train segment of each row (-1: not acquired; the last
    arrival for averaged rows), ``acceleration`` and ``parity`` measured from the mask (acquired rows have
    ``(row - n_ky // 2) % acceleration == parity``), ``fov_mm``, ``pixel_spacing_mm`` and ``matrix`` in
    (y, x) order, geometry of the first acquisition.  ``correctable`` is False with a ``reason`` when the
    slice cannot be motion corrected soundly (partial Fourier, asymmetric echo, NaN, incomplete, ...).
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


def is_imaging(item: object) -> bool:
    """True for an ``ismrmrd.Acquisition`` that is an imaging line of encoding space 0."""
    if not isinstance(item, ismrmrd.Acquisition):
        return False
    if any(item.is_flag_set(f) for f in SKIP_FLAGS):
        return False
    if item.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) and not item.is_flag_set(
        ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING
    ):
        return False
    return int(item.encoding_space_ref) == 0


def _key(acq: ismrmrd.Acquisition) -> SliceKey:
    i = acq.idx
    return SliceKey(int(i.slice), int(i.contrast), int(i.repetition), int(i.set))


class _Group:
    def __init__(self) -> None:
        self.acqs: list[ismrmrd.Acquisition] = []
        self.seen: set[tuple[int, int]] = set()
        self.expected: frozenset[int] | None = None


def buffer_slices(items: Iterable[object], header: ismrmrd.xsd.ismrmrdHeader) -> Iterator[object]:
    """Group imaging acquisitions into :class:`SliceBuffer` objects; pass everything else through.

    Parameters
    ----------
    items
        Stream of ISMRMRD objects (acquisitions, waveforms, anything else).
    header
        The stream's ``ismrmrd.xsd`` header (first encoding used).

    Yields
    ------
    object
        Non-imaging items unchanged and in order, and a :class:`SliceBuffer` per completed group; open
        groups are flushed at the end of the stream with ``complete=False``.  See the module docstring for
        the completion rule.
    """
    geo = SliceGeometry.from_header(header)
    lo, hi, _ = geo.step1_range
    r = geo.acceleration
    open_groups: dict[SliceKey, _Group] = {}
    flags_seen = False
    for item in items:
        if not is_imaging(item):
            yield item
            continue
        assert isinstance(item, ismrmrd.Acquisition)
        key = _key(item)
        grp = open_groups.setdefault(key, _Group())
        grp.acqs.append(item)
        ky = int(item.idx.kspace_encode_step_1)
        grp.seen.add((ky, int(item.idx.average)))
        if grp.expected is None and not item.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING):
            grp.expected = frozenset(k for k in range(lo, hi + 1) if (k - ky) % r == 0)
        done = False
        if item.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE):
            flags_seen = done = True
        elif not flags_seen and grp.expected is not None:
            done = all((k, a) in grp.seen for k in grp.expected for a in range(geo.n_averages))
        if done:
            del open_groups[key]
            log.debug("slice %s complete: %d lines", tuple(key), len(grp.acqs))
            yield SliceBuffer(key, grp.acqs, geo, True, grp.expected or frozenset())
    for key, grp in open_groups.items():
        log.warning(
            "end of stream: slice %s incomplete (%d lines, %d expected), flushed with complete=False",
            tuple(key),
            len(grp.acqs),
            len(grp.expected or ()) * geo.n_averages,
        )
        yield SliceBuffer(key, grp.acqs, geo, False, grp.expected or frozenset())


def _vec3(v: Iterable[float]) -> tuple[float, float, float]:
    x, y, z = (float(a) for a in v)
    return x, y, z


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
    ``n_ro // 2``.  Readout oversampling (row length a multiple of the encoded x) is cropped in the image
    domain as :mod:`kmotion.io.ismrmrd_h5` does.  Repeated lines are averaged.  Problems that make motion
    correction unsound set ``correctable=False`` with a ``reason`` rather than raising.

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
        n_s, pre, post = int(a.number_of_samples), int(a.discard_pre), int(a.discard_post)
        data = np.array(a.data[:, pre : n_s - post], dtype=np.complex64)
        centre = (int(a.center_sample) or n_s // 2) - pre
        lines.append((a, data, centre))
    n_ky = enc.encoded_matrix[1]
    c_ky = geo.step1_range[2]
    lengths = [centred_length(d.shape[1], c) for _, d, c in lines if 0 <= c < d.shape[1]]
    n_ro, n_x, fov_x = readout_grid(enc, max(lengths, default=enc.encoded_matrix[0]))
    kspace = np.zeros((n_ch.pop(), n_ky, n_ro), dtype=np.complex128)
    counts = np.zeros(n_ky, dtype=np.int64)
    segment = np.full(n_ky, -1, dtype=np.int64)
    n_nonfinite = 0
    asymmetric = False
    for a, data, centre in lines:
        ky = int(a.idx.kspace_encode_step_1)
        row = ky - c_ky + n_ky // 2
        col = n_ro // 2 - centre
        if not 0 <= row < n_ky or not 0 <= centre < data.shape[1] or col + data.shape[1] > n_ro:
            reasons.append(f"line ky={ky} (center_sample {a.center_sample}) outside the grid: dropped")
            continue
        if col > 0 or col + data.shape[1] < n_ro:
            asymmetric = True
        bad = ~np.isfinite(data)
        if bad.any():
            n_nonfinite += int(bad.sum())
            data = np.where(bad, 0, data)
        kspace[:, row, col : col + data.shape[1]] += data
        counts[row] += 1
        segment[row] = int(a.idx.segment)
    kspace /= np.maximum(counts, 1)[None, :, None]
    if n_nonfinite:
        reasons.append(f"{n_nonfinite} NaN/Inf samples (set to zero)")
    if asymmetric:
        reasons.append("asymmetric echo (readout zero filled): partial Fourier along x")

    mask = counts > 0
    rows = np.flatnonzero(mask)
    accel, parity = _measure_pattern(rows, n_ky)
    if rows.size:
        below, above = n_ky // 2 - int(rows[0]), int(rows[-1]) - n_ky // 2
        if abs(below - above) > max(accel, geo.acceleration):
            reasons.append(
                f"partial Fourier along y (acquired rows {int(rows[0])}..{int(rows[-1])} about centre "
                f"row {n_ky // 2})"
            )
        pattern = np.arange(int(rows[0]), int(rows[-1]) + 1)
        pattern = pattern[(pattern - n_ky // 2) % accel == parity]
        n_missing = int((~mask[pattern]).sum())
        if n_missing:
            reasons.append(f"{n_missing} lines missing from the {accel}-fold pattern")

    ks = torch.from_numpy(kspace.astype(np.complex64))
    if n_ro != n_x:
        ks = fft1c(crop_readout(ifft1c(ks, dim=-1), n_x), dim=-1)
    fov_y = enc.encoded_fov_mm[1]
    first = acqs[0]
    if reasons and not quiet:
        log.info("slice %s not correctable: %s", tuple(buffer.key), "; ".join(reasons))
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
    )
