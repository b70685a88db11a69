"""SENSE with one rigid motion per echo train (shot): the forward model of multi-shot Cartesian imaging.

Pure math, no I/O; batched torch (CPU and CUDA).  Axes as in ``docs/conventions.md``: images
``(B, n_y, n_x)``, k-space ``(B, n_coils, n_ky, n_kx)``, centred orthonormal FFTs.

A 2-D multi-shot acquisition of slice ``b`` reads, in echo train ``s``, the k-space samples of the shot
mask ``M_s`` while the object sits at the rigid pose ``m_s = (dx_px, dy_px, phi_deg)`` relative to the
image ``x`` (the reference pose).  Coils stay in the scanner frame.  The encoding operator is

``A x = sum_s M_s F C T_{m_s} x``

(``T`` the rigid motion of :mod:`kmotion.physics.motion`: band-limited rotation, then the phase ramp;
unitary).
Shot masks must not overlap (every sample belongs to one shot).  With one shot holding every acquired
sample this is :class:`kmotion.physics.sense.MotionSense`.  Method: aligned SENSE (Cordero-Grande et al.,
MRM 2016; Haskell et al., TAMER, MRM 2018), here with shots that share a pose merged into one term.
"""

from __future__ import annotations

import torch

from kmotion.physics.fft import fft2c, ifft2c
from kmotion.physics.rolled import RolledGrid
from kmotion.physics.sense import conjugate_gradient
from kmotion.physics.validate import InputError

__all__ = ["ShotSense", "merge_shots", "sense_reconstruct_shots"]

Spacing = tuple[float, float]


def merge_shots(
    shot_masks: torch.Tensor, motion: torch.Tensor | None, atol: float = 1e-9
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the shots of each slice that share a pose into one mask.

    Parameters
    ----------
    shot_masks
        ``(B, S, n_ky, n_kx)`` bool, disjoint per slice.
    motion
        ``(B, S, 3)`` poses ``(dx_px, dy_px, phi_deg)``; None: all zero (one term per slice).

    Returns
    -------
    masks, poses
        ``(B, G, n_ky, n_kx)`` and ``(B, G, 3)``, ``G`` the largest number of distinct poses of a slice;
        slices with fewer poses are padded with empty masks.
    """
    b, s = shot_masks.shape[:2]
    if motion is None:
        return shot_masks.any(1, keepdim=True), torch.zeros(b, 1, 3, dtype=torch.float64)
    mot = motion.detach().to("cpu", torch.float64).reshape(b, s, 3)
    groups: list[list[tuple[torch.Tensor, list[int]]]] = []
    for i in range(b):
        g: list[tuple[torch.Tensor, list[int]]] = []
        for j in range(s):
            for pose, members in g:
                if bool(((pose - mot[i, j]).abs() <= atol).all()):
                    members.append(j)
                    break
            else:
                g.append((mot[i, j], [j]))
        groups.append(g)
    n_g = max(len(g) for g in groups)
    masks = torch.zeros((b, n_g) + tuple(shot_masks.shape[2:]), dtype=torch.bool, device=shot_masks.device)
    poses = torch.zeros(b, n_g, 3, dtype=torch.float64)
    for i, g in enumerate(groups):
        for k, (pose, members) in enumerate(g):
            masks[i, k] = shot_masks[i, members].any(0)
            poses[i, k] = pose
    return masks, poses


class ShotSense:
    """``A x = sum_s M_s F C T_{m_s} x`` for ``B`` slices of ``S`` shots (see the module docstring).

    Shots of a slice that share a pose are one term (:func:`merge_shots`).  The operator works on the rolled
    layout (:mod:`kmotion.physics.rolled`: no shift copies, fast shears); :meth:`forward`/:meth:`adjoint`
    take and give the centred layout of ``docs/conventions.md``, :meth:`normal_rolled` is the CG's operator.

    Parameters
    ----------
    maps
        ``(B, n_coils, n_y, n_x)`` coil maps (scanner frame).
    shot_masks
        ``(B, S, n_ky)`` acquired rows per shot or ``(B, S, n_ky, n_kx)`` samples, bool, disjoint per slice.
    motion
        ``(B, S, 3)`` ``(dx_px, dy_px, phi_deg)`` of each shot relative to ``x``; None: no motion.
    pixel_spacing_mm
        ``(dy_mm, dx_mm)``.

    Raises
    ------
    InputError
        For shapes that do not match.
    """

    def __init__(
        self,
        maps: torch.Tensor,
        shot_masks: torch.Tensor,
        motion: torch.Tensor | None = None,
        pixel_spacing_mm: Spacing = (1.0, 1.0),
    ) -> None:
        if maps.ndim != 4:
            raise InputError(f"ShotSense: maps must be (B, n_coils, n_y, n_x), got {tuple(maps.shape)}")
        b, n_c, n_y, n_x = maps.shape
        m = shot_masks.to(maps.device, torch.bool)
        if m.ndim == 3:
            m = m[..., None].expand(*m.shape, n_x)
        if m.ndim != 4 or m.shape[0] != b or tuple(m.shape[2:]) != (n_y, n_x):
            raise InputError(
                f"ShotSense: shot_masks must be (B, S, n_ky[, n_kx]) with B = {b}, n_ky = {n_y}, "
                f"n_kx = {n_x}; got {tuple(shot_masks.shape)}"
            )
        if motion is not None and tuple(motion.shape) != (b, m.shape[1], 3):
            raise InputError(
                f"ShotSense: motion must be (B, S, 3) = ({b}, {m.shape[1]}, 3), got {tuple(motion.shape)}"
            )
        masks, poses = merge_shots(m, motion)
        self.n_slices, self.n_groups = b, masks.shape[1]
        self.grid = RolledGrid(n_y, n_x, pixel_spacing_mm, maps.device)
        self.maps = maps.to(torch.complex64)
        self.maps_r = self.grid.roll(self.maps)  # (B, C, n_y, n_x) rolled
        self.masks_r = torch.fft.ifftshift(masks, dim=(-2, -1))  # (B, G, n_y, n_x) plain k order
        self.poses = poses.to(maps.device).reshape(b * self.n_groups, 3)
        self.moving = bool(self.poses.abs().sum() > 0)
        self.mask = masks.any(1)[:, None]  # (B, 1, n_ky, n_kx) centred: every acquired sample

    def _expand(self, x: torch.Tensor) -> torch.Tensor:
        b, g = self.n_slices, self.n_groups
        return x[:, None].expand(b, g, *x.shape[1:]).reshape(b * g, *x.shape[1:])

    def forward_rolled(self, x_r: torch.Tensor) -> torch.Tensor:
        """Rolled image ``(B, n_y, n_x)`` -> k-space in plain FFT order ``(B, n_coils, n_ky, n_kx)``."""
        b, g = self.n_slices, self.n_groups
        moved = self._expand(x_r)
        if self.moving:
            moved = self.grid.move(moved, self.poses)
        coil = self.maps_r[:, None] * moved.reshape(b, g, 1, *x_r.shape[1:])  # (B, G, C, n_y, n_x)
        k = torch.fft.fft2(coil, norm="ortho") * self.masks_r[:, :, None]
        return k.sum(1)

    def adjoint_rolled(self, y: torch.Tensor) -> torch.Tensor:
        """K-space in plain order ``(B, n_coils, n_ky, n_kx)`` -> rolled image ``(B, n_y, n_x)``."""
        b, g = self.n_slices, self.n_groups
        k = y[:, None] * self.masks_r[:, :, None]  # (B, G, C, ...)
        img = (self.maps_r[:, None].conj() * torch.fft.ifft2(k, norm="ortho")).sum(2)  # (B, G, n_y, n_x)
        img = img.reshape(b * g, *img.shape[2:])
        if self.moving:
            img = self.grid.unmove(img, self.poses)
        return img.reshape(b, g, *img.shape[1:]).sum(1)

    def normal_rolled(self, x_r: torch.Tensor) -> torch.Tensor:
        """``A^H A`` on rolled images."""
        return self.adjoint_rolled(self.forward_rolled(x_r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, n_y, n_x)`` (reference pose) -> k-space ``(B, n_coils, n_ky, n_kx)`` on the masks."""
        return torch.fft.fftshift(self.forward_rolled(self.grid.roll(x)), dim=(-2, -1))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, n_coils, n_ky, n_kx)`` -> ``(B, n_y, n_x)``: ``sum_s T_s^H C^H F^H M_s y``."""
        return self.grid.unroll(self.adjoint_rolled(torch.fft.ifftshift(y, dim=(-2, -1))))

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``A^H A x``."""
        return self.adjoint(self.forward(x))

    def forward_static(self, x: torch.Tensor) -> torch.Tensor:
        """``M F C x`` (every acquired sample, no motion): the motion-free k-space of ``x``."""
        return fft2c(self.maps * x[:, None]) * self.mask

    def adjoint_static(self, y: torch.Tensor) -> torch.Tensor:
        """Adjoint of :meth:`forward_static`."""
        return (self.maps.conj() * ifft2c(y * self.mask)).sum(1)


def sense_reconstruct_shots(
    kspace: torch.Tensor,
    maps: torch.Tensor,
    shot_masks: torch.Tensor,
    motion: torch.Tensor | None = None,
    pixel_spacing_mm: Spacing = (1.0, 1.0),
    iterations: int = 20,
    lam: float = 1e-2,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """``argmin_x ||sum_s M_s F C T_s x - y||^2 + lam ||x||^2`` by CG; ``x`` ``(B, n_y, n_x)`` complex64.

    ``kspace`` ``(B, n_coils, n_ky, n_kx)``; other arguments as :class:`ShotSense`; ``lam`` absolute (maps of
    unit RSS, see :func:`kmotion.physics.sense.sense_reconstruct`); ``x0`` an optional start.
    """
    op = ShotSense(maps, shot_masks, motion, pixel_spacing_mm)
    y = torch.fft.ifftshift(kspace.to(op.maps.device, torch.complex64), dim=(-2, -1))
    start = None if x0 is None else op.grid.roll(x0.to(torch.complex64))
    x_r = conjugate_gradient(op.normal_rolled, op.adjoint_rolled(y), iterations, lam, x0=start)
    return op.grid.unroll(x_r)
