"""Builders of synthetic ISMRMRD streams (header + acquisitions) in memory, for the fixtures of
``conftest.py`` (imported as ``_streams``; a unique name, unlike ``conftest``)."""

from __future__ import annotations

from types import SimpleNamespace

import ismrmrd
import ismrmrd.xsd
import numpy as np

_NS = "http://www.ismrm.org/ISMRMRD"


def make_header(
    n_ky: int = 28,
    n_kx: int = 32,
    fov_mm: tuple[float, float] = (224.0, 256.0),
    step1: tuple[int, int, int] | None = None,
    recon_fov_x: float | None = None,
    enc_x: int | None = None,
    n_slices: int = 2,
    n_reps: int = 2,
    acceleration: int = 2,
    echo_train_length: int = 4,
    n_averages: int = 1,
) -> ismrmrd.xsd.ismrmrdHeader:
    """An ``ismrmrd.xsd`` header; ``fov_mm`` is (y, x), ``step1`` = (min, max, center) of encode step 1.

    The echo train length goes to ``encoding/echoTrainLength`` (its place in this schema version).
    """
    lo, hi, c = step1 if step1 is not None else (0, n_ky - 1, n_ky // 2)
    ex = n_kx if enc_x is None else enc_x
    rfx = fov_mm[1] if recon_fov_x is None else recon_fov_x
    n_seg = max(1, -(-(hi - lo + 1) // (acceleration * echo_train_length)))
    xml = f"""<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="{_NS}">
  <experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace>
      <matrixSize><x>{ex}</x><y>{n_ky}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{fov_mm[1]}</x><y>{fov_mm[0]}</y><z>5</z></fieldOfView_mm>
    </encodedSpace>
    <reconSpace>
      <matrixSize><x>{n_kx}</x><y>{n_ky}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{rfx}</x><y>{fov_mm[0]}</y><z>5</z></fieldOfView_mm>
    </reconSpace>
    <encodingLimits>
      <kspace_encoding_step_1><minimum>{lo}</minimum><maximum>{hi}</maximum><center>{c}</center>
      </kspace_encoding_step_1>
      <average><minimum>0</minimum><maximum>{n_averages - 1}</maximum><center>0</center></average>
      <slice><minimum>0</minimum><maximum>{n_slices - 1}</maximum><center>0</center></slice>
      <repetition><minimum>0</minimum><maximum>{n_reps - 1}</maximum><center>0</center></repetition>
      <segment><minimum>0</minimum><maximum>{n_seg - 1}</maximum><center>0</center></segment>
    </encodingLimits>
    <trajectory>cartesian</trajectory>
    <parallelImaging>
      <accelerationFactor>
        <kspace_encoding_step_1>{acceleration}</kspace_encoding_step_1>
        <kspace_encoding_step_2>1</kspace_encoding_step_2>
      </accelerationFactor>
      <calibrationMode>other</calibrationMode>
    </parallelImaging>
    <echoTrainLength>{echo_train_length}</echoTrainLength>
  </encoding>
  <sequenceParameters><TR>3000</TR><TE>90</TE><echo_spacing>10</echo_spacing></sequenceParameters>
</ismrmrdHeader>
"""
    return ismrmrd.xsd.CreateFromDocument(xml)


def known_kspace(n_coils: int, n_ky: int, n_kx: int, seed: int = 0) -> np.ndarray:
    """Random complex k-space ``(n_coils, n_ky, n_kx)`` complex64."""
    g = np.random.default_rng(seed)
    return (g.standard_normal((n_coils, n_ky, n_kx)) + 1j * g.standard_normal((n_coils, n_ky, n_kx))).astype(
        np.complex64
    )


def make_acq(
    line: np.ndarray,
    ky: int,
    slice_: int = 0,
    rep: int = 0,
    segment: int = 0,
    contrast: int = 0,
    set_: int = 0,
    average: int = 0,
    center_sample: int | None = None,
    flags: tuple[int, ...] = (),
) -> ismrmrd.Acquisition:
    """One acquisition holding ``line`` ``(n_coils, n_samples)`` with the given counters and flags."""
    acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(line, dtype=np.complex64))
    acq.idx.kspace_encode_step_1 = ky
    acq.idx.slice = slice_
    acq.idx.repetition = rep
    acq.idx.contrast = contrast
    acq.idx.set = set_
    acq.idx.segment = segment
    acq.idx.average = average
    acq.center_sample = line.shape[-1] // 2 if center_sample is None else center_sample
    acq.read_dir[:] = [1.0, 0.0, 0.0]
    acq.phase_dir[:] = [0.0, 1.0, 0.0]
    acq.slice_dir[:] = [0.0, 0.0, 1.0]
    acq.position[:] = [0.0, 0.0, 5.0 * slice_]
    for f in flags:
        acq.set_flag(f)
    return acq


def slice_lines(
    kspace: np.ndarray,
    rows: list[int],
    c_ky: int,
    slice_: int = 0,
    rep: int = 0,
    last_flag: bool = True,
    etl: int = 4,
) -> list[ismrmrd.Acquisition]:
    """Acquisitions of the given grid ``rows`` of ``kspace`` (ky = row - n_ky // 2 + c_ky)."""
    n_ky = kspace.shape[-2]
    acqs = [
        make_acq(kspace[:, r, :], r - n_ky // 2 + c_ky, slice_=slice_, rep=rep, segment=i // etl)
        for i, r in enumerate(rows)
    ]
    if last_flag:
        acqs[-1].set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    return acqs


def undersampled_rows(n_ky: int, parity: int, r: int = 2) -> list[int]:
    """Rows with ``(row - n_ky // 2) % r == parity``."""
    return [row for row in range(n_ky) if (row - n_ky // 2) % r == parity]


def motion_stream(
    n_ky: int = 128,
    n_kx: int = 128,
    fov_mm: tuple[float, float] = (220.0, 220.0),
    n_coils: int = 4,
    motions: tuple[tuple[float, float, float], ...] = ((0.0, 0.0, 0.0), (2.0, -1.5, 6.0)),
    n_slices: int = 1,
    n_acs: int = 16,
    acceleration: int = 2,
    parity: int = 0,
    seed: int = 0,
    noise: float = 0.0,
    read_dir: tuple[float, float, float] = (1.0, 0.0, 0.0),
    phase_dir: tuple[float, float, float] = (0.0, 1.0, 0.0),
    extras: bool = True,
) -> SimpleNamespace:
    """A multi-coil Cartesian stream of phantoms with known rigid motion per repetition.

    Repetition ``r`` of every slice is the phantom moved by ``motions[r]`` = (dx_px, dy_px, phi_deg)
    (``kmotion.physics.apply_motion_image``, pixel spacing from ``fov_mm``); coils do not move.  Rows with
    ``(row - n_ky // 2) % acceleration == parity`` are acquired; repetition 0 is preceded by ``n_acs``
    calibration-only centre lines (``ACQ_IS_PARALLEL_CALIBRATION``).  ``extras`` adds a noise line first
    and a waveform after the first slice.  Returns header, items, the true coil maps, objects and the fully
    sampled k-space per (slice, repetition).
    """
    import torch

    from kmotion.physics import apply_motion_image, fft2c
    from kmotion.simulation.phantoms import (
        add_complex_noise,
        coil_maps_from_coefficients,
        make_coil_coefficients,
        make_phantoms,
    )

    shape = (n_ky, n_kx)
    spacing = (fov_mm[0] / n_ky, fov_mm[1] / n_kx)
    objects = make_phantoms(n_slices, shape, fov_mm, generator=seed)
    coef = make_coil_coefficients(n_slices, n_coils, shape, fov_mm, generator=seed + 1)
    maps = coil_maps_from_coefficients(coef, shape)
    header = make_header(
        n_ky, n_kx, fov_mm, n_slices=n_slices, n_reps=len(motions), acceleration=acceleration
    )
    gen = torch.Generator().manual_seed(seed + 2)
    rows = undersampled_rows(n_ky, parity, acceleration)
    c = n_ky // 2
    items: list[object] = []
    full: dict[tuple[int, int], np.ndarray] = {}
    counter = 0

    def stamp(acq: ismrmrd.Acquisition, s: int) -> ismrmrd.Acquisition:
        nonlocal counter
        acq.scan_counter = counter
        acq.acquisition_time_stamp = 1000 + 10 * counter
        acq.read_dir[:] = read_dir
        acq.phase_dir[:] = phase_dir
        acq.slice_dir[:] = np.cross(read_dir, phase_dir).tolist()
        acq.position[:] = [0.0, 0.0, 5.0 * s]
        acq.patient_table_position[:] = [0.0, 0.0, -100.0]
        counter += 1
        return acq

    if extras:
        items.append(
            stamp(
                make_acq(
                    np.zeros((n_coils, n_kx), np.complex64), 0, flags=(ismrmrd.ACQ_IS_NOISE_MEASUREMENT,)
                ),
                0,
            )
        )
    for r, (dx, dy, phi) in enumerate(motions):
        moved = apply_motion_image(objects, dx, dy, phi, spacing)
        k = fft2c(maps * moved[:, None])
        if noise > 0:
            k = add_complex_noise(k, noise, gen)
        for s in range(n_slices):
            ks = k[s].numpy().astype(np.complex64)
            full[(s, r)] = ks
            if r == 0 and n_acs:
                for row in range(c - n_acs // 2, c - n_acs // 2 + n_acs):
                    acs = make_acq(
                        ks[:, row], row, slice_=s, rep=r, flags=(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION,)
                    )
                    items.append(stamp(acs, s))
            for i, acq in enumerate(slice_lines(ks, rows, c, slice_=s, rep=r)):
                acq.idx.segment = i // 4
                items.append(stamp(acq, s))
            if extras and r == 0 and s == 0:
                items.append(ismrmrd.Waveform.from_array(np.arange(20, dtype=np.uint32).reshape(1, 20)))
    return SimpleNamespace(
        header=header,
        items=items,
        maps=maps,
        objects=objects,
        full=full,
        spacing=spacing,
        rows=rows,
        motions=motions,
    )
