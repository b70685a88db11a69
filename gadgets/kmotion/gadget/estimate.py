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

import numpy as np
import torch

from kmotion.estimation.network import NetworkEstimator
from kmotion.gadget.assemble import AssembledSlice
from kmotion.gadget.calibration import CalibrationStore, coil_maps_for
from kmotion.gadget.decide import Decision, decide, report_for
from kmotion.gadget.fit import fit_slices
from kmotion.gadget.noise import NoiseStore, apply_whitening
from kmotion.gadget.params import GadgetParams
from kmotion.gadget.reference import Reference, SliceWork
from kmotion.gadget.reference_model import ReferenceModel, build_reference_model
from kmotion.gadget.report import blank_report
from kmotion.gadget.shots import EarlyShots, estimate_shots
from kmotion.physics.fft import ifft2c
from kmotion.physics.validate import InputError

__all__ = [
    "Decision",
    "crop_rows",
    "decide",
    "estimate_motion",
    "fit_slices",
    "prepare_crops",
    "reference_model",
    "report_for",
]

log = logging.getLogger("kmotion.gadget")

_REFINE_ROWS = 128
"""Acquired rows about the centre given to the network's estimator when the data hold them."""


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
    early: EarlyShots | None = None,
) -> None:
    """Estimate every slice of ``work`` that has a reference and no report yet; fill ``w.report``.

    ``early``: echo trains already estimated as they ended (the shot model, :class:`EarlyShots`)."""
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
            shots = [w for w in ws if w.shot_rows is not None]
            if shots:
                estimate_shots(shots, params, device, early)
            whole = [w for w in ws if w.shot_rows is None]
            if whole:
                _fit_group(whole, params, device)
        except (InputError, RuntimeError, ValueError) as exc:
            for w in ws:
                assert w.reference is not None
                ref_rep = w.reference.slice.key.repetition
                w.report = blank_report(w.buffer.key, ref_rep, f"not estimated: {exc}")


def _fit_group(ws: list[SliceWork], params: GadgetParams, device: torch.device) -> None:
    """One pose per slice (the repetition model): fill ``w.report``."""
    for w, (est,) in zip(ws, fit_slices(ws, params, device), strict=True):
        w.report = report_for(w, est.motion, est.std, est.chi2, 3, params, est.method, est.ambiguous)


def _translation_only(w: SliceWork, why: str, params: GadgetParams, noise: NoiseStore) -> None:
    """No coil maps: the translation by phase correlation of the slice with the reference on the samples both
    hold (any shift within the capture range), tested with the translation-only ramp model ``y = ramp(t)
    y_ref`` (2 dof); the rotation is not estimated (NaN in the report)."""
    assert w.assembled is not None and w.reference is not None
    a, r = w.assembled, w.reference.slice
    white, nv, source = _noise_var(w, noise, a.kspace.shape[0])
    y = apply_whitening(white, torch.from_numpy(a.kspace), 0)
    yr = apply_whitening(white, torch.from_numpy(r.kspace), 0)
    common = torch.from_numpy(a.samples() & r.samples())
    n_ky, n_kx = a.kspace.shape[1:]
    dx, dy, at_edge = _phase_correlation(y, yr, common, params, a.pixel_spacing_mm)
    ky = (torch.arange(n_ky) - n_ky // 2).double()[:, None] / n_ky
    kx = (torch.arange(n_kx) - n_kx // 2).double()[None, :] / n_kx
    ramp = torch.polar(torch.ones(n_ky, n_kx, dtype=torch.float64), -2 * math.pi * (kx * dx + ky * dy))
    rss0 = float(((y - yr).abs().square() * common).sum())
    rss1 = float(((y - ramp.to(torch.complex64) * yr).abs().square() * common).sum())
    n_common = max(1, int(common.sum()) * a.kspace.shape[0])
    var = max(2 * nv if math.isfinite(nv) else 0.0, rss1 / n_common)  # both data sets' noise in the residual
    chi2 = 2 * (rss0 - rss1) / var if var > 0 else math.nan
    nan3 = (math.nan, math.nan, math.nan)
    fit_ratio = rss1 / n_common / (2 * nv) if math.isfinite(nv) and nv > 0 else math.nan
    method = f"phase correlation, translation test (no rotation without coil maps); noise: {source}"
    method += f"; residual / noise variance {fit_ratio:.2f}"
    rep = report_for(w, (dx, dy, 0.0), nan3, chi2, 2, params, method)
    rep.rot_deg = math.nan
    if at_edge and rep.reason != "below min_correction" and not rep.reason.startswith("no significant"):
        rep.corrected, rep.flagged = False, True
        rep.reason = (
            f"beyond the capture range (+-{params.max_translation_mm:g} mm): the translation's correlation "
            "peak lies at its edge; not corrected"
        )
    if rep.corrected:
        rep.reason = f"translation only: {why}" + (f"; {rep.reason}" if rep.reason else "")
    w.report = rep


def _phase_correlation(
    y: torch.Tensor,
    yr: torch.Tensor,
    common: torch.Tensor,
    params: GadgetParams,
    spacing: tuple[float, float],
) -> tuple[float, float, bool]:
    """``(dx_px, dy_px, at_edge)`` maximising ``Re sum_c y conj(ramp(t) y_ref)`` on ``common`` samples: one
    inverse FFT of the coil-summed cross-spectrum, the peak within the capture range (which also resolves the
    aliases of undersampled rows, ``n_y / R`` apart), refined by a parabola.  ``at_edge``: the peak lies on
    the border of the capture range, so the true one is probably beyond it (a shift of 34 mm came out at the
    25 mm border and was corrected there)."""
    cross = (y * yr.conj() * common).sum(0)
    n_ky, n_kx = cross.shape
    corr = ifft2c(cross).real.double()
    yy = (torch.arange(n_ky) - n_ky // 2).double()[:, None]
    xx = (torch.arange(n_kx) - n_kx // 2).double()[None, :]
    inside = (yy.abs() * spacing[0] <= params.max_translation_mm) & (
        xx.abs() * spacing[1] <= params.max_translation_mm
    )
    corr = corr.masked_fill(~inside, -math.inf)
    iy, ix = divmod(int(corr.argmax()), n_kx)
    lim_y = int(params.max_translation_mm // spacing[0])
    lim_x = int(params.max_translation_mm // spacing[1])
    at_edge = abs(iy - n_ky // 2) >= min(lim_y, n_ky // 2 - 1) or abs(ix - n_kx // 2) >= min(
        lim_x, n_kx // 2 - 1
    )

    def vertex(lo: float, mid: float, hi: float) -> float:
        den = lo - 2 * mid + hi
        return 0.5 * (lo - hi) / den if math.isfinite(lo) and math.isfinite(hi) and den < 0 else 0.0

    c = corr
    oy = vertex(float(c[(iy - 1) % n_ky, ix]), float(c[iy, ix]), float(c[(iy + 1) % n_ky, ix]))
    ox = vertex(float(c[iy, (ix - 1) % n_kx]), float(c[iy, ix]), float(c[iy, (ix + 1) % n_kx]))
    return ix - n_kx // 2 + max(-0.5, min(0.5, ox)), iy - n_ky // 2 + max(-0.5, min(0.5, oy)), at_edge
