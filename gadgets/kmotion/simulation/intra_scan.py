"""Simulated raw data with motion *within* a scan: a multi-shot (turbo spin echo) 2-D Cartesian ISMRMRD
acquisition whose object moves rigidly from echo train to echo train.

:func:`simulate_intra_scan` returns the header, the stream of acquisitions, the per-shot true motion, the
motion-free objects, the coil maps and the echo trains; :func:`write_intra_scan` stores it in an ISMRMRD
``.h5`` file (``kmotion simulate-raw --intra-scan``).  The pieces shared with the per-repetition simulation
(header XML, slice geometry, noise line, line building, time stamps) are :mod:`kmotion.simulation.raw`'s.

What is simulated (defaults of :class:`IntraScanConfig`)
--------------------------------------------------------
* ``n_slices`` axial head-phantom slices, recon matrix 256 x 256, FOV 220 x 220 mm, 8 fixed coils, 2x readout
  oversampling, complex Gaussian noise at ``snr`` 30 (``docs/conventions.md``), a noise line first.
* Sampling: every ``acceleration``-th row (centre row kept) plus ``calibration_lines`` ACS rows at the
  centre, read in echo trains of ``echo_train_length`` rows in the ``ordering`` of
  :func:`kmotion.simulation.multishot.shot_sampling` (linear, centric, interleaved, checkered,
  linear_checkered).  Integrated ACS rows sit in the trains: ``ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING`` on
  the imaging grid (R > 1), ``ACQ_IS_PARALLEL_CALIBRATION`` off it, as :mod:`~kmotion.simulation.raw` marks
  them.  With ``separate_calibration`` the ACS rows are instead a separate motion-free reference scan in
  encoding space 1 (``encoding_space_ref = 1``, a second ``<encoding>`` with the same matrix, FOV and
  slices; ``calibrationMode`` ``separate``), acquired before the imaging, flagged
  ``ACQ_IS_PARALLEL_CALIBRATION`` only (as field case ``11_separate_calibration_scan_encoding_1``); the
  imaging then has no ACS rows.
* Physics: in echo train ``s`` the object sits at the rigid pose ``m_s = (dx_px, dy_px, phi_deg)``
  (piecewise constant: motion during a train is not simulated); the coils do not move; rows are
  :func:`~kmotion.simulation.multishot.shot_kspace` (optionally scaled by the T2 decay of their echo,
  ``exp(-TE_j / T2)``, ``TE_j = (j + 1) * echo_spacing_ms``).  The pose belongs to the TR: the trains of all
  slices in TR ``s`` (shot ``s`` of each slice) share it.
* Repetitions: ``reference_repetitions`` motion-free repetitions (same trains) come first, then the moved
  scan; truth is relative to the pose of the simulated objects (that of the reference repetitions and of the
  separate calibration scan).  Motion ``pattern`` (``steps``, ``drift``, ``jerk``, ``random``, ``none``,
  :func:`~kmotion.simulation.multishot.motion_pattern`) within ``max_mm`` / ``max_deg``, or explicit poses.
* Time: echo trains ``tr_ms`` apart per slice, the slices' trains interleaved in each TR
  (``tr_ms / n_slices`` apart, each train reads one slice), lines ``echo_spacing_ms`` apart in a train; the
  separate calibration lines ``echo_spacing_ms`` apart, slice after slice, one TR after the noise line.
* Counters and flags: ``idx.segment`` = the line's echo train (shot) within its slice's scan,
  ``idx.repetition``, ``idx.slice``; ``ACQ_FIRST/LAST_IN_SLICE`` on the first/last imaging line of each
  (slice, repetition), ``ACQ_FIRST/LAST_IN_REPETITION`` on the first/last imaging line of a repetition,
  ``ACQ_LAST_IN_MEASUREMENT`` on the last line; the header has ``echoTrainLength`` and
  ``encodingLimits.segment`` ``0 .. n_shots - 1``.

The gauge
---------
Without a motion-free reference (``reference_repetitions = 0``) the data define the object only up to one
rigid motion: an estimator can recover the shots' motion only relative to one of them.  kmotion's gauge is
the shot that reads the k-space centre row ``n_ky // 2`` (``centre_shot``): the scan's pose is that shot's
pose.  The random patterns are therefore drawn relative to that shot (its pose is zero; the others rescaled,
if needed, to stay within ``max_mm`` / ``max_deg``), so the stored truth is what such an estimator should
find.  With a reference repetition the moved scan's poses are relative to repetition 0 and the pattern
starts from it.  Explicit poses (``motion``) are taken as given; :func:`relative_motion` composes them into
the gauge of any shot.

Where the truth is stored
-------------------------
The HDF5 dataset ``/dataset/kmotion_true_motion`` (:mod:`kmotion.io.ismrmrd_writer`): one row per (slice,
repetition, shot), fields ``slice, repetition, dx_px, dy_px, phi_deg, dx_mm, dy_mm, shot, centre_shot``
(``shot`` = ``idx.segment``, ``centre_shot`` = the gauge shot of that slice and repetition), read by
:func:`~kmotion.io.ismrmrd_writer.read_true_motion` (and :func:`~kmotion.io.ismrmrd_writer.centre_shots`);
the same rows as JSON in the header's ``userParameterString`` ``kmotion.true_motion``, with
``kmotion.shot_ordering`` (string), ``kmotion.centre_shot`` and ``kmotion.reference_repetitions`` (longs);
``kmotion.reference_repetition`` = 0 only when a motion-free repetition exists.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import ismrmrd
import ismrmrd.xsd
import numpy as np
import torch

from kmotion.io.ismrmrd_writer import TrueMotion, write_stream, write_true_motion
from kmotion.physics.validate import InputError
from kmotion.simulation.multishot import (
    MOTION_PATTERNS,
    ORDERINGS,
    MultiShotSampling,
    motion_pattern,
    shot_kspace,
    shot_sampling,
)
from kmotion.simulation.phantoms import (
    coil_maps_from_coefficients,
    make_coil_coefficients,
    make_phantoms,
    snr_sigma,
)
from kmotion.simulation.raw import (
    RawConfig,
    header_xml,
    imaging_line,
    noise_acquisition,
    slice_geometry,
)

__all__ = [
    "IntraScanAcquisition",
    "IntraScanConfig",
    "relative_motion",
    "shot_motion",
    "simulate_intra_scan",
    "simulate_intra_scan_from_objects",
    "write_intra_scan",
]


@dataclass(frozen=True)
class IntraScanConfig:
    """Settings of :func:`simulate_intra_scan` (module docstring); sizes in (y, x) order, lengths in mm, times
    in ms."""

    matrix: tuple[int, int] = (256, 256)
    fov_mm: tuple[float, float] = (220.0, 220.0)
    n_coils: int = 8
    n_slices: int = 1
    ordering: str = "interleaved"
    echo_train_length: int = 16
    acceleration: int = 2
    calibration_lines: int = 24
    separate_calibration: bool = False
    """ACS rows as a separate motion-free reference scan in encoding space 1 (else in the echo trains)."""
    readout_oversampling: int = 2
    snr: float | None = 30.0
    t2_ms: float | None = None
    """T2 of the decay along the echo train (None: no decay)."""
    pattern: str = "steps"
    max_mm: float = 10.0
    max_deg: float = 10.0
    motion: tuple[tuple[float, float, float], ...] | None = None
    """Explicit ``(dx_px, dy_px, phi_deg)`` per echo train of the moved scan (overrides ``pattern``)."""
    reference_repetitions: int = 0
    """Motion-free repetitions before the moved scan (0: the scan alone; its gauge is the centre shot)."""
    seed: int = 0
    slice_thickness_mm: float = 5.0
    slice_gap_mm: float = 1.0
    tr_ms: float = 3000.0
    echo_spacing_ms: float = 10.0
    coil_half_width: int = 4

    def __post_init__(self) -> None:
        for name in ("n_coils", "n_slices", "acceleration", "echo_train_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"IntraScanConfig.{name}: expected a positive integer, got {v!r}")
        if self.ordering not in ORDERINGS:
            raise InputError(f"IntraScanConfig.ordering: expected one of {ORDERINGS}, got {self.ordering!r}")
        if self.pattern not in MOTION_PATTERNS:
            raise InputError(
                f"IntraScanConfig.pattern: expected one of {MOTION_PATTERNS}, got {self.pattern!r}"
            )
        if len(self.matrix) != 2 or min(self.matrix) < 16:
            raise InputError(f"IntraScanConfig.matrix: expected (n_y, n_x) >= 16, got {self.matrix!r}")
        if self.readout_oversampling not in (1, 2):
            raise InputError(
                f"IntraScanConfig.readout_oversampling: expected 1 or 2, got {self.readout_oversampling!r}"
            )
        if not 0 <= self.calibration_lines <= self.matrix[0]:
            raise InputError(
                f"IntraScanConfig.calibration_lines: expected 0..{self.matrix[0]}, "
                f"got {self.calibration_lines}"
            )
        if self.separate_calibration and self.calibration_lines < 1:
            raise InputError("IntraScanConfig.separate_calibration: needs calibration_lines >= 1, got 0")
        if isinstance(self.reference_repetitions, bool) or self.reference_repetitions < 0:
            raise InputError(
                f"IntraScanConfig.reference_repetitions: expected >= 0, got {self.reference_repetitions!r}"
            )
        if self.snr is not None and not (math.isfinite(self.snr) and self.snr > 0):
            raise InputError(f"IntraScanConfig.snr: expected a positive number or None, got {self.snr!r}")
        if self.t2_ms is not None and not (math.isfinite(self.t2_ms) and self.t2_ms > 0):
            raise InputError(f"IntraScanConfig.t2_ms: expected a positive number or None, got {self.t2_ms!r}")
        if not (0 <= self.max_mm and 0 <= self.max_deg <= 90):
            raise InputError(
                f"IntraScanConfig.max_mm/max_deg: expected >= 0 and 0..90, got {self.max_mm}, {self.max_deg}"
            )
        if self.echo_spacing_ms <= 0:
            raise InputError(f"IntraScanConfig.echo_spacing_ms: expected > 0, got {self.echo_spacing_ms}")
        longest = max(len(r) for r in self.sampling().shots)
        need = self.n_slices * longest * self.echo_spacing_ms
        if self.tr_ms < need:
            raise InputError(
                f"IntraScanConfig.tr_ms: expected >= {need:g} ms (n_slices x train length x echo spacing), "
                f"got {self.tr_ms:g}"
            )
        if self.motion is not None:
            n_shots = self.sampling().n_shots
            if len(self.motion) != n_shots or any(len(m) != 3 for m in self.motion):
                raise InputError(
                    f"IntraScanConfig.motion: expected {n_shots} (dx_px, dy_px, phi_deg) rows (one per echo "
                    f"train), got {len(self.motion)}"
                )
            if max(abs(float(m[2])) for m in self.motion) > 90:
                raise InputError("IntraScanConfig.motion: |phi_deg| must be <= 90")

    @property
    def pixel_spacing_mm(self) -> tuple[float, float]:
        """``(dy_mm, dx_mm)`` of the recon grid."""
        return self.fov_mm[0] / self.matrix[0], self.fov_mm[1] / self.matrix[1]

    @property
    def n_repetitions(self) -> int:
        """Reference repetitions + the moved scan."""
        return self.reference_repetitions + 1

    def sampling(self) -> MultiShotSampling:
        """The echo trains of every slice and repetition (no ACS rows with ``separate_calibration``)."""
        cal = 0 if self.separate_calibration else self.calibration_lines
        return shot_sampling(self.matrix[0], self.echo_train_length, self.ordering, self.acceleration, cal)

    def calibration_rows(self) -> np.ndarray:
        """The fully sampled centre block ``(calibration_lines,)`` (grid rows, ascending)."""
        lo = self.matrix[0] // 2 - self.calibration_lines // 2
        return np.arange(max(0, lo), min(self.matrix[0], lo + self.calibration_lines), dtype=np.int64)

    def t2_decay(self) -> np.ndarray | None:
        """``(echo_train_length,)`` echo amplitudes ``exp(-(j + 1) * echo_spacing_ms / t2_ms)``; None: off."""
        if self.t2_ms is None:
            return None
        te = (np.arange(self.echo_train_length) + 1) * self.echo_spacing_ms
        return np.exp(-te / self.t2_ms)


@dataclass
class IntraScanAcquisition:
    """A simulated multi-shot acquisition with motion between echo trains.

    Attributes
    ----------
    header
        The ISMRMRD header (``ismrmrd.xsd.ismrmrdHeader``).
    items
        The stream in acquisition order: noise line, separate calibration lines (encoding space 1), imaging
        lines (with their integrated ACS lines).
    truth
        One :class:`~kmotion.io.ismrmrd_writer.TrueMotion` per (repetition, slice, shot), in that order.
    objects
        ``(n_slices, n_y, n_x)`` complex64 objects in the pose of motion zero.
    coil_maps
        ``(n_slices, n_coils, n_y, n_x)`` complex64 coil sensitivities (fixed).
    noise_sigma
        Standard deviation of the complex noise per k-space sample (0 without noise).
    sampling
        The echo trains (rows of each shot in echo order; the same for every slice and repetition).
    motion
        ``(n_repetitions, n_shots, 3)`` pose ``(dx_px, dy_px, phi_deg)`` of every echo train.
    centre_shot
        The shot reading the k-space centre row ``n_ky // 2`` (the gauge without a reference).
    calibration_rows
        Rows of the separate calibration scan (empty when the ACS rows are integrated).
    """

    header: ismrmrd.xsd.ismrmrdHeader
    items: list[object]
    truth: list[TrueMotion]
    objects: np.ndarray
    coil_maps: np.ndarray
    noise_sigma: float
    sampling: MultiShotSampling
    motion: np.ndarray
    centre_shot: int
    calibration_rows: np.ndarray
    config: IntraScanConfig = field(default_factory=IntraScanConfig)

    @property
    def acquisitions(self) -> list[ismrmrd.Acquisition]:
        """The ``ismrmrd.Acquisition`` items."""
        return [a for a in self.items if isinstance(a, ismrmrd.Acquisition)]

    @property
    def xml(self) -> str:
        """The header serialised as ISMRMRD XML."""
        return str(ismrmrd.xsd.ToXML(self.header))


def relative_motion(
    motion: np.ndarray, reference: np.ndarray, pixel_spacing_mm: tuple[float, float] = (1.0, 1.0)
) -> np.ndarray:
    """Poses relative to another pose: ``T_s o T_ref^-1`` for every row of ``motion``.

    With ``T(r) = R(phi) r + t`` (mm): ``phi = phi_s - phi_ref``, ``t = t_s - R(phi) t_ref``.

    Parameters
    ----------
    motion
        ``(..., 3)`` poses ``(dx_px, dy_px, phi_deg)`` relative to a common base.
    reference
        ``(3,)`` the pose that becomes zero (e.g. ``motion[centre_shot]``: the gauge of a scan).
    pixel_spacing_mm
        ``(dy_mm, dx_mm)``.

    Returns
    -------
    ``(..., 3)`` in the same units.
    """
    m = np.asarray(motion, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64).reshape(3)
    dy_mm, dx_mm = pixel_spacing_mm
    phi = m[..., 2] - ref[2]
    c, s = np.cos(np.radians(phi)), np.sin(np.radians(phi))
    rx, ry = ref[0] * dx_mm, ref[1] * dy_mm
    tx = m[..., 0] * dx_mm - (c * rx - s * ry)
    ty = m[..., 1] * dy_mm - (s * rx + c * ry)
    return np.stack([tx / dx_mm, ty / dy_mm, phi], axis=-1)


def shot_motion(config: IntraScanConfig, centre_shot: int) -> np.ndarray:
    """``(n_shots, 3)`` poses of the moved scan's echo trains (module docstring, "The gauge").

    ``config.motion`` when given; else :func:`~kmotion.simulation.multishot.motion_pattern` (seed
    ``config.seed``), relative to ``centre_shot`` without a reference repetition, each parameter then scaled
    down if needed to stay within ``max_mm`` / ``max_deg``.
    """
    n_shots = config.sampling().n_shots
    if config.motion is not None:
        return np.asarray(config.motion, dtype=np.float64).reshape(n_shots, 3)
    spacing = config.pixel_spacing_mm
    ref = None if config.reference_repetitions else centre_shot
    m = motion_pattern(n_shots, config.pattern, config.max_mm, config.max_deg, spacing, config.seed, ref)
    if ref is not None:
        scale_mm = np.array([spacing[1], spacing[0], 1.0])
        lim = np.array([config.max_mm, config.max_mm, config.max_deg])
        peak = np.abs(m * scale_mm).max(axis=0)
        m = m * np.where(peak > lim, lim / np.maximum(peak, 1e-300), 1.0)
    return m + 0.0  # no -0.0 in the truth


def _header(
    config: IntraScanConfig,
    sampling: MultiShotSampling,
    truth: list[TrueMotion],
    centre_shot: int,
) -> ismrmrd.xsd.ismrmrdHeader:
    """The header: :func:`kmotion.simulation.raw.header_xml` of the equivalent per-repetition settings, then
    the multi-shot parts (segments, effective TE, separate calibration encoding, user parameters)."""
    raw_cfg = RawConfig(
        matrix=config.matrix,
        fov_mm=config.fov_mm,
        n_coils=config.n_coils,
        n_slices=config.n_slices,
        n_repetitions=config.n_repetitions,
        acceleration=config.acceleration,
        calibration_lines=0 if config.separate_calibration else config.calibration_lines,
        readout_oversampling=config.readout_oversampling,
        echo_train_length=config.echo_train_length,
        snr=config.snr,
        seed=config.seed,
        slice_thickness_mm=config.slice_thickness_mm,
        slice_gap_mm=config.slice_gap_mm,
        tr_ms=config.tr_ms,
        echo_spacing_ms=config.echo_spacing_ms,
        coil_half_width=config.coil_half_width,
    )
    n_rows = sum(len(s) for s in sampling.shots)
    fov_x_enc = config.readout_oversampling * config.fov_mm[1]
    header = ismrmrd.xsd.CreateFromDocument(header_xml(raw_cfg, n_rows, truth, fov_x_enc))
    header.measurementInformation.protocolName = "kmotion simulate-raw --intra-scan"
    echo_centre = int(sampling.echo_of_row()[config.matrix[0] // 2])
    header.sequenceParameters.TE = [(echo_centre + 1) * config.echo_spacing_ms]  # effective TE
    enc = header.encoding[0]
    enc.encodingLimits.segment.maximum = sampling.n_shots - 1
    if config.separate_calibration:
        cal = copy.deepcopy(enc)
        cal.encodingLimits.repetition.maximum = 0
        cal.encodingLimits.segment.maximum = 0
        cal.parallelImaging = None
        cal.echoTrainLength = None
        enc.parallelImaging.calibrationMode = ismrmrd.xsd.calibrationModeType.SEPARATE
        header.encoding.append(cal)
    up = header.userParameters
    up.userParameterLong = [
        p
        for p in up.userParameterLong
        if p.name != "kmotion.reference_repetition" or config.reference_repetitions > 0
    ]
    up.userParameterLong += [
        ismrmrd.xsd.userParameterLongType(name="kmotion.centre_shot", value=centre_shot),
        ismrmrd.xsd.userParameterLongType(
            name="kmotion.reference_repetitions", value=config.reference_repetitions
        ),
    ]
    up.userParameterString.append(
        ismrmrd.xsd.userParameterStringType(name="kmotion.shot_ordering", value=config.ordering)
    )
    return header


def _row_flags(config: IntraScanConfig) -> dict[int, int]:
    """``{row: flag}`` of the integrated ACS rows (none with a separate calibration scan)."""
    if config.separate_calibration:
        return {}
    c = config.matrix[0] // 2
    out = {}
    for row in config.calibration_rows().tolist():
        on_grid = (row - c) % config.acceleration == 0
        if on_grid and config.acceleration > 1:
            out[row] = ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING
        elif not on_grid:
            out[row] = ismrmrd.ACQ_IS_PARALLEL_CALIBRATION
    return out


def _noisy(kspace: np.ndarray, sigma: float, seed: list[int]) -> np.ndarray:
    if sigma <= 0:
        return kspace
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(kspace.shape, dtype=np.float32) + 1j * rng.standard_normal(
        kspace.shape, dtype=np.float32
    )
    return (kspace + (sigma / math.sqrt(2)) * noise).astype(np.complex64)


def simulate_intra_scan_from_objects(
    objects: np.ndarray | torch.Tensor,
    coil_maps: np.ndarray | torch.Tensor,
    config: IntraScanConfig,
) -> IntraScanAcquisition:
    """Simulate the multi-shot acquisition of given objects with given fixed coil maps (module docstring).

    Parameters
    ----------
    objects
        ``(n_slices, n_y, n_x)`` complex objects on the recon grid, inside the inscribed circle of the FOV.
    coil_maps
        ``(n_slices, n_coils, n_y, n_x)`` complex coil sensitivities.
    config
        ``n_slices``/``n_coils``/``matrix`` must match.

    Raises
    ------
    InputError
        For shapes that do not match ``config``.
    """
    obj = torch.as_tensor(np.asarray(objects)).to(torch.complex64)
    maps = torch.as_tensor(np.asarray(coil_maps)).to(torch.complex64)
    n_y, n_x = config.matrix
    if obj.shape != (config.n_slices, n_y, n_x):
        raise InputError(f"objects: expected shape {(config.n_slices, n_y, n_x)}, got {tuple(obj.shape)}")
    if maps.shape != (config.n_slices, config.n_coils, n_y, n_x):
        raise InputError(
            f"coil_maps: expected shape {(config.n_slices, config.n_coils, n_y, n_x)}, "
            f"got {tuple(maps.shape)}"
        )
    spacing = config.pixel_spacing_mm
    sampling = config.sampling()
    n_shots = sampling.n_shots
    centre_shot = int(sampling.shot_of_row()[n_y // 2])
    moved = shot_motion(config, centre_shot)
    motion = np.zeros((config.n_repetitions, n_shots, 3))
    motion[-1] = moved
    truth = [
        TrueMotion(
            sl,
            r,
            float(motion[r, s, 0]),
            float(motion[r, s, 1]),
            float(motion[r, s, 2]),
            float(motion[r, s, 0] * spacing[1]),
            float(motion[r, s, 1] * spacing[0]),
            s,
            centre_shot,
        )
        for r in range(config.n_repetitions)
        for sl in range(config.n_slices)
        for s in range(n_shots)
    ]
    header = _header(config, sampling, truth, centre_shot)
    sigma = float(snr_sigma(obj, config.snr).mean()) if config.snr is not None else 0.0
    os_ = config.readout_oversampling
    n_ro = os_ * n_x
    sample_time_us = 5.0 / os_
    decay = config.t2_decay()
    flags = _row_flags(config)
    geometry = [slice_geometry(_geometry_config(config), sl) for sl in range(config.n_slices)]

    items: list[object] = []
    t_ms = 0.0
    counter = 0
    if sigma > 0:
        items.append(noise_acquisition(config.n_coils, n_ro, sigma, config.seed, sample_time_us, t_ms))
        counter = 1
        t_ms += config.tr_ms
    cal_rows = config.calibration_rows() if config.separate_calibration else np.zeros(0, dtype=np.int64)
    if cal_rows.size:
        # the separate reference scan: motion-free, no decay, its own noise
        still = np.zeros((1, 3))
        full = shot_sampling(n_y, n_y, "linear")
        for sl in range(config.n_slices):
            k = shot_kspace(obj[sl], maps[sl], full, still, spacing, readout_oversampling=os_).numpy()
            k = _noisy(k[:, cal_rows], sigma, [config.seed, 17, sl])
            for i, row in enumerate(cal_rows.tolist()):
                counter += 1
                acq = imaging_line(
                    k[:, i],
                    scan_counter=counter,
                    sample_time_us=sample_time_us,
                    time_ms=t_ms,
                    row=row,
                    slice_index=sl,
                    repetition=0,
                    segment=0,
                    geometry=geometry[sl],
                    flag=ismrmrd.ACQ_IS_PARALLEL_CALIBRATION,
                )
                acq.encoding_space_ref = 1
                items.append(acq)
                t_ms += config.echo_spacing_ms
        t_ms += config.tr_ms

    slice_dt = config.tr_ms / config.n_slices
    for r in range(config.n_repetitions):
        kspace = np.stack(
            [
                shot_kspace(obj[sl], maps[sl], sampling, motion[r], spacing, decay, os_).numpy()
                for sl in range(config.n_slices)
            ]
        )
        kspace = _noisy(kspace, sigma, [config.seed, 13, r])
        lines: list[ismrmrd.Acquisition] = []
        for s, rows in enumerate(sampling.shots):
            for sl in range(config.n_slices):
                t0 = t_ms + s * config.tr_ms + sl * slice_dt
                for j, row in enumerate(rows):
                    counter += 1
                    lines.append(
                        imaging_line(
                            kspace[sl, :, row],
                            scan_counter=counter,
                            sample_time_us=sample_time_us,
                            time_ms=t0 + j * config.echo_spacing_ms,
                            row=row,
                            slice_index=sl,
                            repetition=r,
                            segment=s,
                            geometry=geometry[sl],
                            flag=flags.get(row, 0),
                        )
                    )
        _first_last_flags(lines, config.n_slices)
        items.extend(lines)
        t_ms += n_shots * config.tr_ms
    last = items[-1]
    assert isinstance(last, ismrmrd.Acquisition)
    last.set_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    return IntraScanAcquisition(
        header=header,
        items=items,
        truth=truth,
        objects=obj.numpy(),
        coil_maps=maps.numpy(),
        noise_sigma=sigma,
        sampling=sampling,
        motion=motion,
        centre_shot=centre_shot,
        calibration_rows=cal_rows,
        config=config,
    )


def _geometry_config(config: IntraScanConfig) -> RawConfig:
    """The :class:`RawConfig` whose slice geometry is ``config``'s."""
    return RawConfig(
        n_slices=config.n_slices,
        slice_thickness_mm=config.slice_thickness_mm,
        slice_gap_mm=config.slice_gap_mm,
        matrix=config.matrix,
    )


def _first_last_flags(lines: list[ismrmrd.Acquisition], n_slices: int) -> None:
    """FIRST/LAST_IN_SLICE and FIRST/LAST_IN_REPETITION on the first/last imaging line (not calibration-only)
    of each slice and of the repetition (``lines``: one repetition in time order)."""
    imaging = [
        a
        for a in lines
        if not (
            a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
            and not a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
        )
    ]
    for sl in range(n_slices):
        mine = [a for a in imaging if a.idx.slice == sl]
        mine[0].set_flag(ismrmrd.ACQ_FIRST_IN_SLICE)
        mine[-1].set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    imaging[0].set_flag(ismrmrd.ACQ_FIRST_IN_REPETITION)
    imaging[-1].set_flag(ismrmrd.ACQ_LAST_IN_REPETITION)


def simulate_intra_scan(config: IntraScanConfig | None = None) -> IntraScanAcquisition:
    """Simulate a multi-shot acquisition of head phantoms with rigid motion between echo trains.

    Deterministic for a given ``config.seed``; phantoms and coils are those of
    :func:`kmotion.simulation.raw.simulate_raw` with the same seed, matrix, FOV, slices and coils.
    """
    cfg = IntraScanConfig() if config is None else config
    g = torch.Generator().manual_seed(cfg.seed)
    objects = make_phantoms(cfg.n_slices, cfg.matrix, cfg.fov_mm, generator=g)
    coef = make_coil_coefficients(
        cfg.n_slices, cfg.n_coils, cfg.matrix, cfg.fov_mm, half_width=cfg.coil_half_width, generator=g
    )
    maps = coil_maps_from_coefficients(coef, cfg.matrix)
    return simulate_intra_scan_from_objects(objects, maps, cfg)


def write_intra_scan(acq: IntraScanAcquisition, path: str | Path, dataset: str = "dataset") -> Path:
    """Write ``acq`` to an ISMRMRD ``.h5`` file (header, acquisitions) with the per-shot truth (replaced if
    present)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists():
        p.unlink()
    write_stream(p, acq.header, acq.items, dataset)
    write_true_motion(p, acq.truth, dataset)
    return p
