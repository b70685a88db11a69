"""Receiver noise: the coil noise covariance from noise-measurement lines, or an estimate from the data.

The estimation stage works on prewhitened data (Pruessmann et al., MRM 1999: the noise covariance ``Psi``
between coils; ``W = L^-1`` with ``Psi = L L^H`` makes the noise white with unit variance per sample), so
that the uncertainties and the significance test of ``docs/gadget.md`` ("Do no harm") are in units of the
noise.  Sources, in order:

1. noise-measurement lines (``ACQ_IS_NOISE_MEASUREMENT``): ``Psi`` from their samples, scaled by the ratio
   of the noise line's dwell time to the imaging line's (noise variance per sample is proportional to the
   receiver bandwidth, as Gadgetron's ``NoiseAdjustGadget`` does);
2. otherwise the data themselves: the per-coil variance of the k-space samples of the outer eighth of the
   readout on each side, estimated robustly (``median |y|^2 / ln 2``, the median of an exponential law) —
   an over-estimate where the object has much high-frequency content, which makes the test conservative.
"""

from __future__ import annotations

import logging
import math

import ismrmrd
import numpy as np
import torch

__all__ = ["NoiseStore", "data_noise_variance", "whitener"]

log = logging.getLogger("kmotion.gadget")


def whitener(covariance: np.ndarray) -> np.ndarray:
    """``(n_coils, n_coils)`` matrix ``W = L^-1`` with ``covariance = L L^H`` (``W Psi W^H = I``).

    A covariance that is not positive definite (e.g. a dead channel) is regularised by 1e-6 of its trace.
    """
    c = np.asarray(covariance, dtype=np.complex128)
    c = (c + c.conj().T) / 2
    n = c.shape[0]
    try:
        low = np.linalg.cholesky(c)
    except np.linalg.LinAlgError:
        low = np.linalg.cholesky(c + 1e-6 * np.trace(c).real / n * np.eye(n))
    return np.linalg.inv(low)


def data_noise_variance(kspace: np.ndarray, samples: np.ndarray) -> float:
    """A robust noise variance per complex sample, averaged over coils, from the data (module docstring 2).

    ``kspace`` ``(n_coils, n_ky, n_kx)``, ``samples`` ``(n_ky, n_kx)`` bool (acquired).  Returns NaN when
    there are too few outer samples.
    """
    n_kx = kspace.shape[-1]
    edge = max(1, n_kx // 8)
    outer = np.zeros(n_kx, dtype=bool)
    outer[:edge] = True
    outer[-edge:] = True
    sel = samples & outer[None, :]
    if sel.sum() < 16:
        return math.nan
    vals = np.abs(kspace[:, sel]) ** 2
    return float(np.median(vals) / math.log(2))


class NoiseStore:
    """Noise-measurement lines of a stream, turned into a coil whitening matrix."""

    def __init__(self) -> None:
        self._lines: list[np.ndarray] = []
        self._dwell_us: float = 0.0
        self._cache: dict[tuple[int, float], np.ndarray | None] = {}

    def note(self, item: object) -> bool:
        """Keep ``item`` if it is a noise-measurement line; True if it is one."""
        if not isinstance(item, ismrmrd.Acquisition):
            return False
        if not item.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            return False
        data = np.asarray(item.data, dtype=np.complex64)
        if data.ndim == 2 and data.shape[1] > 1 and np.isfinite(data).all():
            self._lines.append(data)
            self._dwell_us = float(item.sample_time_us) or self._dwell_us
            self._cache.clear()
        return True

    @property
    def n_lines(self) -> int:
        """Noise lines seen."""
        return len(self._lines)

    def whitening(self, n_coils: int, dwell_us: float) -> np.ndarray | None:
        """``(n_coils, n_coils)`` whitening matrix for imaging lines of dwell time ``dwell_us``, or None
        without (matching) noise lines."""
        key = (n_coils, round(float(dwell_us), 6))
        if key in self._cache:
            return self._cache[key]
        lines = [d for d in self._lines if d.shape[0] == n_coils]
        out = None
        if lines:
            x = np.concatenate(lines, axis=1).astype(np.complex128)
            psi = x @ x.conj().T / x.shape[1]
            if self._dwell_us > 0 and dwell_us > 0:
                psi = psi * (self._dwell_us / dwell_us)  # variance per sample scales with the bandwidth
            if np.isfinite(psi).all() and np.trace(psi).real > 0:
                out = whitener(psi)
            else:
                log.warning("noise lines unusable (zero or non-finite covariance): noise from the data")
        self._cache[key] = out
        return out


def apply_whitening(w: np.ndarray | None, x: torch.Tensor, coil_dim: int) -> torch.Tensor:
    """``W x`` over the coil axis ``coil_dim`` of ``x`` (identity for ``w`` None)."""
    if w is None:
        return x
    wt = torch.as_tensor(w, dtype=torch.complex64, device=x.device)
    moved = x.movedim(coil_dim, -1)
    return (moved @ wt.T).movedim(-1, coil_dim)
