"""Accuracy and speed of motion estimators on simulated pairs (shared by the benchmarks).

An estimator is any callable ``estimate_fn(reference, moved) -> (B, 3)`` taking the complex crops of a
:class:`~kmotion.simulation.study.PairBatch` and returning ``dx`` [px], ``dy`` [px], ``phi`` [deg].
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kmotion.physics.validate import InputError
from kmotion.simulation.study import PairBatch

EstimateFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

GROSS_THRESHOLD = 3.0
"""A pair is a gross failure when any parameter is off by more than this (px or degrees)."""


def motion_errors(
    estimate: torch.Tensor, truth: torch.Tensor, gross_threshold: float = GROSS_THRESHOLD
) -> dict[str, float]:
    """Error statistics of ``(B, 3)`` estimates against the truth (``dx`` px, ``dy`` px, ``phi`` deg).

    Returns ``mae_dx_px``, ``mae_dy_px``, ``mae_phi_deg``, ``mean_inplane_mae`` (mean of the three, px and
    degrees mixed as in the abstract), ``median_dx_px``, ``median_dy_px``, ``median_phi_deg``,
    ``gross_failure_rate`` (fraction of pairs with any error above ``gross_threshold``) and ``n_pairs``.
    """
    if estimate.ndim != 2 or estimate.shape[-1] != 3 or estimate.shape != truth.shape:
        raise InputError(
            f"estimate and truth must both be (B, 3), got {tuple(estimate.shape)} and {tuple(truth.shape)}"
        )
    if estimate.shape[0] == 0:
        raise InputError("motion_errors: no pairs")
    err = (estimate.detach().to("cpu", torch.float64) - truth.detach().to("cpu", torch.float64)).abs()
    if not bool(torch.isfinite(err).all()):
        raise InputError("motion_errors: the estimates contain non-finite values")
    mae = err.mean(0)
    med = err.median(0).values
    return {
        "mae_dx_px": float(mae[0]),
        "mae_dy_px": float(mae[1]),
        "mae_phi_deg": float(mae[2]),
        "mean_inplane_mae": float(mae.mean()),
        "median_dx_px": float(med[0]),
        "median_dy_px": float(med[1]),
        "median_phi_deg": float(med[2]),
        "gross_failure_rate": float((err > gross_threshold).any(1).double().mean()),
        "n_pairs": float(err.shape[0]),
    }


def evaluate(
    estimate_fn: EstimateFn,
    batch: PairBatch,
    gross_threshold: float = GROSS_THRESHOLD,
    chunk: int | None = None,
) -> dict[str, float]:
    """Run ``estimate_fn`` on ``batch`` (timed, in chunks of ``chunk`` pairs) and return its metrics.

    The dict holds :func:`motion_errors` and ``ms_per_pair`` (wall time of the estimator calls only).
    """
    n = batch.motion.shape[0]
    step = n if chunk is None else max(int(chunk), 1)
    cuda = batch.reference.is_cuda
    outputs = []
    elapsed = 0.0
    for i in range(0, n, step):
        ref, mov = batch.reference[i : i + step], batch.moved[i : i + step]
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = estimate_fn(ref, mov)
        if cuda:
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        outputs.append(out.detach().to("cpu", torch.float64))
    metrics = motion_errors(torch.cat(outputs), batch.motion, gross_threshold)
    metrics["ms_per_pair"] = 1e3 * elapsed / max(n, 1)
    return metrics
