"""Validation metrics (names used everywhere: docs, TensorBoard, reports).

* ``abs_err``: mean |error| of each of the 6 outputs in physical units (px for dx, dy, dz; degrees for the
  rotations), over the validation pairs;
* ``mae_dx_px``, ``mae_dy_px``, ``mae_phi_deg``: the in-plane entries of it; ``mean_inplane_mae`` their mean;
* ``euclidean_loss``: mean over pairs of the Euclidean norm of (prediction - target) in target units.

Convergence (documented in docs/training.md): a run has *converged* when its minimum ``mean_inplane_mae``
over the epochs is <= 6 (the abstract's threshold); *epochs to convergence* is the first epoch (1-based)
whose ``mean_inplane_mae`` < 2.
"""

from __future__ import annotations

import math

import torch

NOT_CONVERGED_ABOVE = 6.0
CONVERGED_BELOW = 2.0
PARAM_NAMES = ("dx", "dy", "dz", "phi_x", "phi_y", "phi_z")


def euclidean_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance of the 6-vectors (the abstract's ED loss)."""
    return (pred - target).pow(2).sum(-1).add(1e-12).sqrt().mean()


def mae_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all entries (the abstract's MAE loss)."""
    return (pred - target).abs().mean()


LOSSES = {"euclidean": euclidean_loss, "mae": mae_loss}


def summarise(pred: torch.Tensor, target: torch.Tensor, target_scale: torch.Tensor) -> dict[str, float]:
    """Metrics of normalised predictions ``pred`` vs ``target`` ``(N, 6)``; ``target_scale`` ``(6,)``."""
    err = (pred.float() - target.float()).abs() * target_scale.to(pred.device)
    abs_err = err.mean(0).tolist()
    out = {f"abs_err_{n}": v for n, v in zip(PARAM_NAMES, abs_err, strict=True)}
    out["mae_dx_px"] = abs_err[0]
    out["mae_dy_px"] = abs_err[1]
    out["mae_phi_deg"] = abs_err[5]
    out["mean_inplane_mae"] = (abs_err[0] + abs_err[1] + abs_err[5]) / 3
    out["euclidean_loss"] = float(euclidean_loss(pred.float(), target.float()))
    return out


def convergence(history: list[dict[str, float]]) -> dict[str, float | int | bool | None]:
    """``converged``, ``epochs_to_convergence`` and the minimum MAEs over a run's epochs."""
    maes = [h["mean_inplane_mae"] for h in history]
    if not maes:
        return {"converged": False, "epochs_to_convergence": None, "min_mean_inplane_mae": math.nan}
    first = next((i + 1 for i, m in enumerate(maes) if m < CONVERGED_BELOW), None)
    return {
        "converged": min(maes) <= NOT_CONVERGED_ABOVE,
        "epochs_to_convergence": first,
        "min_mean_inplane_mae": min(maes),
        "min_mae_dx_px": min(h["mae_dx_px"] for h in history),
        "min_mae_dy_px": min(h["mae_dy_px"] for h in history),
        "min_mae_phi_deg": min(h["mae_phi_deg"] for h in history),
    }
