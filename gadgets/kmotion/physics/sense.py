"""SENSE with rigid motion in the forward model: coil maps, the encoding operator, conjugate gradients.

Pure math, no I/O; batched torch (CPU and CUDA), complex64.  Conventions of ``docs/conventions.md``:
k-space ``(B, n_coils, n_ky, n_kx)``, images ``(B, n_y, n_x)``, centred orthonormal FFTs.

The encoding operator of a slice acquired while the object was moved by ``m = (dx_px, dy_px, phi_deg)``
relative to the reference position is

``A x = M F C T_m x``

with ``x`` the object in the **reference** position, ``T_m`` the rigid motion of
:mod:`kmotion.physics.motion` (band-limited rotation by three Fourier shears, then the phase ramp:
unitary, so ``T_m^H = T_m^-1``), ``C`` the coil maps (fixed in the scanner frame: coils do not move with
the patient), ``F`` the centred FFT and ``M`` the sampling mask of the acquired rows.  ``x`` minimises
``||A x - y||^2 + lam ||x||^2`` (conjugate gradients on the normal equations).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from kmotion.physics.fft import centered_indices, fft2c, ifft2c
from kmotion.physics.motion import phase_ramp, rotate_image
from kmotion.physics.validate import InputError

__all__ = [
    "MotionSense",
    "calibration_block",
    "coil_maps_lowres",
    "conjugate_gradient",
    "sense_reconstruct",
    "snr_limited_halfwidth",
]

Spacing = tuple[float, float]


def calibration_block(mask: torch.Tensor | np.ndarray) -> tuple[int, int]:
    """The run of consecutive acquired rows that contains the centre row ``n_ky // 2``: ``[lo, hi)``.

    Returns ``(c, c)`` (empty) when the centre row is not acquired.
    """
    m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool).reshape(-1)
    c = m.size // 2
    if m.size == 0 or not m[c]:
        return c, c
    lo = c
    while lo > 0 and m[lo - 1]:
        lo -= 1
    hi = c + 1
    while hi < m.size and m[hi]:
        hi += 1
    return lo, hi


def snr_limited_halfwidth(
    kspace: torch.Tensor,
    rows: tuple[int, int],
    aspect: float = 1.0,
    min_half: int = 4,
    ratio: float = 10.0,
) -> int:
    """Half-width (rows about the centre) of the calibration block whose k-space holds more signal than noise.

    Coil maps are the low-resolution coil images divided by their RSS: calibration rows where the data are
    mostly noise add noise to the maps and nothing else.  That noise is the reference's own, so it matches
    the reference image at its pose only, and a registration against such maps prefers a pose away from it
    (a motion-free 128^2 head phantom with 32 coils at SNR 5 and maps from 32 rows came out at +-2.7 deg,
    chi2 ~130).  The power per coil sample ``P(r)`` in rings of radius ``r`` (in rows; the readout scaled by
    ``1 / aspect``) over the block, and the noise variance ``sigma^2`` bounded by the weakest ring of the
    block's outer half (the radial spectrum floor), give the largest ``h`` with ``P(r) >= ratio * sigma^2``
    (signal at least ``ratio - 1`` times the noise: a Wiener weight of 0.9 at the default) for every
    ``r <= h``.

    Parameters
    ----------
    kspace
        ``(n_coils, n_ky, n_kx)``, rows ``rows[0]:rows[1]`` fully sampled about the centre row ``n_ky // 2``.
    rows
        ``[lo, hi)`` of the block (:func:`calibration_block`).
    aspect
        ``FOV_x / FOV_y``.
    min_half, ratio
        Smallest half-width returned; the power ratio to the noise floor a ring must reach.

    Returns
    -------
    int
        ``h`` between ``min(min_half, half)`` and ``half = min(c - lo, hi - 1 - c)``; ``half`` for noise-free
        data.
    """
    n_ky, n_kx = kspace.shape[-2:]
    c_y, c_x = n_ky // 2, n_kx // 2
    half = min(c_y - rows[0], rows[1] - 1 - c_y)
    if half <= min_half:
        return max(half, 0)
    block = kspace[..., rows[0] : rows[1], :]
    ky = torch.arange(rows[0], rows[1], device=kspace.device, dtype=torch.float64) - c_y
    kx = (torch.arange(n_kx, device=kspace.device, dtype=torch.float64) - c_x) / aspect
    ring = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2).round().long()
    power = block.abs().square().double().mean(0)
    n_rings = int(ring.max()) + 1
    num = torch.zeros(n_rings, dtype=torch.float64, device=kspace.device).scatter_add_(
        0, ring.flatten(), power.flatten()
    )
    cnt = torch.zeros(n_rings, dtype=torch.float64, device=kspace.device).scatter_add_(
        0, ring.flatten(), torch.ones_like(power.flatten())
    )
    p = num / cnt.clamp_min(1)
    outer = torch.arange(n_rings, device=kspace.device) >= n_rings // 2
    outer &= cnt > 0
    if not bool(outer.any()):
        return half
    floor = float(p[outer].min())
    h = 0
    for r in range(1, half + 1):
        if float(p[r]) < ratio * floor:
            break
        h = r
    return max(h, min_half)


def coil_maps_lowres(
    kspace: torch.Tensor,
    rows: tuple[int, int],
    aspect: float = 1.0,
    threshold: float = 0.02,
) -> torch.Tensor:
    """Coil sensitivities from a fully sampled centre block (low-resolution coil images / their RSS).

    Parameters
    ----------
    kspace
        ``(n_coils, n_ky, n_kx)`` (or batched ``(B, n_coils, n_ky, n_kx)``); rows ``rows[0]:rows[1]`` must be
        fully sampled around the centre row ``n_ky // 2``.
    rows
        ``[lo, hi)`` of the fully sampled block (see :func:`calibration_block`).
    aspect
        ``FOV_x / FOV_y``: the readout window spans the same k-extent in cycles/mm as the row block.
    threshold
        Soft floor of the normalisation relative to the largest RSS: ``maps = I / sqrt(rss^2 + (t max)^2)``,
        so maps are ~unit RSS on the object and decay smoothly outside it.

    Returns
    -------
    torch.Tensor
        Maps of the same shape, complex64.  Their phase is relative to the dominant virtual coil (the object
        phase cancels), their root-sum-of-squares ~1 over the object.

    Raises
    ------
    InputError
        When the block holds fewer than 3 rows about the centre.
    """
    squeeze = kspace.ndim == 3
    k = kspace[None] if squeeze else kspace
    if k.ndim != 4:
        raise InputError(f"coil_maps_lowres: kspace must be (B, n_coils, n_ky, n_kx), got {tuple(k.shape)}")
    n_ky, n_kx = k.shape[-2:]
    c_y, c_x = n_ky // 2, n_kx // 2
    half = min(c_y - rows[0], rows[1] - 1 - c_y)
    if half < 1:
        raise InputError(
            f"coil_maps_lowres: need >= 3 fully sampled rows about the centre row {c_y}, got rows {rows}"
        )
    half_x = max(1, min(c_x, round(half * aspect)))
    ky = centered_indices(n_ky, k.device, torch.float64)
    kx = centered_indices(n_kx, k.device, torch.float64)
    wy = torch.where(ky.abs() <= half, torch.cos(math.pi * ky / (2 * (half + 1))) ** 2, 0.0)
    wx = torch.where(kx.abs() <= half_x, torch.cos(math.pi * kx / (2 * (half_x + 1))) ** 2, 0.0)
    low = ifft2c(k.to(torch.complex64) * (wy[:, None] * wx).to(torch.complex64))
    b, n_c = low.shape[:2]
    flat = low.reshape(b, n_c, -1)
    u, _, _ = torch.linalg.svd(flat @ flat.conj().transpose(1, 2))
    virtual = (u[:, :, 0].conj()[:, :, None] * flat).sum(1)  # (B, pixels)
    phase = torch.where(virtual.abs() > 0, virtual.conj() / virtual.abs().clamp_min(1e-30), 1.0)
    rss = flat.abs().square().sum(1).sqrt()
    floor = threshold * rss.amax(-1, keepdim=True)
    maps = flat * (phase / torch.sqrt(rss**2 + floor**2).clamp_min(1e-30))[:, None]
    maps = maps.reshape(low.shape).to(torch.complex64)
    return maps[0] if squeeze else maps


class MotionSense:
    """``A x = M F C T_m x`` for a batch of slices (see the module docstring).

    Parameters
    ----------
    maps
        ``(B, n_coils, n_y, n_x)`` coil maps.
    mask
        ``(B, n_ky)`` acquired rows (or ``(B, n_ky, n_kx)`` samples), bool.
    motion
        ``(B, 3)`` ``(dx_px, dy_px, phi_deg)`` of the object relative to ``x``; None: no motion.
    pixel_spacing_mm
        ``(dy_mm, dx_mm)`` (rotation is physical for non-square pixels).
    """

    def __init__(
        self,
        maps: torch.Tensor,
        mask: torch.Tensor,
        motion: torch.Tensor | None = None,
        pixel_spacing_mm: Spacing = (1.0, 1.0),
    ) -> None:
        if maps.ndim != 4:
            raise InputError(f"MotionSense: maps must be (B, n_coils, n_y, n_x), got {tuple(maps.shape)}")
        b, _, n_y, n_x = maps.shape
        m = mask.to(maps.device, torch.bool)
        if m.ndim == 2 and tuple(m.shape) == (b, n_y):
            m = m[:, :, None].expand(b, n_y, n_x)
        if tuple(m.shape) != (b, n_y, n_x):
            raise InputError(
                f"MotionSense: mask must be (B, n_ky) or (B, n_ky, n_kx) = ({b}, {n_y}[, {n_x}]), "
                f"got {tuple(mask.shape)}"
            )
        self.maps = maps.to(torch.complex64)
        self.mask = m[:, None]
        self.spacing = pixel_spacing_mm
        self.motion: torch.Tensor | None = None
        self.ramp: torch.Tensor | None = None
        if motion is not None:
            mot = torch.as_tensor(motion, dtype=torch.float64, device=maps.device).reshape(b, 3)
            if bool(mot.abs().sum() > 0):
                self.motion = mot
                self.ramp = phase_ramp((n_y, n_x), mot[:, 0], mot[:, 1], device=maps.device)

    def move(self, x: torch.Tensor) -> torch.Tensor:
        """``T_m x``: rotate by phi, then translate (exactly :func:`kmotion.physics.apply_motion_image`)."""
        if self.motion is None or self.ramp is None:
            return x
        return ifft2c(fft2c(rotate_image(x, self.motion[:, 2], self.spacing)) * self.ramp)

    def unmove(self, x: torch.Tensor) -> torch.Tensor:
        """``T_m^H x = T_m^-1 x`` (unitary)."""
        if self.motion is None or self.ramp is None:
            return x
        return rotate_image(ifft2c(fft2c(x) * self.ramp.conj()), -self.motion[:, 2], self.spacing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, n_y, n_x)`` in the reference position -> masked k-space ``(B, n_coils, n_y, n_x)``."""
        return fft2c(self.maps * self.move(x)[:, None]) * self.mask

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, n_coils, n_ky, n_kx)`` -> ``(B, n_y, n_x)``: ``T^H C^H F^H M y``."""
        return self.unmove((self.maps.conj() * ifft2c(y * self.mask)).sum(1))

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``A^H A x``."""
        return self.adjoint(self.forward(x))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-batch ``<a, b> = sum conj(a) b`` over all but the first axis."""
    return (a.conj() * b).flatten(1).sum(1)


def conjugate_gradient(
    normal: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    iterations: int = 20,
    lam: float = 1e-3,
    x0: torch.Tensor | None = None,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Solve ``(N + lam I) x = rhs`` per batch item by conjugate gradients (``N`` Hermitian PSD).

    Items whose relative residual falls below ``tol`` stop updating.
    """
    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - (normal(x) + lam * x) if x0 is not None else rhs.clone()
    p = r.clone()
    rr = _dot(r, r).real
    stop = tol**2 * _dot(rhs, rhs).real
    shape = (-1,) + (1,) * (rhs.ndim - 1)
    for _ in range(iterations):
        active = rr > stop
        if not bool(active.any()):
            break
        ap = normal(p) + lam * p
        pap = _dot(p, ap).real
        alpha = torch.where(active & (pap > 0), rr / pap.clamp_min(1e-30), 0.0)
        x = x + alpha.reshape(shape) * p
        r = r - alpha.reshape(shape) * ap
        rr_new = _dot(r, r).real
        beta = torch.where(active, rr_new / rr.clamp_min(1e-30), 0.0)
        p = r + beta.reshape(shape) * p
        rr = rr_new
    return x


def sense_reconstruct(
    kspace: torch.Tensor,
    mask: torch.Tensor,
    maps: torch.Tensor,
    motion: torch.Tensor | None = None,
    pixel_spacing_mm: Spacing = (1.0, 1.0),
    iterations: int = 20,
    lam: float = 1e-3,
) -> torch.Tensor:
    """``argmin ||M F C T_m x - y||^2 + lam ||x||^2`` by CG; returns ``x`` ``(B, n_y, n_x)`` complex64.

    ``lam`` is absolute; with maps of unit RSS and the orthonormal FFT the eigenvalues of ``A^H A`` are at
    most ~1, so ``1e-3`` is a small relative regularisation whatever the data scale.
    """
    op = MotionSense(maps, mask, motion, pixel_spacing_mm)
    y = kspace.to(op.maps.device, torch.complex64)
    return conjugate_gradient(op.normal, op.adjoint(y), iterations, lam)
