"""Rigid motion on the *rolled* layout of a grid: the fast path of :mod:`kmotion.physics.motion`.

Pure math, no I/O; batched torch.  The rolled layout is ``ifftshift`` over both image axes: position 0 sits
at index 0, so the centred FFTs of ``docs/conventions.md`` become plain FFTs without shift copies, and
positions and frequencies are both ``fftfreq(n) * n``.  :class:`RolledGrid` rotates (three Fourier shears,
Unser et al. 1995, exactly the band-limited rotation of :func:`kmotion.physics.rotate_image`) and translates
(Fourier shifts) images there, with the exact inverse and the derivatives a Gauss-Newton fit needs; results
equal :func:`kmotion.physics.apply_motion_image` to float precision (tested).
"""

from __future__ import annotations

import math

import torch

__all__ = ["PHI_STEP", "RolledGrid", "move_image"]

Spacing = tuple[float, float]

PHI_STEP = 0.05
"""Central-difference step [deg] of the rotation derivative (:meth:`RolledGrid.derivatives`)."""


class RolledGrid:
    """FFT helpers on the *rolled* layout of an ``(n_y, n_x)`` grid (``ifftshift`` over both axes).

    In the rolled layout position 0 is at index 0, so centred transforms are plain FFTs with no shift
    copies; positions and frequencies are both ``fftfreq(n) * n``.  Results equal the centred operations of
    :mod:`kmotion.physics` to float precision (tested).
    """

    def __init__(self, n_y: int, n_x: int, spacing: Spacing, device: torch.device) -> None:
        self.n_y, self.n_x = n_y, n_x
        self.spacing = spacing
        self.fy = (torch.fft.fftfreq(n_y, device=device) * n_y).to(torch.float32)
        self.fx = (torch.fft.fftfreq(n_x, device=device) * n_x).to(torch.float32)

    @staticmethod
    def roll(img: torch.Tensor) -> torch.Tensor:
        """Centred -> rolled layout (``ifftshift`` over the last two axes)."""
        return torch.fft.ifftshift(img, dim=(-2, -1))

    @staticmethod
    def unroll(img: torch.Tensor) -> torch.Tensor:
        """Rolled -> centred layout."""
        return torch.fft.fftshift(img, dim=(-2, -1))

    @staticmethod
    def _phase(shift: torch.Tensor, freq: torch.Tensor, n: int) -> torch.Tensor:
        """``exp(-2 pi i shift f / n)`` ``(Q, L, M)`` for ``shift`` ``(Q, L)`` and ``freq`` ``(M,)``."""
        arg = (shift.to(torch.float64)[..., None] * (freq.to(torch.float64) * (-2 * math.pi / n))).to(
            torch.float32
        )
        return torch.complex(torch.cos(arg), torch.sin(arg))

    def shear_x(self, img: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Shift row ``i`` of ``img`` ``(Q, n_y, n_x)`` by ``shift[:, i]`` px along x (content moves +)."""
        return torch.fft.ifft(torch.fft.fft(img, dim=-1) * self._phase(shift, self.fx, self.n_x), dim=-1)

    def shear_y(self, img: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Shift column ``j`` by ``shift[:, j]`` pixels along y."""
        ph = self._phase(shift, self.fy, self.n_y).transpose(1, 2)
        return torch.fft.ifft(torch.fft.fft(img, dim=-2) * ph, dim=-2)

    def move(self, img: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """``T(theta) img`` in the rolled layout: three Fourier shears (the rotation of
        :func:`kmotion.physics.rotate_image`), the x translation merged into the last one, then the y
        shift."""
        dy_mm, dx_mm = self.spacing
        rad = theta[:, 2] * (math.pi / 180.0)
        a = -torch.tan(rad / 2)
        b = torch.sin(rad)
        sx = a[:, None] * self.fy.double() * (dy_mm / dx_mm)  # (Q, n_y)
        sy = b[:, None] * self.fx.double() * (dx_mm / dy_mm)  # (Q, n_x)
        out = self.shear_x(img, sx)
        out = self.shear_y(out, sy)
        out = self.shear_x(out, sx + theta[:, 0, None])
        return self.shear_y(out, theta[:, 1, None].expand(-1, self.n_x))

    def unmove(self, img: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """``T(theta)^-1 img`` (rolled): the exact inverse of :meth:`move` (each shear undone in reverse)."""
        dy_mm, dx_mm = self.spacing
        rad = theta[:, 2] * (math.pi / 180.0)
        a = -torch.tan(rad / 2)
        b = torch.sin(rad)
        sx = a[:, None] * self.fy.double() * (dy_mm / dx_mm)
        sy = b[:, None] * self.fx.double() * (dx_mm / dy_mm)
        out = self.shear_y(img, -theta[:, 1, None].expand(-1, self.n_x))
        out = self.shear_x(out, -(sx + theta[:, 0, None]))
        out = self.shear_y(out, -sy)
        return self.shear_x(out, -sx)

    def derivatives(
        self, g: torch.Tensor, theta: torch.Tensor, source: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Derivatives of ``g = T(theta) x`` (rolled) by dx, dy [per px] and phi [per deg].

        The translation columns are exact (spectral derivatives).  With ``source`` (``x``) the rotation
        column is the central difference of the discrete (three-shear) rotation, exact to second order in
        the step; without it, the rotation generator ``(y - t_y) d/dx - (x - t_x) d/dy`` of the continuous
        rotation, which differs from the discrete one for content near the Nyquist frequency — a noisy
        reference has such content, and the difference, correlated with the residual, biases the fit.
        """
        dy_mm, dx_mm = self.spacing
        kx = (2j * math.pi / self.n_x) * self.fx.to(torch.complex64)
        ky = (2j * math.pi / self.n_y) * self.fy.to(torch.complex64)
        gx = torch.fft.ifft(torch.fft.fft(g, dim=-1) * kx, dim=-1)  # d g / d x [per px]
        gy = torch.fft.ifft(torch.fft.fft(g, dim=-2) * ky[:, None], dim=-2)
        if source is not None:
            step = torch.zeros_like(theta)
            step[:, 2] = PHI_STEP
            d_phi = (self.move(source, theta + step) - self.move(source, theta - step)) / (2 * PHI_STEP)
            return -gx, -gy, d_phi
        # positions relative to the moved rotation centre, wrapped onto the periodic grid (an object moved
        # across the edge of the field of view shows up on the other side)
        x = _wrap(self.fx.double()[None, None, :] - theta[:, 0, None, None], self.n_x) * (dx_mm / dy_mm)
        y = _wrap(self.fy.double()[None, :, None] - theta[:, 1, None, None], self.n_y) * (dy_mm / dx_mm)
        d_phi = (math.pi / 180) * (y.to(torch.float32) * gx - x.to(torch.float32) * gy)
        return -gx, -gy, d_phi


def _wrap(u: torch.Tensor, n: int) -> torch.Tensor:
    """``u`` wrapped into ``[-n/2, n/2)`` (positions on a periodic grid of ``n`` pixels)."""
    return torch.remainder(u + n / 2, n) - n / 2


def move_image(x: torch.Tensor, motion: torch.Tensor, spacing: Spacing) -> torch.Tensor:
    """``T(theta) x``: rotate by ``phi``, then translate; equals :func:`kmotion.physics.apply_motion_image`.

    ``x`` ``(P, n_y, n_x)`` centred, ``motion`` ``(P, 3)`` ``(dx_px, dy_px, phi_deg)``.
    """
    grid = RolledGrid(x.shape[-2], x.shape[-1], spacing, x.device)
    return grid.unroll(grid.move(grid.roll(x), motion.to(x.device, torch.float64)))
