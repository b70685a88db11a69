"""Simulated raw data: a multi-coil Cartesian 2-D ISMRMRD acquisition with known rigid motion.

:func:`simulate_raw` returns the header, the stream of acquisitions (and optional waveforms) and the true
motion; :func:`write_raw` stores it in an ISMRMRD ``.h5`` file with :mod:`kmotion.io.ismrmrd_writer`, whose
:func:`~kmotion.io.ismrmrd_writer.read_true_motion` reads the truth back.

What is simulated (defaults of :class:`RawConfig`)
--------------------------------------------------
* ``n_slices`` axial slices of a head-like phantom (:func:`kmotion.simulation.phantoms.make_phantoms`, smooth
  background phase), recon matrix ``(n_y, n_x)`` = 256 x 256, FOV 220 x 220 mm, ``n_coils`` = 8 fixed
  receive coils (:func:`~kmotion.simulation.phantoms.make_coil_coefficients`).
* ``n_repetitions`` = 12 repetitions of the same sequence; repetition 0 is motion-free (the reference), every
  later one has its own rigid in-plane motion ``(dx_px, dy_px, phi_deg)`` (the same for all slices of a
  repetition), drawn uniformly within ``motion_fraction`` (80 %) of the shipped network's trained range in mm
  (±12 px of 220/448 mm, ±12 deg); at least half of the moved repetitions have ``|phi| >= min_rotation_deg``
  (5 deg).  Signs and units as in ``docs/conventions.md``; pixels are those of the recon grid.
* Physics: the object moves, the coils do not: ``K_c = fft2c(c_c * g)`` with ``g`` the moved object
  (:func:`kmotion.physics.motion.apply_motion_image`).  The readout is 2x oversampled (the coil images are
  zero-padded along x before the FFT, the encoded FOV_x doubles), complex Gaussian noise at ``snr``
  (``docs/conventions.md``: mean object magnitude over its support / sigma, one sigma for the whole
  acquisition) is added to the samples.
* Sampling: every ``acceleration``-th phase-encoding row (the centre row included) plus a fully sampled
  block of ``calibration_lines`` rows at the centre.  Calibration rows off the imaging grid carry
  ``ACQ_IS_PARALLEL_CALIBRATION``, those on it ``ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING`` (as
  ``siemens_to_ismrmrd`` marks integrated reference lines).  Lines are acquired in ascending ``ky`` in echo
  trains of ``echo_train_length`` lines (``idx.segment``), slice by slice, repetition by repetition.
* Flags: a noise acquisition first (``ACQ_IS_NOISE_MEASUREMENT``; omitted when ``snr`` is None),
  ``ACQ_FIRST/LAST_IN_SLICE`` per (slice, repetition), ``ACQ_FIRST/LAST_IN_REPETITION``,
  ``ACQ_LAST_IN_MEASUREMENT``; ``position``/``read_dir``/``phase_dir``/``slice_dir`` per slice;
  ``acquisition_time_stamp`` in 2.5 ms ticks (echo trains every ``tr_ms``, lines ``echo_spacing_ms`` apart).

Where the truth is stored
-------------------------
In the file (:func:`write_raw`): the HDF5 dataset ``/dataset/kmotion_true_motion`` (in the ISMRMRD group), a
structured array with one row per (slice, repetition) and fields ``slice, repetition, dx_px, dy_px,
phi_deg, dx_mm, dy_mm``.  In the header (so it also travels in an MRD stream): ``userParameters`` string
``kmotion.true_motion`` holding the same rows as JSON.  Both formats are :mod:`kmotion.io.ismrmrd_writer`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import ismrmrd
import ismrmrd.xsd
import numpy as np
import torch

from kmotion.io.ismrmrd_writer import (
    TRUTH_USER_PARAMETER,
    TrueMotion,
    truth_json,
    write_stream,
    write_true_motion,
)
from kmotion.physics.fft import fft2c
from kmotion.physics.motion import apply_motion_image
from kmotion.physics.validate import InputError
from kmotion.simulation.phantoms import (
    coil_maps_from_coefficients,
    make_coil_coefficients,
    make_phantoms,
    snr_sigma,
)

__all__ = [
    "RawAcquisition",
    "RawConfig",
    "simulate_raw",
    "header_xml",
    "imaging_line",
    "noise_acquisition",
    "simulate_raw",
    "simulate_raw_from_objects",
    "slice_geometry",
    "time_stamp_ticks",
    "write_raw",
]

# The shipped network's trained range: +-12 px of the study grid (220 mm / 448) and +-12 deg.
NETWORK_RANGE_MM = 12.0 * 220.0 / 448.0
NETWORK_RANGE_DEG = 12.0
_TICK_MS = 2.5  # ISMRMRD/Siemens acquisition_time_stamp unit
_NS = "http://www.ismrm.org/ISMRMRD"


@dataclass(frozen=True)
class RawConfig:
    """Settings of :func:`simulate_raw` (see the module docstring); sizes in (y, x) order, lengths in mm."""

    matrix: tuple[int, int] = (256, 256)
    fov_mm: tuple[float, float] = (220.0, 220.0)
    n_coils: int = 8
    n_slices: int = 2
    n_repetitions: int = 12
    acceleration: int = 2
    calibration_lines: int = 24
    readout_oversampling: int = 2
    echo_train_length: int = 8
    snr: float | None = 30.0
    seed: int = 0
    motion_fraction: float = 0.8
    min_rotation_deg: float = 5.0
    motion: tuple[tuple[float, float, float], ...] | None = None
    """Explicit ``(dx_px, dy_px, phi_deg)`` per repetition (overrides the random draw)."""
    slice_thickness_mm: float = 5.0
    slice_gap_mm: float = 1.0
    tr_ms: float = 400.0
    echo_spacing_ms: float = 10.0
    waveforms: bool = False
    """Add one respiratory waveform per repetition (tests pass-through of waveforms)."""
    coil_half_width: int = 4

    def __post_init__(self) -> None:
        for name in ("n_coils", "n_slices", "n_repetitions", "acceleration", "echo_train_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"RawConfig.{name}: expected a positive integer, got {v!r}")
        if self.readout_oversampling not in (1, 2):
            raise InputError(
                f"RawConfig.readout_oversampling: expected 1 or 2, got {self.readout_oversampling!r}"
            )
        if len(self.matrix) != 2 or min(self.matrix) < 16:
            raise InputError(f"RawConfig.matrix: expected (n_y, n_x) >= 16, got {self.matrix!r}")
        if not 0 <= self.calibration_lines <= self.matrix[0]:
            raise InputError(
                f"RawConfig.calibration_lines: expected 0..{self.matrix[0]}, got {self.calibration_lines}"
            )
        if self.snr is not None and not (math.isfinite(self.snr) and self.snr > 0):
            raise InputError(f"RawConfig.snr: expected a positive number or None, got {self.snr!r}")
        if self.motion is not None and len(self.motion) != self.n_repetitions:
            raise InputError(
                f"RawConfig.motion: expected {self.n_repetitions} (dx_px, dy_px, phi_deg) rows, got "
                f"{len(self.motion)}"
            )
        if not 0 < self.motion_fraction <= 1:
            raise InputError(f"RawConfig.motion_fraction: expected (0, 1], got {self.motion_fraction}")

    @property
    def pixel_spacing_mm(self) -> tuple[float, float]:
        """``(dy_mm, dx_mm)`` of the recon grid."""
        return self.fov_mm[0] / self.matrix[0], self.fov_mm[1] / self.matrix[1]


@dataclass
class RawAcquisition:
    """A simulated acquisition.

    Attributes
    ----------
    header
        The ISMRMRD header (``ismrmrd.xsd.ismrmrdHeader``).
    items
        The stream in acquisition order: the noise acquisition, the imaging and calibration lines, and (with
        ``RawConfig.waveforms``) ``ismrmrd.Waveform`` items.
    truth
        One :class:`TrueMotion` per (slice, repetition).
    objects
        ``(n_slices, n_y, n_x)`` complex64 motion-free objects on the recon grid.
    coil_maps
        ``(n_slices, n_coils, n_y, n_x)`` complex64 coil sensitivities on the recon grid.
    noise_sigma
        Standard deviation of the complex noise per k-space sample (0 without noise).
    """

    header: ismrmrd.xsd.ismrmrdHeader
    items: list[object]
    truth: list[TrueMotion]
    objects: np.ndarray
    coil_maps: np.ndarray
    noise_sigma: float
    config: RawConfig = field(default_factory=RawConfig)

    @property
    def acquisitions(self) -> list[ismrmrd.Acquisition]:
        """The ``ismrmrd.Acquisition`` items (noise, calibration and imaging lines)."""
        return [a for a in self.items if isinstance(a, ismrmrd.Acquisition)]

    @property
    def waveforms(self) -> list[ismrmrd.Waveform]:
        """The ``ismrmrd.Waveform`` items."""
        return [w for w in self.items if isinstance(w, ismrmrd.Waveform)]

    @property
    def xml(self) -> str:
        """The header serialised as ISMRMRD XML."""
        return str(ismrmrd.xsd.ToXML(self.header))


def draw_motion_schedule(config: RawConfig) -> np.ndarray:
    """``(n_repetitions, 3)`` motion ``(dx_px, dy_px, phi_deg)`` per repetition; row 0 is zero.

    Translations uniform within ``motion_fraction * NETWORK_RANGE_MM`` (converted to recon pixels), rotations
    uniform within ``motion_fraction * NETWORK_RANGE_DEG``; ``ceil(n_moved / 2)`` randomly chosen moved
    repetitions have ``|phi| >= min_rotation_deg``.
    """
    if config.motion is not None:
        return np.asarray(config.motion, dtype=np.float64).reshape(config.n_repetitions, 3)
    rng = np.random.default_rng([config.seed, 7])
    n = config.n_repetitions
    t_mm = config.motion_fraction * NETWORK_RANGE_MM
    p_max = config.motion_fraction * NETWORK_RANGE_DEG
    p_min = min(config.min_rotation_deg, p_max)
    dy_mm, dx_mm = config.pixel_spacing_mm
    out = np.zeros((n, 3))
    n_moved = n - 1
    if n_moved == 0:
        return out
    out[1:, 0] = rng.uniform(-t_mm, t_mm, n_moved) / dx_mm
    out[1:, 1] = rng.uniform(-t_mm, t_mm, n_moved) / dy_mm
    phi = rng.uniform(-p_max, p_max, n_moved)
    big = rng.permutation(n_moved)[: -(-n_moved // 2)]
    phi[big] = rng.choice([-1.0, 1.0], big.size) * rng.uniform(p_min, p_max, big.size)
    out[1:, 2] = phi
    return out


def header_xml(config: RawConfig, n_acquired: int, truth: list[TrueMotion], fov_x_enc: float) -> str:
    """The ISMRMRD header (XML text) of a simulated acquisition: ``n_acquired`` lines per slice in echo trains
    of ``config.echo_train_length``, encoded FOV x ``fov_x_enc`` mm, ``truth`` in ``kmotion.true_motion``."""
    n_y, n_x = config.matrix
    fov_y, fov_x = config.fov_mm
    os_ = config.readout_oversampling
    n_seg = -(-n_acquired // config.echo_train_length)
    coils = "".join(
        f"<coilLabel><coilNumber>{c}</coilNumber><coilName>kmotion_sim_{c:02d}</coilName></coilLabel>"
        for c in range(config.n_coils)
    )
    calib = "embedded" if config.calibration_lines else "other"
    thick = config.slice_thickness_mm
    truth_text = truth_json(truth).replace("&", "&amp;").replace("<", "&lt;")
    waveform_info = (
        "<waveformInformation><waveformName>RESP</waveformName><waveformType>respiratory</waveformType>"
        "<userParameters></userParameters></waveformInformation>"
        if config.waveforms
        else ""
    )
    te = config.echo_spacing_ms
    return f"""<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="{_NS}">
  <measurementInformation>
    <measurementID>kmotion_simulate_raw_{config.seed}</measurementID>
    <patientPosition>HFS</patientPosition>
    <protocolName>kmotion simulate-raw</protocolName>
    <sequenceName>kmotion_tse_sim</sequenceName>
  </measurementInformation>
  <acquisitionSystemInformation>
    <systemVendor>kmotion</systemVendor>
    <systemModel>simulation</systemModel>
    <systemFieldStrength_T>3.0</systemFieldStrength_T>
    <relativeReceiverNoiseBandwidth>0.793</relativeReceiverNoiseBandwidth>
    <receiverChannels>{config.n_coils}</receiverChannels>
    {coils}
  </acquisitionSystemInformation>
  <experimentalConditions><H1resonanceFrequency_Hz>123200000</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace>
      <matrixSize><x>{os_ * n_x}</x><y>{n_y}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{fov_x_enc}</x><y>{fov_y}</y><z>{thick}</z></fieldOfView_mm>
    </encodedSpace>
    <reconSpace>
      <matrixSize><x>{n_x}</x><y>{n_y}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{fov_x}</x><y>{fov_y}</y><z>{thick}</z></fieldOfView_mm>
    </reconSpace>
    <encodingLimits>
      <kspace_encoding_step_1><minimum>0</minimum><maximum>{n_y - 1}</maximum><center>{n_y // 2}</center>
      </kspace_encoding_step_1>
      <kspace_encoding_step_2><minimum>0</minimum><maximum>0</maximum><center>0</center></kspace_encoding_step_2>
      <average><minimum>0</minimum><maximum>0</maximum><center>0</center></average>
      <slice><minimum>0</minimum><maximum>{config.n_slices - 1}</maximum><center>0</center></slice>
      <contrast><minimum>0</minimum><maximum>0</maximum><center>0</center></contrast>
      <phase><minimum>0</minimum><maximum>0</maximum><center>0</center></phase>
      <repetition><minimum>0</minimum><maximum>{config.n_repetitions - 1}</maximum><center>0</center>
      </repetition>
      <set><minimum>0</minimum><maximum>0</maximum><center>0</center></set>
      <segment><minimum>0</minimum><maximum>{n_seg - 1}</maximum><center>0</center></segment>
    </encodingLimits>
    <trajectory>cartesian</trajectory>
    <parallelImaging>
      <accelerationFactor>
        <kspace_encoding_step_1>{config.acceleration}</kspace_encoding_step_1>
        <kspace_encoding_step_2>1</kspace_encoding_step_2>
      </accelerationFactor>
      <calibrationMode>{calib}</calibrationMode>
    </parallelImaging>
    <echoTrainLength>{config.echo_train_length}</echoTrainLength>
  </encoding>
  <sequenceParameters>
    <TR>{config.tr_ms}</TR><TE>{te}</TE><flipAngle_deg>90</flipAngle_deg>
    <sequence_type>TurboSpinEcho</sequence_type><echo_spacing>{config.echo_spacing_ms}</echo_spacing>
  </sequenceParameters>
  <userParameters>
    <userParameterLong><name>kmotion.reference_repetition</name><value>0</value></userParameterLong>
    <userParameterString><name>{TRUTH_USER_PARAMETER}</name><value>{truth_text}</value></userParameterString>
  </userParameters>
  {waveform_info}
</ismrmrdHeader>
"""


def _acquired_rows(config: RawConfig) -> list[tuple[int, int]]:
    """(row, flag) of the acquired rows in acquisition order; flag 0 = imaging, else a calibration flag."""
    n_y = config.matrix[0]
    c = n_y // 2
    lo = c - config.calibration_lines // 2
    calib = range(lo, lo + config.calibration_lines)
    rows = []
    for row in range(n_y):
        on_grid = (row - c) % config.acceleration == 0
        in_calib = row in calib
        if on_grid and in_calib and config.acceleration > 1:
            rows.append((row, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING))
        elif on_grid:
            rows.append((row, 0))
        elif in_calib:
            rows.append((row, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION))
    return rows


def slice_geometry(config: RawConfig, s: int) -> tuple[list[float], ...]:
    """``(position, read_dir, phase_dir, slice_dir)`` of slice ``s`` (axial slices centred on z = 0, mm)."""
    z = (s - (config.n_slices - 1) / 2) * (config.slice_thickness_mm + config.slice_gap_mm)
    return [0.0, 0.0, float(z)], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]


def time_stamp_ticks(ms: float) -> int:
    """``acquisition_time_stamp`` of a time in ms (2.5 ms ticks)."""
    return int(round(ms / _TICK_MS))


def noise_acquisition(
    n_coils: int, n_samples: int, sigma: float, seed: int, sample_time_us: float, time_ms: float = 0.0
) -> ismrmrd.Acquisition:
    """The noise line (``ACQ_IS_NOISE_MEASUREMENT``, ``scan_counter`` 1): ``(n_coils, n_samples)`` complex
    Gaussian noise of standard deviation ``sigma`` (seeded by ``seed``)."""
    rng0 = np.random.default_rng([seed, 11])
    noise = rng0.standard_normal((n_coils, n_samples)) + 1j * rng0.standard_normal((n_coils, n_samples))
    noise_acq = ismrmrd.Acquisition.from_array((noise * sigma / math.sqrt(2)).astype(np.complex64))
    noise_acq.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    noise_acq.scan_counter = 1
    noise_acq.available_channels = n_coils
    noise_acq.sample_time_us = sample_time_us
    noise_acq.acquisition_time_stamp = time_stamp_ticks(time_ms)
    noise_acq.center_sample = n_samples // 2
    return noise_acq


def imaging_line(
    data: np.ndarray,
    *,
    scan_counter: int,
    sample_time_us: float,
    time_ms: float,
    row: int,
    slice_index: int,
    repetition: int,
    segment: int,
    geometry: tuple[list[float], ...],
    flag: int = 0,
) -> ismrmrd.Acquisition:
    """One k-space line ``data`` ``(n_coils, n_samples)`` with its counters, time stamp, slice geometry
    (:func:`slice_geometry`) and ``flag`` (0: none); ``center_sample`` is ``n_samples // 2``."""
    acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, np.complex64))
    acq.scan_counter = scan_counter
    acq.available_channels = data.shape[0]
    acq.sample_time_us = sample_time_us
    acq.center_sample = data.shape[-1] // 2
    acq.acquisition_time_stamp = time_stamp_ticks(time_ms)
    acq.idx.kspace_encode_step_1 = row  # encodingLimits centre = n_y // 2 = centre row
    acq.idx.slice = slice_index
    acq.idx.repetition = repetition
    acq.idx.segment = segment
    position, read_dir, phase_dir, slice_dir = geometry
    acq.position[:] = position
    acq.read_dir[:] = read_dir
    acq.phase_dir[:] = phase_dir
    acq.slice_dir[:] = slice_dir
    if flag:
        acq.set_flag(flag)
    return acq


def simulate_raw_from_objects(
    objects: np.ndarray | torch.Tensor,
    coil_maps: np.ndarray | torch.Tensor,
    config: RawConfig,
) -> RawAcquisition:
    """Simulate the acquisition of given motion-free objects with given (fixed) coil maps.

    Parameters
    ----------
    objects
        ``(n_slices, n_y, n_x)`` complex objects on the recon grid (``config.matrix``, ``config.fov_mm``),
        inside the inscribed circle of the FOV.
    coil_maps
        ``(n_slices, n_coils, n_y, n_x)`` complex coil sensitivities (they do not move).
    config
        Sampling, motion, noise and header settings; ``n_slices``/``n_coils``/``matrix`` must match.

    Returns
    -------
    RawAcquisition
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
    motion = draw_motion_schedule(config)
    if np.abs(motion[:, 2]).max(initial=0.0) > 90:
        raise InputError("RawConfig.motion: |phi_deg| must be <= 90")
    sigma = 0.0
    if config.snr is not None:
        sigma = float(snr_sigma(obj, config.snr).mean())
    os_ = config.readout_oversampling
    n_ro = os_ * n_x
    x0 = n_ro // 2 - n_x // 2
    fov_x_enc = os_ * config.fov_mm[1]
    rows = _acquired_rows(config)
    truth = [
        TrueMotion(
            s,
            r,
            float(motion[r, 0]),
            float(motion[r, 1]),
            float(motion[r, 2]),
            float(motion[r, 0] * spacing[1]),
            float(motion[r, 1] * spacing[0]),
        )
        for r in range(config.n_repetitions)
        for s in range(config.n_slices)
    ]
    header = ismrmrd.xsd.CreateFromDocument(header_xml(config, len(rows), truth, fov_x_enc))

    items: list[object] = []
    counter = 0
    t_ms = 0.0
    sample_time_us = 5.0 / os_
    if sigma > 0:
        items.append(noise_acquisition(config.n_coils, n_ro, sigma, config.seed, sample_time_us, t_ms))
        counter = 1
        t_ms += config.tr_ms
    etl = config.echo_train_length
    for r in range(config.n_repetitions):
        dx, dy, phi = (float(v) for v in motion[r])
        moved = apply_motion_image(obj, dx, dy, phi, spacing) if (dx, dy, phi) != (0.0, 0.0, 0.0) else obj
        coil_img = moved[:, None] * maps  # (S, C, n_y, n_x): the coils do not move
        if os_ > 1:
            padded = torch.zeros((*coil_img.shape[:-1], n_ro), dtype=torch.complex64)
            padded[..., x0 : x0 + n_x] = coil_img
            coil_img = padded
        kspace = fft2c(coil_img).numpy()
        if sigma > 0:
            rng = np.random.default_rng([config.seed, 13, r])
            shape = kspace.shape
            kspace = kspace + (sigma / math.sqrt(2)) * (
                rng.standard_normal(shape, dtype=np.float32)
                + 1j * rng.standard_normal(shape, dtype=np.float32)
            )
        if config.waveforms:
            n_wave = max(2, int(round(config.n_slices * len(rows) / etl * config.tr_ms / 20.0)))
            tt = np.arange(n_wave) * 20.0 + t_ms
            resp = 2048 + 1000 * np.sin(2 * np.pi * tt / 4000.0)
            wave = ismrmrd.Waveform.from_array(
                resp.astype(np.uint32).reshape(1, -1),
                waveform_id=2,
                sample_time_us=20000.0,
                time_stamp=time_stamp_ticks(t_ms),
                scan_counter=counter,
            )
            items.append(wave)
        for s in range(config.n_slices):
            geometry = slice_geometry(config, s)
            for i, (row, flag) in enumerate(rows):
                seg, echo = divmod(i, etl)
                counter += 1
                acq = imaging_line(
                    kspace[s, :, row, :],
                    scan_counter=counter,
                    sample_time_us=sample_time_us,
                    time_ms=t_ms + seg * config.tr_ms + echo * config.echo_spacing_ms,
                    row=row,
                    slice_index=s,
                    repetition=r,
                    segment=seg,
                    geometry=geometry,
                    flag=flag,
                )
                if i == 0:
                    acq.set_flag(ismrmrd.ACQ_FIRST_IN_SLICE)
                    if s == 0:
                        acq.set_flag(ismrmrd.ACQ_FIRST_IN_REPETITION)
                if i == len(rows) - 1:
                    acq.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
                    if s == config.n_slices - 1:
                        acq.set_flag(ismrmrd.ACQ_LAST_IN_REPETITION)
                        if r == config.n_repetitions - 1:
                            acq.set_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
                items.append(acq)
            t_ms += -(-len(rows) // etl) * config.tr_ms
    return RawAcquisition(
        header=header,
        items=items,
        truth=truth,
        objects=obj.numpy(),
        coil_maps=maps.numpy(),
        noise_sigma=sigma,
        config=config,
    )


def simulate_raw(config: RawConfig | None = None) -> RawAcquisition:
    """Simulate a multi-coil Cartesian acquisition of phantoms with known rigid motion (module docstring).

    Deterministic for a given ``config.seed``: phantoms, coils, motion and noise come from separate seeded
    streams, so a config that differs only in ``motion`` gives the same objects, coils and noise (e.g. a
    motion-free twin for NRMSE references).
    """
    cfg = RawConfig() if config is None else config
    g = torch.Generator().manual_seed(cfg.seed)
    objects = make_phantoms(cfg.n_slices, cfg.matrix, cfg.fov_mm, generator=g)
    coef = make_coil_coefficients(
        cfg.n_slices, cfg.n_coils, cfg.matrix, cfg.fov_mm, half_width=cfg.coil_half_width, generator=g
    )
    maps = coil_maps_from_coefficients(coef, cfg.matrix)
    return simulate_raw_from_objects(objects, maps, cfg)


def write_raw(raw: RawAcquisition, path: str | Path, dataset: str = "dataset") -> Path:
    """Write ``raw`` to an ISMRMRD ``.h5`` file (header, acquisitions, waveforms) and the truth.

    An existing file is replaced.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists():
        p.unlink()
    write_stream(p, raw.header, raw.items, dataset)
    write_true_motion(p, raw.truth, dataset)
    return p
