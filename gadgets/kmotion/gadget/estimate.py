"""Stage 4 of the streaming gadget: the motion of each slice relative to its reference, with its uncertainty.

For every slice group with a reference (``docs/gadget.md``, "Estimation" and "Do no harm"):

1. **Seeds.**  The shipped network reads its crop of the reference and the slice when the sampling fits it
   (:func:`crop_rows`: ``R`` = 1 or its trained ``R`` about the centre); its estimate is one starting point.
   A global search over the capture range (:func:`kmotion.estimation.shots.coarse_search`: a rotation grid
   over ``+-max_rotation_deg`` with every translation within ``+-max_translation_mm``) gives others, and
   zero motion is always one.
2. **Data-consistency fit.**  ``argmin_theta ||M F C exp(i psi) T(theta) x_ref - y||^2`` (``psi`` a smooth
   nuisance phase, :data:`N_PHASE`) on every acquired sample of
   the slice (:func:`kmotion.estimation.shots.fit_shots` with one shot), with ``x_ref`` the SENSE image of
   the reference and ``C`` its coil maps, on prewhitened data (:mod:`kmotion.gadget.noise`).  Partial
   Fourier, asymmetric echo and any acceleration enter only through the sample mask ``M``.
3. **Uncertainty and test.**  ``std = sqrt(diag(noise_var / 2 * inv(Re J^H J)))`` and the likelihood-ratio
   statistic ``chi2 = 2 (RSS(0) - RSS(theta)) / noise_var``.  ``noise_var`` is the variance along the fitted
   directions of the noise of the moved slice *plus* that of the reference image (which lies in the range of
   the encoding, so it adds fully there): ``2 sigma^2`` with ``sigma^2`` from noise lines; it is never taken
   below what the residual shows, ``s_r^2 * 2 / (1 + rho)`` with ``s_r^2 = RSS / (n - 1.5)`` the residual
   variance per sample (noise of both plus any lack of fit) and ``rho = min(1, n_y n_x / N_ref)`` the share
   of the residual the reference's noise takes (``N_ref`` its complex samples).  Without noise lines only the
   residual is used.  A noise line that does not describe the data, or a model that does not fit them,
   thus makes the uncertainty larger and the test more conservative, never the reverse.  The slice is
   corrected only when ``chi2`` exceeds the chi-square (3 dof) quantile ``1 - false_alarm_rate``, the
   estimate lies within the capture range and is not ambiguous, and it exceeds ``min_correction``.
4. Without coil maps (no calibration data) the network estimate alone is reported, tested with the
   translation-only model ``y = ramp(t) y_ref`` on the samples both hold (2 dof), and corrected by the ramp.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import chi2 as chi2_law

from kmotion.estimation.network import NetworkEstimator
from kmotion.estimation.shots import ShotProblems, coarse_search, fit_shots
from kmotion.gadget.assemble import AssembledSlice
from kmotion.gadget.calibration import CalibrationStore, coil_maps_for
from kmotion.gadget.noise import NoiseStore, apply_whitening
from kmotion.gadget.params import GadgetParams
from kmotion.gadget.reference import Reference, SliceWork
from kmotion.gadget.reference_model import ReferenceModel, build_reference_model
from kmotion.gadget.report import MotionReport, blank_report
from kmotion.physics.validate import InputError

__all__ = [
    "Decision",
    "ShotEstimate",
    "fit_slices",
    "crop_rows",
    "decide",
    "estimate_motion",
    "prepare_crops",
    "reference_model",
    "report_for",
]

log = logging.getLogger("kmotion.gadget")

_REFINE_ROWS = 128
"""Acquired rows about the centre given to the network's estimator when the data hold them."""

REFERENCE_LAMBDA = 1e-3
"""Tikhonov weight of the reference image (maps of unit RSS; a small relative regularisation)."""

REFERENCE_ITERATIONS = 30
"""CG iterations of the reference image."""

ANGLE_STEP_DEG = 1.5
"""Step of the global search's rotation grid."""

N_PHASE = 3
"""Nuisance phase terms of the fit (constant + linear, :func:`kmotion.estimation.shots.fit_shots`): a phase
drift between repetitions and the coil maps' phase convention transported with the object; without them a
12 deg, 8 mm motion of a 128^2 head phantom is off by 1.2 deg, with them by 0.09 deg (noise-free, maps from 24
calibration lines)."""

N_VIRTUAL = 8
"""Virtual coils of the fit (array compression of the whitened data, exact in form; fewer: faster)."""


def crop_rows(
    ref: AssembledSlice, mov: AssembledSlice, net_crop: tuple[int, int], r_net: int
) -> np.ndarray | str:
    """Grid rows of the network crop: ``s_y`` acquired rows ``n_ky//2 + parity + R_net * j``."""
    if ref.acceleration not in (1, r_net):
        return f"acceleration {ref.acceleration} (the network was trained at {r_net})"
    parity = ref.parity if ref.acceleration == r_net else 0
    n_ky = ref.kspace.shape[1]
    for s_y in range(max(net_crop[0], _REFINE_ROWS), net_crop[0] - 1, -8):
        j = np.arange(-(s_y // 2), s_y - s_y // 2)
        rows = n_ky // 2 + parity + r_net * j
        if rows[0] >= 0 and rows[-1] < n_ky and ref.mask[rows].all() and mov.mask[rows].all():
            return rows
    return (
        f"the network needs {net_crop[0]} acquired rows (every {r_net}nd) about the centre; {n_ky} rows, "
        f"acquired {int(mov.mask.sum())}"
    )


def prepare_crops(w: SliceWork, net_crop: tuple[int, int], r_net: int) -> None:
    """The network's input of a slice with a reference: ``w.crops`` (reference, moved), or
    ``w.network_note`` with the reason why the network cannot read it (the fit still runs)."""
    assert w.assembled is not None and w.reference is not None
    r = w.reference.slice
    rows = crop_rows(r, w.assembled, net_crop, r_net)
    if isinstance(rows, str):
        w.network_note = f"no network seed: {rows}"
        return
    w.crops = (torch.from_numpy(r.kspace[:, rows]), torch.from_numpy(w.assembled.kspace[:, rows]))


def _network_seeds(work: list[SliceWork], estimator: NetworkEstimator, r_net: int) -> None:
    """``w.seed`` from the network for every slice with crops (one call per grid shape)."""
    groups: dict[tuple[object, ...], list[SliceWork]] = {}
    for w in work:
        if w.crops is not None and w.assembled is not None:
            groups.setdefault((tuple(w.crops[0].shape), w.assembled.fov_mm), []).append(w)
    for ws in groups.values():
        ref = torch.stack([w.crops[0] for w in ws if w.crops is not None])
        mov = torch.stack([w.crops[1] for w in ws if w.crops is not None])
        a0 = ws[0].assembled
        assert a0 is not None
        try:
            n_ky, n_kx = a0.kspace.shape[1:]
            est = estimator.estimate_data(ref, mov, (int(n_ky), int(n_kx)), a0.fov_mm, r_net)
        except (InputError, RuntimeError, ValueError) as exc:
            for w in ws:
                w.network_note = f"no network seed: {exc}"
            continue
        for i, w in enumerate(ws):
            m = est.motion[i].double()
            if bool(torch.isfinite(m).all()):
                w.seed = m


def reference_model(
    ref: Reference, calibration: CalibrationStore, noise: NoiseStore, dwell_us: float, device: torch.device
) -> ReferenceModel | str:
    """The prewhitened SENSE model of a reference (:mod:`kmotion.gadget.reference_model`), computed on first
    use (with its coil maps), or the reason why there is none."""
    if ref.model is None:
        if ref.maps is None:
            ref.maps = coil_maps_for(ref.slice, calibration, device)
        ref.model = build_reference_model(ref.slice, ref.maps, noise, dwell_us, device)
    assert isinstance(ref.model, ReferenceModel | str)
    return ref.model


def inscribed_disc(shape: tuple[int, ...]) -> np.ndarray:
    """``(n_ky, n_kx)`` bool: the samples within the ellipse inscribed in the k-space grid.

    Rotated by any angle, a sample inside it comes from inside the grid (in cycles/mm the ellipse of a grid
    with square pixels is the inscribed circle); the corners outside it hold, after a rotation, frequencies
    the reference was never sampled at (the model cannot predict them), so the fit leaves them out.
    """
    n_ky, n_kx = int(shape[-2]), int(shape[-1])
    ky = (np.arange(n_ky) - n_ky // 2) / (n_ky / 2)
    kx = (np.arange(n_kx) - n_kx // 2) / (n_kx / 2)
    return ky[:, None] ** 2 + kx[None, :] ** 2 <= 1.0


@dataclass
class Decision:
    """Whether a slice is corrected, the flag, the reason and the p-value of its test."""

    corrected: bool
    flagged: bool
    reason: str
    p_value: float


def decide(
    motion: tuple[float, float, float],
    chi2: float,
    dof: int,
    params: GadgetParams,
    pixel_spacing_mm: tuple[float, float],
    ambiguous: bool = False,
) -> Decision:
    """The do-no-harm rule of ``docs/gadget.md`` for one estimate ``(dx_px, dy_px, phi_deg)``."""
    dx, dy, phi = motion
    p = float(chi2_law.sf(chi2, dof)) if not math.isnan(chi2) else math.nan
    if not all(math.isfinite(v) for v in motion) or math.isnan(chi2):
        return Decision(False, True, "estimate not finite", p)
    threshold = float(chi2_law.isf(params.false_alarm_rate, dof))
    dx_mm, dy_mm = abs(dx) * pixel_spacing_mm[1], abs(dy) * pixel_spacing_mm[0]
    if max(dx_mm, dy_mm) > params.max_translation_mm or abs(phi) > params.max_rotation_deg:
        return Decision(
            False,
            True,
            f"beyond the capture range (+-{params.max_translation_mm:g} mm, "
            f"+-{params.max_rotation_deg:g} deg): not corrected",
            p,
        )
    if chi2 <= threshold:
        return Decision(
            False, False, f"no significant motion (chi2 {chi2:.1f} <= {threshold:.1f}, p {p:.2g})", p
        )
    if ambiguous:
        return Decision(False, True, "ambiguous: another pose explains the data as well; not corrected", p)
    mc = params.min_correction
    if abs(dx) < mc and abs(dy) < mc and abs(phi) < mc:
        return Decision(False, False, "below min_correction", p)
    return Decision(True, False, "", p)


def report_for(
    w: SliceWork,
    motion: tuple[float, float, float],
    std: tuple[float, float, float],
    chi2: float,
    dof: int,
    params: GadgetParams,
    method: str,
    ambiguous: bool = False,
) -> MotionReport:
    """The :class:`MotionReport` of an estimate ``(dx_px, dy_px, phi_deg)`` of ``w`` with its standard errors,
    test statistic (``dof`` degrees of freedom) and the decision of :func:`decide`."""
    assert w.assembled is not None and w.reference is not None
    a = w.assembled
    dx, dy, phi = motion
    dx_mm, dy_mm = dx * a.pixel_spacing_mm[1], dy * a.pixel_spacing_mm[0]
    patient = tuple(dx_mm * r + dy_mm * q for r, q in zip(a.read_dir, a.phase_dir, strict=True))
    d = decide(motion, chi2, dof, params, a.pixel_spacing_mm, ambiguous)
    reason = d.reason
    if a.notes:
        reason = f"{reason}; {a.notes}" if reason else a.notes
    return MotionReport(
        w.buffer.key,
        w.reference.slice.key.repetition,
        dx,
        dy,
        phi,
        dx_mm,
        dy_mm,
        patient,  # type: ignore[arg-type]
        d.flagged,
        d.corrected,
        reason,
        std[0],
        std[1],
        std[2],
        chi2,
        d.p_value,
        method,
    )


def _dwell(w: SliceWork) -> float:
    return float(w.buffer.acquisitions[0].sample_time_us)


def _noise_var(w: SliceWork, noise: NoiseStore, n_coils: int) -> tuple[np.ndarray | None, float, str]:
    """Whitening matrix (or None), the noise variance per sample of the (whitened) data, and its source."""
    white = noise.whitening(n_coils, _dwell(w))
    if white is not None:
        return white, 1.0, f"noise lines ({noise.n_lines})"
    return None, math.nan, "from the residual (no noise lines)"


def estimate_motion(
    work: list[SliceWork],
    estimator: NetworkEstimator,
    r_net: int,
    params: GadgetParams,
    calibration: CalibrationStore,
    noise: NoiseStore,
    device: torch.device,
) -> None:
    """Estimate every slice of ``work`` that has a reference and no report yet; fill ``w.report``."""
    todo = [w for w in work if w.report is None and w.reference is not None and w.assembled is not None]
    _network_seeds(todo, estimator, r_net)
    groups: dict[tuple[object, ...], list[SliceWork]] = {}
    for w in todo:
        assert w.reference is not None and w.assembled is not None
        model = reference_model(w.reference, calibration, noise, _dwell(w), device)
        if isinstance(model, str):
            _translation_only(w, model, params, noise)
            continue
        a = w.assembled
        groups.setdefault((a.kspace.shape, a.pixel_spacing_mm), []).append(w)
    for ws in groups.values():
        try:
            _fit_group(ws, params, device)
        except (InputError, RuntimeError, ValueError) as exc:
            for w in ws:
                assert w.reference is not None
                ref_rep = w.reference.slice.key.repetition
                w.report = blank_report(w.buffer.key, ref_rep, f"not estimated: {exc}")


@dataclass
class ShotEstimate:
    """The fit of one shot (or of a whole slice, ``shot`` -1): pose, standard errors, statistic, flags."""

    shot: int
    motion: tuple[float, float, float]
    std: tuple[float, float, float]
    chi2: float
    ambiguous: bool
    method: str


def fit_slices(
    ws: list[SliceWork],
    params: GadgetParams,
    device: torch.device,
    shot_rows: list[np.ndarray] | None = None,
) -> list[list[ShotEstimate]]:
    """The data-consistency fit of slices on one grid (module docstring, steps 1-3), per slice or per shot.

    ``shot_rows`` (optional, per slice): ``(n_ky,)`` the shot of each row (-1: none); every shot gets its own
    pose (``docs/intra_scan.md``), else the slice has one.  Returns, per slice, one :class:`ShotEstimate` per
    shot with data (``shot`` -1 for a whole slice).
    """
    a0 = ws[0].assembled
    assert a0 is not None
    spacing = a0.pixel_spacing_mm
    n_c, n_ky, n_kx = a0.kspace.shape
    models: list[ReferenceModel] = []
    ys, masks, weights, rhos = [], [], [], []
    n_shots = 1 if shot_rows is None else max(1, max(int(r.max()) + 1 for r in shot_rows))
    for i, w in enumerate(ws):
        assert w.assembled is not None and w.reference is not None
        model = w.reference.model
        assert isinstance(model, ReferenceModel)
        models.append(model)
        ys.append(apply_whitening(model.white, torch.from_numpy(w.assembled.kspace).to(device), 0))
        fitted = w.assembled.samples() & inscribed_disc((n_ky, n_kx))
        m = np.zeros((n_shots, n_ky, n_kx), dtype=bool)
        if shot_rows is None:
            m[0] = fitted
        else:
            for sh in range(n_shots):
                m[sh] = fitted & (shot_rows[i] == sh)[:, None]
        masks.append(torch.from_numpy(m).to(device))
        weights.append(model.weights.to(device))
        n_ref = int(w.reference.slice.samples().sum()) * n_c
        rhos.append(min(1.0, n_ky * n_kx / max(n_ref, 1)))
    kspace = torch.stack(ys)
    problems = ShotProblems.from_masks(kspace, torch.stack(masks), torch.stack(weights))
    problems, vmaps = problems.compressed(kspace, torch.stack([m.maps for m in models]), N_VIRTUAL)
    reference = torch.stack([m.image for m in models])
    noise_reference = torch.stack([m.noise_image for m in models])
    sigma2 = torch.tensor([m.sigma2 for m in models], dtype=torch.float64, device=device)
    lim_t = (params.max_translation_mm / spacing[1], params.max_translation_mm / spacing[0])
    angles = torch.arange(
        -params.max_rotation_deg, params.max_rotation_deg + 1e-9, ANGLE_STEP_DEG, dtype=torch.float64
    )
    per_shot = shot_rows is not None
    cands = coarse_search(
        reference,
        vmaps,
        problems,
        angles,
        spacing,
        n_candidates=1 if per_shot else 2,
        n_translations=4 if per_shot else 1,
        max_translation_px=lim_t,
    )
    p = problems.rows.shape[0]
    extra = torch.zeros(p, 2, 3, dtype=torch.float64, device=device)  # zero motion, network seed
    for q in range(p):
        seed = ws[int(problems.slice_index[q])].seed
        if seed is not None:
            extra[q, 1] = seed.to(device)
    cands = torch.cat([extra, cands.to(device)], 1)
    fit = fit_shots(
        reference,
        vmaps,
        problems,
        cands,
        spacing,
        None,
        keep=3 if per_shot else 2,
        use_neighbours=per_shot,
        n_phase=N_PHASE,
        noise_reference=noise_reference,
    )
    rho = torch.tensor(rhos, dtype=torch.float64, device=device)[problems.slice_index]
    from_residual = fit.residual_variance() * 2 / (1 + rho)
    noise_var = torch.maximum(2 * sigma2[problems.slice_index], from_residual)
    fit = fit.with_noise_var(noise_var)
    out: list[list[ShotEstimate]] = [[] for _ in ws]
    for q in range(p):
        i = int(problems.slice_index[q])
        w = ws[i]
        how = "network seed + global search" if w.seed is not None else f"global search ({w.network_note})"
        method = f"data-consistency fit ({how}); noise: {models[i].source}"
        method += f"; residual / noise variance {float(fit.residual_variance()[q] / models[i].sigma2):.2f}"
        out[i].append(
            ShotEstimate(
                int(problems.shot_index[q]) if per_shot else -1,
                tuple(float(v) for v in fit.motion[q]),  # type: ignore[arg-type]
                tuple(float(v) for v in fit.std[q]),  # type: ignore[arg-type]
                float(fit.statistic[q]),
                bool(fit.ambiguous[q]),
                method,
            )
        )
    return out


def _fit_group(ws: list[SliceWork], params: GadgetParams, device: torch.device) -> None:
    """One pose per slice (the repetition model): fill ``w.report``."""
    for w, (est,) in zip(ws, fit_slices(ws, params, device), strict=True):
        w.report = report_for(w, est.motion, est.std, est.chi2, 3, params, est.method, est.ambiguous)


def _translation_only(w: SliceWork, why: str, params: GadgetParams, noise: NoiseStore) -> None:
    """No coil maps: the network's estimate, tested with the translation-only ramp model (2 dof)."""
    assert w.assembled is not None and w.reference is not None
    a, r = w.assembled, w.reference.slice
    if w.seed is None:
        w.report = blank_report(w.buffer.key, r.key.repetition, f"not estimated: {why}; {w.network_note}")
        return
    dx, dy, phi = (float(v) for v in w.seed.tolist())
    white, nv, source = _noise_var(w, noise, a.kspace.shape[0])
    y = apply_whitening(white, torch.from_numpy(a.kspace), 0)
    yr = apply_whitening(white, torch.from_numpy(r.kspace), 0)
    common = torch.from_numpy(a.samples() & r.samples())
    n_ky, n_kx = a.kspace.shape[1:]
    ky = (torch.arange(n_ky) - n_ky // 2).double()[:, None] / n_ky
    kx = (torch.arange(n_kx) - n_kx // 2).double()[None, :] / n_kx
    ramp = torch.polar(torch.ones(n_ky, n_kx, dtype=torch.float64), -2 * math.pi * (kx * dx + ky * dy))
    rss0 = float(((y - yr).abs().square() * common).sum())
    rss1 = float(((y - ramp.to(torch.complex64) * yr).abs().square() * common).sum())
    n_common = max(1, int(common.sum()) * a.kspace.shape[0])
    var = max(2 * nv if math.isfinite(nv) else 0.0, rss1 / n_common)  # both data sets' noise in the residual
    chi2 = 2 * (rss0 - rss1) / var if var > 0 else math.nan
    nan3 = (math.nan, math.nan, math.nan)
    method = f"network only, translation test; noise: {source}"
    rep = report_for(w, (dx, dy, phi), nan3, chi2, 2, params, method)
    if rep.corrected:
        rep.reason = f"translation only: {why}" + (f"; {rep.reason}" if rep.reason else "")
    w.report = rep
