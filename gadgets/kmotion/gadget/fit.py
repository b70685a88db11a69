"""The data-consistency fit of the estimation stage, one pose per slice or per echo train (shot).

:func:`fit_slices` fits slices on one grid against their references' models
(:mod:`kmotion.gadget.reference_model`) with :func:`kmotion.estimation.shots.fit_shots`: seeds from the
network (when it read the slice), a global rotation-grid/translation search over the capture range
(:func:`kmotion.estimation.shots.coarse_search`) and zero; the fit on the acquired samples inside the
inscribed k-space disc, Wiener-weighted, with a nuisance phase; the noise variance never below the
residual's share.  See ``docs/gadget.md`` ("Estimation").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from kmotion.estimation.joint import refine_with_reference_data
from kmotion.estimation.shots import ShotFit, ShotProblems, coarse_search, fit_shots
from kmotion.gadget.noise import apply_whitening
from kmotion.gadget.params import GadgetParams
from kmotion.gadget.reference import SliceWork, low_resolution_reference
from kmotion.gadget.reference_model import ReferenceModel

__all__ = [
    "ANGLE_STEP_DEG",
    "N_PHASE",
    "N_PHASE_SHOTS",
    "N_PHASE_SHOTS_BROAD",
    "N_VIRTUAL",
    "ShotEstimate",
    "broad_shot",
    "fit_slices",
    "inscribed_disc",
]

ANGLE_STEP_DEG = 1.5
"""Step of the global search's rotation grid."""

N_PHASE = 3
"""Nuisance phase terms of the fit (constant + linear, :func:`kmotion.estimation.shots.fit_shots`): a phase
drift between repetitions and the coil maps' phase convention transported with the object; without them a
12 deg, 8 mm motion of a 128^2 head phantom is off by 1.2 deg, with them by 0.09 deg (noise-free, maps from 24
calibration lines)."""

N_VIRTUAL = 8
"""Virtual coils of the fit (array compression of the whitened data, exact in form; fewer: faster)."""

N_PHASE_SHOTS = 0
"""Nuisance phase terms of the per-shot fit of narrow-band shots: none (a shot's few rows near one ``|ky|``
cannot tell a phase from a translation along y; with 3 terms the dy of linear and centric shots got worse:
corrected-shot MAE 0.054 -> 0.193 mm, linear NRMSE ratio max 1.12 -> 1.22, ``bench_intra_scan``)."""

N_PHASE_SHOTS_BROAD = 3
"""Nuisance phase terms of the per-shot fit when every shot of the call is broad (:func:`broad_shot`:
interleaved, checkered) and the reference is a repetition: constant + linear, as for repetitions — the coil
maps' phase convention moves with the object, and the shot holding the k-space centre sees it most (its error
1.31 -> 0.60 deg; MAE of interleaved/checkered shots 0.031 / 0.029 mm, 0.051 deg -> 0.018 / 0.013 mm,
0.032 deg, ``bench_intra_scan``).  Not against a calibration scan: there the checkered shots' dy went from
0.1 to 1-3.7 mm off (their few rows inside the scan's extent cannot tell a linear phase from a shift)."""


def broad_shot(rows: np.ndarray, n_ky: int) -> bool:
    """Whether a shot's grid rows ``rows`` (indices, centre row ``n_ky // 2``) lie on both sides of the centre
    and span at least a quarter of the grid in ``|ky|`` (interleaved and checkered trains; not the bands of
    linear or centric orderings)."""
    ky = np.asarray(rows) - n_ky // 2
    if ky.size == 0:
        return False
    a = np.abs(ky)
    return bool(ky.min() < 0 < ky.max() and a.max() - a.min() >= n_ky / 4)


N_VIRTUAL_SHOTS = 4
"""Virtual coils of the per-shot fit (many small problems: speed; whitened data keep their noise white)."""


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


JOINT_COIL_RATIO = 4.0
"""Slices whose coils per acceleration fall below this get the joint refinement with the reference data."""


def _merge(fit: ShotFit, refined: dict[int, ShotFit]) -> ShotFit:
    """``fit`` with the poses of ``refined`` (problem index -> a one-problem fit).

    Only the pose (and the larger standard errors) come from the refinement: its image was reconstructed
    from the moved data too, so its residuals cannot test "no motion"; the statistic, the residual and the
    noise variance stay those of the fit against the reference's own image (whose pull towards zero makes
    that test conservative).
    """
    out = copy.copy(fit)
    out.motion, out.std = fit.motion.clone(), fit.std.clone()
    out.phase = None if fit.phase is None else fit.phase.clone()
    for q, f in refined.items():
        out.motion[q] = f.motion[0]
        out.std[q] = torch.maximum(fit.std[q], f.std[0])
        if out.phase is not None and f.phase is not None:
            out.phase[q] = f.phase[0]
    return out


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
    n_virtual = N_VIRTUAL if shot_rows is None else N_VIRTUAL_SHOTS
    problems, vmaps = problems.compressed(kspace, torch.stack([m.maps for m in models]), n_virtual)
    reference = torch.stack([m.image for m in models])
    noise_reference = torch.stack([m.noise_image for m in models])
    sigma2 = torch.tensor([m.sigma2 for m in models], dtype=torch.float64, device=device)
    lim_t = (params.max_translation_mm / spacing[1], params.max_translation_mm / spacing[0])
    angles = torch.arange(
        -params.max_rotation_deg, params.max_rotation_deg + 1e-9, ANGLE_STEP_DEG, dtype=torch.float64
    )
    per_shot = shot_rows is not None
    n_phase = N_PHASE
    if shot_rows is not None:
        trains = [np.flatnonzero(r == sh) for r in shot_rows for sh in np.unique(r[r >= 0]).tolist()]
        broad = all(broad_shot(rows, n_ky) for rows in trains)
        full = not any(low_resolution_reference(w) for w in ws)  # a calibration scan: few rows, no phase
        n_phase = N_PHASE_SHOTS_BROAD if broad and full else N_PHASE_SHOTS
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
        keep=2,
        tolerance=2e-3,
        use_neighbours=per_shot,
        n_phase=n_phase,
        noise_reference=noise_reference,
    )
    refined: dict[int, ShotFit] = {}
    if not per_shot:  # weakly determined references: the image of both data sets (estimation/joint.py)
        for i, w in enumerate(ws):
            assert w.assembled is not None and w.reference is not None
            if n_c / max(1, w.reference.slice.acceleration) >= JOINT_COIL_RATIO:
                continue
            mine = torch.nonzero(problems.slice_index == i).flatten()
            if mine.numel() != 1:
                continue
            sub = problems.subset(mine)
            sub.slice_index = torch.zeros_like(sub.slice_index)
            vm = vmaps[i : i + 1]
            noise_ref = noise_reference[i : i + 1]

            def fit_one(
                img: torch.Tensor,
                starts: torch.Tensor,
                sub: ShotProblems = sub,
                vm: torch.Tensor = vm,
                noise_ref: torch.Tensor = noise_ref,
            ) -> ShotFit:
                return fit_shots(
                    img,
                    vm,
                    sub,
                    starts,
                    spacing,
                    None,
                    keep=1,
                    use_neighbours=False,
                    n_phase=N_PHASE,
                    noise_reference=noise_ref,
                )

            model = models[i]
            y_ref = apply_whitening(model.white, torch.from_numpy(w.reference.slice.kspace).to(device), 0)
            refined[int(mine)], _ = refine_with_reference_data(
                y_ref,
                torch.from_numpy(w.reference.slice.samples()).to(device),
                ys[i],
                masks[i][problems.shot_index[mine]],
                model.maps,
                model.image,
                fit.motion[int(mine)],
                spacing,
                fit_one,
            )
    if refined:
        fit = _merge(fit, refined)
    rho = torch.tensor(rhos, dtype=torch.float64, device=device)[problems.slice_index]
    from_residual = fit.residual_variance() * 2 / (1 + rho)
    noise_var = torch.maximum(2 * sigma2[problems.slice_index], from_residual)
    fit = fit.with_noise_var(noise_var)
    out: list[list[ShotEstimate]] = [[] for _ in ws]
    for q in range(p):
        i = int(problems.slice_index[q])
        w = ws[i]
        note = f" ({w.network_note})" if w.network_note else ""
        how = "network seed + global search" if w.seed is not None else f"global search{note}"
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
