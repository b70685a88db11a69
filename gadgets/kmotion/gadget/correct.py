"""Stage 5 of the streaming gadget: correct each estimated slice on its own acquired lines.

``cartesian`` output (default): SENSE with the motion in the forward model, one batched solve per grid
(:func:`correct_sense`), the difference written back onto the raw lines (:func:`add_delta`); ``trajectory``
output, and the fallback without coil maps: the exact inverse translation ramp on every line
(:func:`ramp_lines`) with, for ``trajectory``, the rotated k-space positions (:func:`rotated_traj`).
:func:`write_back` puts the new data into the acquisitions.  See ``docs/gadget.md`` (Correction).
"""

from __future__ import annotations

import logging
import math

import ismrmrd
import numpy as np
import torch

from kmotion.estimation.shots import compress_coils
from kmotion.gadget.assemble import line_layout, upsample_readout
from kmotion.gadget.buffer import SliceBuffer
from kmotion.gadget.calibration import CalibrationStore, coil_maps_for
from kmotion.gadget.params import GadgetParams
from kmotion.gadget.reference import SliceWork, low_resolution_reference
from kmotion.physics.fft import fft2c
from kmotion.physics.sense import MotionSense, sense_reconstruct
from kmotion.physics.shot_sense import ShotSense, sense_reconstruct_shots

__all__ = [
    "SENSE_LAMBDA",
    "add_delta",
    "correct_shots",
    "correct_by_ramp",
    "correct_sense",
    "correct_slices",
    "mark_failed",
    "ramp_lines",
    "rotated_traj",
    "write_back",
]

log = logging.getLogger("kmotion.gadget")

SHOT_VIRTUAL_COILS = 6
"""Virtual coils (array compression of the data) of the per-shot correction's SENSE reconstruction; the new
data are then predicted on every coil."""

SENSE_LAMBDA = 1e-2
"""Tikhonov weight of the cartesian correction and of :func:`~kmotion.gadget.recon.reconstruct_slice`
(absolute; maps have unit RSS, see ``physics/sense.py``).  1e-2 rather than 1e-3: with 20 CG iterations it
stops the fit of coil-map errors (semi-convergence), halving the correction error (``docs/gadget.md``)."""


def correct_slices(
    work: list[SliceWork], params: GadgetParams, calibration: CalibrationStore, device: torch.device
) -> None:
    """Correct the estimated slices of ``work`` (reports with ``corrected``): the ramp where that is all,
    else one batched SENSE solve per grid shape; a failure marks only the slices it concerns."""
    sense: dict[tuple[object, ...], list[SliceWork]] = {}
    for w in work:
        if w.shot_reports is not None:
            try:
                correct_shots(w, params, device)
            except Exception as exc:
                mark_failed([w], exc)
            continue
        try:
            if correct_by_ramp(w, params.output, calibration, device):
                assert w.assembled is not None
                a = w.assembled
                sense.setdefault((a.kspace.shape, a.pixel_spacing_mm), []).append(w)
        except Exception as exc:
            mark_failed([w], exc)
    for group in sense.values():  # one batched SENSE solve per grid shape
        try:
            correct_sense(group, device, params.sense_iterations)
        except Exception as exc:
            mark_failed(group, exc)


def correct_by_ramp(w: SliceWork, output: str, calibration: CalibrationStore, device: torch.device) -> bool:
    """Correct one slice by the ramp (trajectory mode, translation-only fallback); True: needs SENSE."""
    assert w.report is not None and w.assembled is not None and w.reference is not None
    rep, a = w.report, w.assembled
    n_ky = a.kspace.shape[1]
    if output == "trajectory":
        lines = ramp_lines(w.buffer, n_ky, rep.dx_px, rep.dy_px)
        w.new_data = [(acq, data) for acq, data, _, _ in lines]
        w.traj = [rotated_traj(kx, ky, rep.rot_deg, a.fov_mm) for _, _, kx, ky in lines]
        return False
    ref = w.reference
    if ref.maps is None:
        ref.maps = coil_maps_for(ref.slice, calibration, device)
    if isinstance(ref.maps, str):
        lines = ramp_lines(w.buffer, n_ky, rep.dx_px, rep.dy_px)
        w.new_data = [(acq, data) for acq, data, _, _ in lines]
        if not rep.reason.startswith("translation only"):  # the estimation stage may have said it already
            rep.reason = f"translation only: {ref.maps}" + (f"; {rep.reason}" if rep.reason else "")
        log.warning("slice %s: rotation not corrected, %s", tuple(a.key), ref.maps)
        return False
    return True


def correct_sense(work: list[SliceWork], device: torch.device, iterations: int) -> None:
    """SENSE with the motion in the model for slices on one grid, batched; new data on the same lines."""
    slices = [w.assembled for w in work]
    maps_list = [w.reference.maps for w in work if w.reference is not None]
    assert all(a is not None for a in slices) and all(isinstance(m, torch.Tensor) for m in maps_list)
    maps = torch.stack([m.to(device) for m in maps_list if isinstance(m, torch.Tensor)])
    y = torch.stack([torch.from_numpy(a.kspace) for a in slices if a is not None]).to(device)
    mask = torch.stack([torch.from_numpy(a.samples()) for a in slices if a is not None]).to(device)
    motion = torch.tensor(
        [[w.report.dx_px, w.report.dy_px, w.report.rot_deg] for w in work if w.report is not None],
        dtype=torch.float64,
    )
    spacing = slices[0].pixel_spacing_mm if slices[0] is not None else (1.0, 1.0)
    x = sense_reconstruct(y, mask, maps, motion.to(device), spacing, iterations, SENSE_LAMBDA)
    y_corr = MotionSense(maps, mask).forward(x)
    delta = ((y_corr - y) * mask[:, None]).cpu().numpy()
    if not np.isfinite(delta).all():
        raise ValueError("non-finite values in the SENSE correction")
    for w, d in zip(work, delta, strict=True):
        w.new_data = add_delta(w.buffer, d)


def mark_failed(work: list[SliceWork], exc: Exception) -> None:
    """Mark the slices of ``work`` as not corrected because the correction raised ``exc`` (data untouched)."""
    for w in work:
        log.warning("correction of %s failed: %s: %s", tuple(w.buffer.key), type(exc).__name__, exc)
        assert w.report is not None
        w.report.corrected = False
        w.report.reason = f"correction failed: {type(exc).__name__}: {exc}"
        w.new_data = w.traj = None


def write_back(w: SliceWork) -> None:
    """Put the new data (and, in ``trajectory`` mode, the positions) of ``w`` into its acquisitions."""
    if w.new_data is None:
        return
    for i, (acq, data) in enumerate(w.new_data):
        if w.traj is not None:
            acq.resize(int(acq.number_of_samples), int(acq.active_channels), 2)
            acq.traj[:] = w.traj[i]
        acq.data[:] = data


def ramp_lines(
    buffer: SliceBuffer, n_ky: int, dx_px: float, dy_px: float
) -> list[tuple[ismrmrd.Acquisition, np.ndarray, np.ndarray, np.ndarray]]:
    """Each line with the exact inverse translation ramp applied, and its k positions in cycles/FOV.

    Returns ``(acq, new_data, kx, ky)``: ``kx`` per sample in cycles per FOV_x of the assembled grid
    (fractional steps ``n_x / n_ro`` for an oversampled readout), ``ky`` (scalar array) in cycles per FOV_y.
    """
    n_ro, n_x, lines = line_layout(buffer)
    out = []
    for ln in lines:
        kx = ln.kx() * (n_x / n_ro)  # per raw sample, reversed lines included
        ky = np.array(float(ln.row - n_ky // 2))
        phase = 2 * np.pi * (kx * dx_px / n_x + ky * dy_px / n_ky)
        data = np.array(ln.acq.data, dtype=np.complex64) * np.exp(1j * phase).astype(np.complex64)
        out.append((ln.acq, data, kx, ky))
    return out


def rotated_traj(kx: np.ndarray, ky: np.ndarray, phi_deg: float, fov_mm: tuple[float, float]) -> np.ndarray:
    """``(n_samples, 2)`` float32 positions ``R(phi)^-1 k`` in cycles/FOV (x, y), rotation physical in mm."""
    fov_y, fov_x = fov_mm
    c, s = math.cos(math.radians(phi_deg)), math.sin(math.radians(phi_deg))
    kx_mm, ky_mm = kx / fov_x, np.broadcast_to(ky, kx.shape) / fov_y
    rx = c * kx_mm + s * ky_mm
    ry = -s * kx_mm + c * ky_mm
    return np.stack([rx * fov_x, ry * fov_y], axis=-1).astype(np.float32)


def add_delta(buffer: SliceBuffer, delta: np.ndarray) -> list[tuple[ismrmrd.Acquisition, np.ndarray]]:
    """New data of every line: raw line + ``delta`` (assembled grid) placed back on its samples."""
    n_ro, _, lines = line_layout(buffer)
    d = upsample_readout(delta.astype(np.complex64), n_ro)
    out = []
    for ln in lines:
        data = np.array(ln.acq.data, dtype=np.complex64, copy=True)
        if 0 <= ln.row < d.shape[1] and ln.col >= 0 and ln.col + ln.n <= n_ro:
            data[:, ln.samples] += d[:, ln.row, ln.col : ln.col + ln.n]  # k-space order (ACQ_IS_REVERSE)
        out.append((ln.acq, data))
    return out


def _poses(w: SliceWork) -> tuple[np.ndarray, np.ndarray]:
    """``(n_shots, 3)`` the pose applied to each shot (zero where not corrected) and the shot of each row."""
    assert w.shot_rows is not None and w.shot_reports is not None
    n = int(w.shot_rows.max()) + 1
    poses = np.zeros((n, 3))
    for r in w.shot_reports:
        if r.corrected and 0 <= r.shot < n:
            poses[r.shot] = (r.dx_px, r.dy_px, r.rot_deg)
    return poses, w.shot_rows


def _agreement(w: SliceWork, x: torch.Tensor, device: torch.device) -> float:
    """Residual of the reference's own samples predicted from the image ``x`` ``(1, n_y, n_x)`` (reference
    pose) with one free complex scale (the calibration scan may have another contrast), relative to their
    energy: ``1 - |<p, y>|^2 / (||p||^2 ||y||^2)``, ``p = M F C x``."""
    assert w.reference is not None and isinstance(w.reference.maps, torch.Tensor)
    ref = w.reference.slice
    s = torch.from_numpy(ref.samples()).to(device)
    y = torch.from_numpy(ref.kspace).to(device) * s
    p = fft2c(w.reference.maps.to(device) * x[0][None]) * s
    num = float((p.conj() * y).sum().abs().square())
    den = float(p.abs().square().sum()) * float(y.abs().square().sum())
    return 1.0 - num / den if den > 0 else math.nan


def _leave_alone(w: SliceWork, why: str) -> None:
    """No shot of ``w`` corrected, for ``why`` (the estimates stay in the reports)."""
    assert w.shot_reports is not None and w.report is not None
    for r in w.shot_reports:
        if r.corrected:
            r.corrected = False
            r.reason = f"not corrected: {why}"
    w.report.corrected = False
    w.report.reason = f"{w.report.reason}; not corrected: {why}"
    w.new_data = w.traj = None
    log.info("slice %s: per-shot correction not applied: %s", tuple(w.buffer.key), why)


def correct_shots(w: SliceWork, params: GadgetParams, device: torch.device) -> None:
    """Correct one slice with a pose per shot (module docstring); sets ``w.new_data`` (and ``w.traj``).

    With a low-resolution reference (a separate calibration scan) the corrected slice must agree with that
    scan better than the uncorrected one (:func:`_agreement` of the SENSE image with every shot's pose
    against that of the image with none); otherwise no shot is corrected (do no harm: a wrong pose can fit a
    low-resolution reference better than zero, ``docs/intra_scan.md``).
    """
    assert w.assembled is not None and w.reference is not None and w.report is not None
    a = w.assembled
    poses, shot_rows = _poses(w)
    n_ky = a.kspace.shape[1]
    check = low_resolution_reference(w) and bool(np.abs(poses).sum() > 0)
    x = None
    if params.output == "cartesian" or check:
        maps = w.reference.maps
        if not isinstance(maps, torch.Tensor):
            raise ValueError(f"no coil maps for the per-shot correction: {maps}")
        samples = torch.from_numpy(a.samples()).to(device)
        sr = torch.from_numpy(shot_rows).to(device)
        masks = torch.stack([samples & (sr == sh)[:, None] for sh in range(poses.shape[0])])[None]
        y = torch.from_numpy(a.kspace).to(device)[None]
        motion = torch.from_numpy(poses)[None].to(device)
        m = maps.to(device)[None]
        y_v, m_v = compress_coils(y, m, SHOT_VIRTUAL_COILS)  # the image from fewer virtual coils: speed
        model = w.reference.model
        x_ref = getattr(model, "image", None)  # the reference image (object pose): a warm start
        start = None if x_ref is None else x_ref.to(device)[None]

        def image(mo: torch.Tensor) -> torch.Tensor:
            return sense_reconstruct_shots(
                y_v, m_v, masks, mo, a.pixel_spacing_mm, params.sense_iterations, SENSE_LAMBDA, x0=start
            )

        x = image(motion)
        if check:
            r_corr, r_none = _agreement(w, x, device), _agreement(w, image(torch.zeros_like(motion)), device)
            if not r_corr < r_none:
                _leave_alone(
                    w,
                    f"the corrected slice agrees less with the calibration scan than the uncorrected one "
                    f"(relative residual {r_corr:.4f} vs {r_none:.4f})",
                )
                return
            w.report.method += f"; agreement with the calibration scan {r_none:.4f} -> {r_corr:.4f}"
    if params.output == "trajectory":
        out, traj = [], []
        by_acq = {id(ln.acq): ln.row for ln in line_layout(w.buffer)[2]}
        for sh in range(poses.shape[0]):
            dx, dy, phi = poses[sh]
            for acq, data, kx, ky in ramp_lines(w.buffer, n_ky, dx, dy):
                row = by_acq.get(id(acq), -1)
                if 0 <= row < n_ky and shot_rows[row] == sh:
                    out.append((acq, data))
                    traj.append(rotated_traj(kx, ky, phi, a.fov_mm))
        w.new_data, w.traj = out, traj
        return
    assert x is not None
    y_corr = ShotSense(m, masks, motion, a.pixel_spacing_mm).forward_static(x)
    moved_rows = torch.from_numpy(np.isin(shot_rows, np.flatnonzero(np.abs(poses).sum(1) > 0))).to(device)
    keep = samples & moved_rows[:, None]  # the lines of shots left alone keep their data
    delta = ((y_corr - y) * keep[None, None])[0].cpu().numpy()
    if not np.isfinite(delta).all():
        raise ValueError("non-finite values in the per-shot SENSE correction")
    w.new_data = add_delta(w.buffer, delta)
