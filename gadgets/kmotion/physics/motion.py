"""Rigid in-plane motion: phase ramps, band-limited rotation, the forward model and its exact inverse.

Convention (``docs/conventions.md``): the moved object is ``g(r) = f(R(phi)^-1 (r - t))`` with
``R(phi) = [[cos, -sin], [sin, cos]]`` acting on ``r = (x, y)`` in millimetres, ``x = column - n_x // 2``,
``y = row - n_y // 2``.  Translations are given in pixels of the encoded grid (``dx_px``, ``dy_px``),
rotations in degrees.  Pixel spacing ``(dy_mm, dx_mm)`` makes the rotation physical for non-square pixels.

In k-space the forward model is ``G(k) = exp(-2 pi i (kx dx / n_x + ky dy / n_y)) * F(R(phi)^-1 k)``.
Rotation is done with three Fourier shears (band-limited, unit-modulus phase factors), so
``undo_motion_kspace(apply_motion_kspace(K, m), m) == K`` to float precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kmotion.physics.fft import centered_indices, fft1c, fft2c, ifft1c, ifft2c

Spacing = tuple[float, float]


@dataclass(frozen=True)
class RigidMotion:
    """One in-plane rigid motion: translation in pixels of the encoded grid, rotation in degrees."""

    dx_px: float
    dy_px: float
    phi_deg: float

    def to_mm(self, pixel_spacing_mm: Spacing) -> tuple[float, float]:
        """Translation ``(dx_mm, dy_mm)`` for pixel spacing ``(dy_mm, dx_mm)``."""
        return self.dx_px * pixel_spacing_mm[1], self.dy_px * pixel_spacing_mm[0]


def px_to_mm(dx_px: torch.Tensor, dy_px: torch.Tensor, pixel_spacing_mm: Spacing) -> tuple[torch.Tensor, ...]:
    """Convert a translation from pixels to millimetres; spacing is ``(dy_mm, dx_mm)``."""
    return dx_px * pixel_spacing_mm[1], dy_px * pixel_spacing_mm[0]


def mm_to_px(dx_mm: torch.Tensor, dy_mm: torch.Tensor, pixel_spacing_mm: Spacing) -> tuple[torch.Tensor, ...]:
    """Convert a translation from millimetres to pixels; spacing is ``(dy_mm, dx_mm)``."""
    return dx_mm / pixel_spacing_mm[1], dy_mm / pixel_spacing_mm[0]


def to_six_vector(dx: torch.Tensor, dy: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Stack in-plane motion into the network's 6-vector ``(dx, dy, dz, phi_x, phi_y, phi_z)``."""
    zero = torch.zeros_like(dx)
    return torch.stack([dx, dy, zero, zero, zero, phi], dim=-1)


def _batched_ramp(
    kspace: torch.Tensor, dx_px: torch.Tensor | float, dy_px: torch.Tensor | float
) -> torch.Tensor:
    """Phase ramp shaped to broadcast against ``kspace`` ``(B, ..., n_ky, n_kx)``."""
    n_ky, n_kx = kspace.shape[-2:]
    ramp = phase_ramp((n_ky, n_kx), dx_px, dy_px, device=kspace.device)
    if ramp.ndim == 3:
        ramp = ramp.reshape((ramp.shape[0],) + (1,) * (kspace.ndim - 3) + ramp.shape[1:])
    return ramp.to(kspace.dtype)


def phase_ramp(
    shape: tuple[int, int],
    dx_px: torch.Tensor | float,
    dy_px: torch.Tensor | float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Phase ramp ``exp(-2 pi i (kx dx / n_x + ky dy / n_y))`` on the centred k-space grid.

    Parameters
    ----------
    shape
        ``(n_ky, n_kx)``.
    dx_px, dy_px
        Translation in pixels, scalars or tensors of shape ``(B,)``.

    Returns
    -------
    Complex64 tensor of shape ``(B, n_ky, n_kx)`` (or ``(n_ky, n_kx)`` for scalar input).
    """
    n_ky, n_kx = shape
    dx = torch.as_tensor(dx_px, dtype=torch.float64, device=device)
    dy = torch.as_tensor(dy_px, dtype=torch.float64, device=dx.device)
    kx = centered_indices(n_kx, dx.device, torch.float64) / n_kx
    ky = centered_indices(n_ky, dx.device, torch.float64) / n_ky
    arg = dx[..., None, None] * kx + dy[..., None, None] * ky[:, None]
    return torch.polar(torch.ones_like(arg), -2 * math.pi * arg).to(torch.complex64)


def _shear_rows(img: torch.Tensor, shift_per_row: torch.Tensor) -> torch.Tensor:
    """Shift each row ``y`` of ``img`` along x by ``shift_per_row[..., y]`` pixels (Fourier shift).

    ``img``: ``(B, ..., n_y, n_x)``; ``shift_per_row``: ``(B, n_y)`` (float64).  Content at ``x`` moves to
    ``x + shift``.  Every row is multiplied by a unit-modulus phase in its 1-D spectrum, so the shear is
    unitary and exactly undone by the opposite shift.
    """
    n_x = img.shape[-1]
    kx = centered_indices(n_x, img.device, torch.float64) / n_x
    shift = shift_per_row.reshape(shift_per_row.shape[:1] + (1,) * (img.ndim - 3) + shift_per_row.shape[1:])
    phase = torch.polar(
        torch.ones((), dtype=torch.float64, device=img.device), -2 * math.pi * shift[..., None] * kx
    )
    return ifft1c(fft1c(img, -1) * phase.to(img.dtype), -1)


def rotate_image(
    img: torch.Tensor,
    phi_deg: torch.Tensor | float,
    pixel_spacing_mm: Spacing = (1.0, 1.0),
) -> torch.Tensor:
    """Rotate complex images by ``phi`` degrees about the grid centre, band-limited (three Fourier shears).

    ``g(r) = f(R(phi)^-1 r)`` with ``r`` in millimetres.  ``img``: ``(B, ..., n_y, n_x)`` with ``phi`` of
    shape ``(B,)`` (or a scalar applied to all).  The rotation is exactly invertible:
    ``rotate_image(rotate_image(f, a), -a) == f`` to float precision.  The grid is periodic (circular
    shears): objects should lie inside the inscribed circle, and ``|phi| <= 90`` degrees.
    """
    squeeze = False
    phi = torch.as_tensor(phi_deg, dtype=torch.float64, device=img.device)
    if phi.ndim == 0:
        phi = phi.expand(img.shape[0]) if img.ndim >= 3 else phi.reshape(1)
    if img.ndim == 2:
        img, squeeze = img[None], True
    if bool((phi.abs() > 90.0 + 1e-9).any()):
        raise ValueError(f"rotate_image: |phi| must be <= 90 degrees, got max {float(phi.abs().max()):.3f}")
    dy_mm, dx_mm = pixel_spacing_mm
    n_y, n_x = img.shape[-2:]
    rad = phi * (math.pi / 180.0)
    a = -torch.tan(rad / 2)  # x-shear (mm per mm)
    b = torch.sin(rad)  # y-shear
    y = centered_indices(n_y, img.device, torch.float64)
    x = centered_indices(n_x, img.device, torch.float64)
    # x-shear: x' = x + a y (in mm) -> shift in x-pixels per row y: a * y * dy_mm / dx_mm
    sx = a[:, None] * y * (dy_mm / dx_mm)
    # y-shear: y' = y + b x (mm) -> shift in y-pixels per column x: b * x * dx_mm / dy_mm
    sy = b[:, None] * x * (dx_mm / dy_mm)
    out = _shear_rows(img, sx)
    out = _shear_rows(out.transpose(-1, -2), sy).transpose(-1, -2)
    out = _shear_rows(out, sx)
    return out[0] if squeeze else out


def rotate_kspace(
    kspace: torch.Tensor, phi_deg: torch.Tensor | float, pixel_spacing_mm: Spacing = (1.0, 1.0)
) -> torch.Tensor:
    """K-space of the object rotated by ``phi`` (see :func:`rotate_image`): ``G(k) = F(R^-1 k)``."""
    return fft2c(rotate_image(ifft2c(kspace), phi_deg, pixel_spacing_mm))


def apply_motion_kspace(
    kspace: torch.Tensor,
    dx_px: torch.Tensor | float,
    dy_px: torch.Tensor | float,
    phi_deg: torch.Tensor | float,
    pixel_spacing_mm: Spacing = (1.0, 1.0),
) -> torch.Tensor:
    """Forward rigid motion on fully sampled k-space ``(B, ..., n_ky, n_kx)``: rotate, then translate.

    Parameters are scalars or ``(B,)`` tensors (pixels, pixels, degrees).
    """
    rotated = rotate_kspace(kspace, phi_deg, pixel_spacing_mm)
    return rotated * _batched_ramp(kspace, dx_px, dy_px)


def undo_motion_kspace(
    kspace: torch.Tensor,
    dx_px: torch.Tensor | float,
    dy_px: torch.Tensor | float,
    phi_deg: torch.Tensor | float,
    pixel_spacing_mm: Spacing = (1.0, 1.0),
) -> torch.Tensor:
    """Exact inverse of :func:`apply_motion_kspace`: remove the ramp, then rotate by ``-phi``."""
    ramp = _batched_ramp(kspace, dx_px, dy_px)
    phi = -torch.as_tensor(phi_deg, dtype=torch.float64, device=kspace.device)
    return rotate_kspace(kspace * ramp.conj().to(kspace.dtype), phi, pixel_spacing_mm)


def apply_motion_image(
    img: torch.Tensor,
    dx_px: torch.Tensor | float,
    dy_px: torch.Tensor | float,
    phi_deg: torch.Tensor | float,
    pixel_spacing_mm: Spacing = (1.0, 1.0),
) -> torch.Tensor:
    """Image-domain version of :func:`apply_motion_kspace`: ``g(r) = f(R^-1 (r - t))``."""
    return ifft2c(apply_motion_kspace(fft2c(img), dx_px, dy_px, phi_deg, pixel_spacing_mm))
