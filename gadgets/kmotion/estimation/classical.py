"""Classical registration baseline: rigid in-plane motion between two under-sampled k-space crops.

What a user would run without the network — a Fourier–Mellin rotation estimate and phase correlation —
made as strong as the data allow.  Geometry (``docs/conventions.md``): the crops hold the *acquired* rows
``n_ky // 2 + R * j`` and consecutive readout samples, so sample ``(i, j)`` of a crop ``(s_y, s_x)`` sits at
``ky = R * (i - s_y // 2)``, ``kx = j - s_x // 2`` (index units, cycles per FOV), and the moved crop is
``G(k) = exp(-2 pi i (kx dx / n_x + ky dy / n_y)) F(R(phi)^-1 k)`` with ``k`` rotated in cycles/mm (so the
rotation is physical for non-square pixels).

Steps (batched torch, CPU or CUDA):

1. **Rotation from magnitudes (Fourier–Mellin)**, translation invariant: ``|G(k)| = |F(R^-1 k)|``.  Log power
   spectra, summed over coils, are smoothed with a Gaussian 0.75 acquired rows wide and isotropic in
   cycles/mm — unsmoothed magnitudes (the head outline's ripple) vary faster than the row spacing and
   alias.  For each candidate angle ``a`` the moved map at ``R(a/2) p`` is compared with the reference map at
   ``R(-a/2) p`` (bilinear) by normalised cross-correlation over a fixed set of points ``p`` that stay inside
   the crop.  This is the angular correlation of Fourier–Mellin without the polar resampling, so the corners
   of the rectangular crop (``|ky| > max |kx|``), which carry most of the angular precision, are used.  Grid
   search over the known range and a parabolic fit.
2. **Complex comparison at rotated points.**  ``F(R^-1 k)`` is needed on the moved crop's grid, but only every
   R-th row is known and interpolating across the missing rows aliases (the object spans more than FOV/R).
   So ``F(R^-1 k)`` is taken from the *nearest acquired row* (Lanczos-4 interpolation along the readout, which
   is fully sampled) and every point is weighted by how close ``R^-1 k`` falls to that row.  The cross-power
   spectrum ``X(k) = sum_c G_c(k) conj(F_c(R^-1 k))`` is magnitude-whitened (``X / |X|^0.5``).
3. **Translation by phase correlation** — equivalently, of the zero-filled images after undoing the rotation:
   the matched filter ``Re sum_k X(k) exp(+2 pi i (kx dx / n_x + ky dy / n_y))`` (an up-sampled inverse DFT of
   the cross-power spectrum, two small matrix products) on a grid restricted to the known range, a finer
   local grid and a parabolic fit.  The range restriction resolves the ``n_y / R`` periodicity in ``dy``
   (the zero-filled image's FOV/R replica).
4. **Rotation by complex coherence**: the normalised peak height of step 3 (sharp row-proximity weights) is
   a much sharper function of the angle than the magnitude correlation.  It is evaluated on a 1-degree grid
   over the whole range (on the central 32 x 32 of the crops) plus the magnitude estimate — this catches the
   magnitude step's rare gross failures on nearly round heads — then maximised locally (two passes and a
   parabolic fit) on the full crops, and the translation is re-estimated at the final angle.

Multi-coil data: power and cross-power spectra are summed over coils (the coils do not move); more than
``_MAX_VIRTUAL_COILS`` coils are first compressed to that many virtual coils (one projection per pair,
common to both crops).  A global scale (standardisation) does not matter anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kmotion.physics.sampling import crop_row_indices
from kmotion.physics.validate import InputError
from kmotion.simulation.study import StudyConfig

__all__ = ["register_classical"]

_SMOOTH_ROWS = 0.75
"""Gaussian smoothing of the log power spectra, in acquired rows (isotropic in cycles/mm)."""
_LOG_FLOOR = 1e-3
"""Power floor relative to the mean power before the logarithm."""
_MAGNITUDE_STEP = 0.5
"""Angle grid [deg] of the magnitude correlation."""
_GLOBAL_STEP = 1.0
"""Angle grid [deg] of the coherence search over the whole range."""
_GLOBAL_CROP = (32, 32)
"""Central part of the crops used by the coherence search over the whole range."""
_REFINE_PASSES = ((2.0, 0.5), (0.5, 0.1))
"""Local coherence maximisation: (half-width, step) [deg] of each pass around the previous angle."""
_TRANS_WEIGHT_ROWS = 0.05
"""Row-proximity weight ``1 / (1 + (delta / w)^2)`` for the translation (``delta`` in acquired rows)."""
_COHERENCE_WEIGHT_ROWS = 0.03
"""Row-proximity weight ``exp(-delta^2 / (2 w^2))`` for the rotation coherence."""
_LANCZOS_A = 4
_TABLE = 256
"""Fractional offsets at which the Lanczos weights are tabulated."""
_COHERENCE_GRID = 9
"""Points per axis of the local translation grid on which the coherence peak height is taken."""
_MAX_VIRTUAL_COILS = 2
_BLOCK = 1 << 22
"""Elements (pairs x coils x angles x points x taps) gathered per chunk: bounds the memory."""


# ------------------------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class _Geometry:
    """Crop geometry in index units of the encoded grid."""

    s_y: int
    s_x: int
    acceleration: int
    matrix: tuple[int, int]
    fov_mm: tuple[float, float]
    ky: torch.Tensor
    """``(s_y * s_x,)`` float32 ky of every crop sample (row-major)."""
    kx: torch.Tensor

    @property
    def aspect(self) -> float:
        """``FOV_x / FOV_y``: converts ky index units to kx index units of the same cycles/mm."""
        return self.fov_mm[1] / self.fov_mm[0]

    def rotate(self, angle_deg: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``R(angle) k`` (physical rotation) in index units; ``angle`` broadcasts against ``ky``, ``kx``."""
        rad = angle_deg.to(torch.float64) * (math.pi / 180.0)
        c, s = torch.cos(rad).to(ky.dtype), torch.sin(rad).to(ky.dtype)
        qx = c * kx - s * ky * self.aspect
        qy = s * kx / self.aspect + c * ky
        return qy, qx

    def rows_cols(self, qy: torch.Tensor, qx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fractional crop row and column of index-unit frequencies."""
        return qy / self.acceleration + self.s_y // 2, qx + self.s_x // 2


def _geometry(config: StudyConfig, s_y: int, s_x: int, device: torch.device) -> _Geometry:
    n_y, n_x = config.matrix
    r = config.acceleration
    crop_row_indices(n_y, s_y, r)  # raises InputError when the rows do not fit the matrix
    if s_x > n_x:
        raise InputError(f"crop: s_x_crop={s_x} readout samples exceed the matrix n_x={n_x}")
    ky = (torch.arange(s_y, dtype=torch.float32) - s_y // 2) * r
    kx = torch.arange(s_x, dtype=torch.float32) - s_x // 2
    grid_y, grid_x = torch.meshgrid(ky, kx, indexing="ij")
    return _Geometry(
        s_y,
        s_x,
        r,
        config.matrix,
        config.fov_mm,
        grid_y.reshape(-1).to(device),
        grid_x.reshape(-1).to(device),
    )


def _validate(
    reference: torch.Tensor,
    moved: torch.Tensor,
    config: StudyConfig,
    search_range: tuple[float, float, float] | None,
) -> tuple[float, float, float]:
    for name, x in (("reference", reference), ("moved", moved)):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_complex():
            raise InputError(f"{name}: expected complex k-space, got dtype {x.dtype}")
        if x.ndim != 4:
            raise InputError(
                f"{name}: expected shape (B, n_coils, s_y_crop, s_x_crop), got {tuple(x.shape)} ({x.ndim}-D)"
            )
        if not bool(torch.isfinite(torch.view_as_real(x)).all()):
            raise InputError(f"{name}: contains non-finite (NaN or Inf) samples")
    if reference.shape != moved.shape:
        raise InputError(
            "reference and moved must have the same shape, "
            f"got {tuple(reference.shape)} and {tuple(moved.shape)}"
        )
    if reference.device != moved.device:
        raise InputError(f"reference and moved are on different devices ({reference.device}, {moved.device})")
    s_y, s_x = reference.shape[-2:]
    if s_y < 4 or s_x < 4:
        raise InputError(f"crops must be at least 4 x 4 (acquired rows x readout samples), got {s_y} x {s_x}")
    rng = config.motion_range if search_range is None else search_range
    try:
        values = tuple(float(v) for v in rng)
    except (TypeError, ValueError) as exc:
        raise InputError(f"search_range must be 3 numbers (dx px, dy px, phi deg), got {rng!r}") from exc
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise InputError(
            f"search_range must be 3 finite non-negative numbers (dx px, dy px, phi deg), got {rng!r}"
        )
    if values[2] > 90.0:
        raise InputError(f"search_range: the rotation half-range must be <= 90 degrees, got {values[2]}")
    return values[0], values[1], values[2]


# ------------------------------------------------------------------------------------------- helpers
def _parabolic(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Offset in [-0.5, 0.5] (grid steps) of the vertex through ``scores[..., k-1:k+2]``; 0 at the ends."""
    n = scores.shape[-1]
    if n < 3:
        return torch.zeros(k.shape, dtype=scores.dtype, device=scores.device)
    kk = k.clamp(1, n - 2)
    y0 = scores.gather(-1, (kk - 1)[..., None])[..., 0]
    y1 = scores.gather(-1, kk[..., None])[..., 0]
    y2 = scores.gather(-1, (kk + 1)[..., None])[..., 0]
    den = y0 - 2 * y1 + y2
    off = torch.where(den < 0, 0.5 * (y0 - y2) / den.clamp_max(-1e-30), torch.zeros_like(den))
    return torch.where((k >= 1) & (k <= n - 2), off.clamp(-0.5, 0.5), torch.zeros_like(off))


def _steps(half_range: float, step: float, device: torch.device) -> torch.Tensor:
    """Symmetric grid ``-half_range ... half_range`` (float64) with spacing at most ``step``."""
    n = max(int(math.ceil(half_range / step - 1e-9)), 0)
    if n == 0:
        return torch.zeros(1, dtype=torch.float64, device=device)
    return torch.linspace(-half_range, half_range, 2 * n + 1, dtype=torch.float64, device=device)


def _spacing(grid: torch.Tensor) -> float:
    return float(grid[1] - grid[0]) if len(grid) > 1 else 0.0


def _argmax_refined(scores: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Parabolic peak of ``scores`` ``(B, n)`` on per-pair grids ``(B, n)`` (uniformly spaced)."""
    k = scores.argmax(-1)
    step = grid[:, 1] - grid[:, 0] if grid.shape[1] > 1 else torch.zeros_like(grid[:, 0])
    return grid.gather(1, k[:, None])[:, 0] + _parabolic(scores, k).to(torch.float64) * step


def _chunks(n: int, per_item: int) -> list[slice]:
    """Slices over ``n`` pairs, each holding about ``_BLOCK`` elements when one pair costs ``per_item``."""
    size = max(1, _BLOCK // max(per_item, 1))
    return [slice(i, i + size) for i in range(0, n, size)]


# ------------------------------------------------------------------------ step 1: magnitude rotation
def _gaussian_1d(sigma: float, device: torch.device) -> torch.Tensor:
    half = max(int(math.ceil(3 * sigma)), 1)
    t = torch.arange(-half, half + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _log_power(k: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """Smoothed log power spectrum ``(B, s_y, s_x)`` summed over coils (a scale only shifts it)."""
    power = (k.real**2 + k.imag**2).sum(1).to(torch.float32)
    floor = _LOG_FLOOR * power.mean((-2, -1), keepdim=True).clamp_min(1e-30)
    m = 0.5 * torch.log(power + floor)[:, None]
    sigma_cols = _SMOOTH_ROWS * geo.acceleration * geo.aspect
    for sigma, dim in ((_SMOOTH_ROWS, -2), (sigma_cols, -1)):
        kern = _gaussian_1d(sigma, m.device)
        half = (len(kern) - 1) // 2
        if dim == -2:
            m = F.conv2d(F.pad(m, (0, 0, half, half), mode="replicate"), kern.view(1, 1, -1, 1))
        else:
            m = F.conv2d(F.pad(m, (half, half, 0, 0), mode="replicate"), kern.view(1, 1, 1, -1))
    return m[:, 0]


class _MagnitudeRotation:
    """Normalised cross-correlation of smoothed log power spectra compared at rotated points."""

    def __init__(self, geo: _Geometry, phi_range: float) -> None:
        self.geo = geo
        # points that stay inside the crop (1-sample margin) for rotations up to +-range/2
        keep = torch.ones_like(geo.ky, dtype=torch.bool)
        for frac in (-0.5, -0.25, 0.25, 0.5):
            qy, qx = geo.rotate(torch.tensor(frac * phi_range, device=geo.ky.device), geo.ky, geo.kx)
            rows, cols = geo.rows_cols(qy, qx)
            keep &= (rows >= 1) & (rows <= geo.s_y - 2) & (cols >= 1) & (cols <= geo.s_x - 2)
        if int(keep.sum()) < 16:  # tiny crops or huge ranges: use everything (border padding)
            keep = torch.ones_like(keep)
        self.py, self.px = geo.ky[keep], geo.kx[keep]

    def _grid(self, angles: torch.Tensor) -> torch.Tensor:
        """``(n_a, P, 2)`` grid_sample coordinates of ``R(angle) p``."""
        qy, qx = self.geo.rotate(angles[:, None], self.py, self.px)
        rows, cols = self.geo.rows_cols(qy, qx)
        return torch.stack([cols / (self.geo.s_x - 1) * 2 - 1, rows / (self.geo.s_y - 1) * 2 - 1], -1)

    def scores(self, m_ref: torch.Tensor, m_mov: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """NCC ``(B, n_a)`` of ``m_mov(R(a/2) p)`` and ``m_ref(R(-a/2) p)`` for angles ``a`` ``(n_a,)``."""
        grid_mov, grid_ref = self._grid(angles / 2), self._grid(-angles / 2)
        out = torch.empty((m_ref.shape[0], len(angles)), dtype=torch.float32, device=m_ref.device)
        for sl in _chunks(m_ref.shape[0], grid_mov.numel()):
            b = m_ref[sl].shape[0]
            g = F.grid_sample(
                m_mov[sl, None], grid_mov.expand(b, -1, -1, -1), align_corners=True, padding_mode="border"
            )
            f = F.grid_sample(
                m_ref[sl, None], grid_ref.expand(b, -1, -1, -1), align_corners=True, padding_mode="border"
            )
            g = g[:, 0] - g[:, 0].mean(-1, keepdim=True)
            f = f[:, 0] - f[:, 0].mean(-1, keepdim=True)
            den = torch.sqrt((g * g).sum(-1) * (f * f).sum(-1)).clamp_min(1e-30)
            out[sl] = (g * f).sum(-1) / den
        return out

    def estimate(self, reference: torch.Tensor, moved: torch.Tensor, phi_range: float) -> torch.Tensor:
        """``(B,)`` float64 angles [deg]: grid search over ``+-phi_range`` and a parabolic fit."""
        m_ref, m_mov = _log_power(reference, self.geo), _log_power(moved, self.geo)
        grid = _steps(phi_range, _MAGNITUDE_STEP, m_ref.device)
        scores = self.scores(m_ref, m_mov, grid)
        phi = _argmax_refined(scores, grid.expand(len(scores), -1))
        return phi.clamp(-phi_range, phi_range)


# ------------------------------------------------------------------ steps 2-4: complex comparison
def _lanczos_weights(frac: torch.Tensor, taps: torch.Tensor, a: int) -> torch.Tensor:
    """Lanczos-``a`` weights ``(..., n_taps)`` of samples ``floor + taps`` at fractional offsets ``frac``.

    ``sinc(t) sinc(t / a)`` at ``t = frac - tap``, with the trigonometry done once per point.
    """
    t = frac[..., None] - taps
    u = math.pi * frac[..., None]
    ang = math.pi * taps / a
    sign = 1.0 - 2.0 * taps.remainder(2)  # (-1)^tap: sin(pi t) = (-1)^tap sin(pi frac)
    num = (a * torch.sin(u) * sign) * (torch.sin(u / a) * torch.cos(ang) - torch.cos(u / a) * torch.sin(ang))
    small = t.abs() < 1e-4
    w = torch.where(
        small, torch.ones_like(t), num / torch.where(small, torch.ones_like(t), (math.pi * t) ** 2)
    )
    return torch.where(t.abs() < a, w, torch.zeros_like(w))


@dataclass
class _Sampling:
    """Where ``F(R^-1 k)`` comes from for every moved-crop sample ``k`` and angle."""

    index: torch.Tensor
    """``(..., P)`` flat index ``row * s_x + first_tap_column`` into :meth:`_ComplexMatcher.unfold`."""
    weight: torch.Tensor
    """``(..., P, T)`` float32 tap weights (0 where ``R^-1 k`` leaves the crop)."""
    delta: torch.Tensor
    """``(..., P)`` float32 distance of ``R^-1 k`` to the row used, in acquired rows (0 ... 0.5)."""


class _ComplexMatcher:
    """Cross-power spectra at rotated points, phase-correlation surfaces and their peak heights."""

    def __init__(self, geo: _Geometry, t_range: tuple[float, float]) -> None:
        self.geo = geo
        dev = geo.ky.device
        n_y, n_x = geo.matrix
        self.ky_axis = (
            torch.arange(geo.s_y, dtype=torch.float64, device=dev) - geo.s_y // 2
        ) * geo.acceleration
        self.kx_axis = torch.arange(geo.s_x, dtype=torch.float64, device=dev) - geo.s_x // 2
        # Lanczos tap weights tabulated at _TABLE fractional offsets (position error <= 1 / (2 _TABLE))
        taps = torch.arange(1 - _LANCZOS_A, _LANCZOS_A + 1, dtype=torch.float64, device=dev)
        frac = torch.arange(_TABLE + 1, dtype=torch.float64, device=dev) / _TABLE
        table = _lanczos_weights(frac, taps, _LANCZOS_A)
        self.table = (table / table.sum(-1, keepdim=True)).to(torch.float32)
        # correlation peak widths in px are n / (extent of the sampled frequencies); grids resolve them
        self.step = (min(0.5, n_x / geo.s_x / 6), min(0.5, n_y / (geo.acceleration * geo.s_y) / 6))
        # dy is periodic with period n_y / R (the zero-filled image's replica): search within half of it
        self.t_range = (min(t_range[0], 0.5 * n_x), min(t_range[1], 0.5 * n_y / geo.acceleration - 1e-3))
        self.grid_x = _steps(self.t_range[0], self.step[0], dev)
        self.grid_y = _steps(self.t_range[1], self.step[1], dev)
        self.coarse = (self._e_y(self.grid_y), self._e_x(self.grid_x))

    # ---------------------------------------------------------------- sampling and cross-power
    def unfold(self, reference: torch.Tensor) -> torch.Tensor:
        """``(B, C, s_y * s_x, T)``: the ``T`` readout taps starting at every sample, zero beyond the crop."""
        n, n_c = reference.shape[:2]
        k = reference.reshape(n, n_c, self.geo.s_y, self.geo.s_x)
        pad_l = k.new_zeros((n, n_c, self.geo.s_y, _LANCZOS_A - 1))
        pad_r = k.new_zeros((n, n_c, self.geo.s_y, _LANCZOS_A))
        padded = torch.cat([pad_l, k, pad_r], -1)
        return padded.unfold(-1, 2 * _LANCZOS_A, 1).reshape(n, n_c, -1, 2 * _LANCZOS_A)

    def sampling(self, phi: torch.Tensor) -> _Sampling:
        """Taps for angles ``phi`` of any shape ``S``: fields ``S + (P,)`` and ``S + (P, T)``."""
        geo = self.geo
        qy, qx = geo.rotate(-phi[..., None], geo.ky, geo.kx)  # R^-1 k
        rows, cols = geo.rows_cols(qy, qx)
        r0 = rows.round()
        c0 = cols.floor()
        inside = (r0 >= 0) & (r0 <= geo.s_y - 1) & (cols >= 0) & (cols <= geo.s_x - 1)
        w = self.table[((cols - c0) * _TABLE).round().long()] * inside[..., None]
        index = r0.clamp(0, geo.s_y - 1).long() * geo.s_x + c0.clamp(0, geo.s_x - 1).long()
        return _Sampling(index, w, (rows - r0).abs())

    def cross_power(self, unfolded: torch.Tensor, moved: torch.Tensor, smp: _Sampling) -> torch.Tensor:
        """``X = sum_c G_c(k) conj(F_c(R^-1 k))`` ``(B, A, P)``.

        ``unfolded`` comes from :meth:`unfold`, ``moved`` is ``(B, C, P)``; ``smp`` holds ``A`` angles shared
        by all pairs (fields ``(A, P, ...)``) or per pair (``(B, A, P, ...)``).
        """
        n, n_c, _, n_t = unfolded.shape
        n_a, n_p = smp.index.shape[-2:]
        lead = 1 if smp.index.ndim == 2 else n
        index = smp.index.reshape(lead, 1, n_a * n_p, 1).expand(n, n_c, -1, n_t)
        vals = torch.gather(unfolded, 2, index).reshape(n, n_c, n_a, n_p, n_t)
        f_rot = (vals * smp.weight.reshape(lead, 1, n_a, n_p, n_t)).sum(-1)
        return (moved[:, :, None] * f_rot.conj()).sum(1)

    # ------------------------------------------------------------------------ correlation surfaces
    def _e_x(self, dxs: torch.Tensor) -> torch.Tensor:
        """``(..., s_x, n)`` factors ``exp(+2 pi i kx dx / n_x)``."""
        arg = (2 * math.pi / self.geo.matrix[1]) * self.kx_axis[:, None] * dxs[..., None, :]
        return torch.polar(torch.ones_like(arg), arg).to(torch.complex64)

    def _e_y(self, dys: torch.Tensor) -> torch.Tensor:
        """``(..., n, s_y)`` factors ``exp(+2 pi i ky dy / n_y)``."""
        arg = (2 * math.pi / self.geo.matrix[0]) * dys[..., :, None] * self.ky_axis
        return torch.polar(torch.ones_like(arg), arg).to(torch.complex64)

    @staticmethod
    def _separable(x: torch.Tensor, e_y: torch.Tensor, e_x: torch.Tensor) -> torch.Tensor:
        """``Re(e_y @ x @ e_x)`` ``(N, n_dy, n_dx)`` for shared ``e_y (n_dy, s_y)``, ``e_x (s_x, n_dx)``."""
        t = (x @ e_x).transpose(1, 2) @ e_y.transpose(0, 1)  # two plain matrix products
        return t.real.transpose(1, 2)

    def _local_surface(
        self,
        x: torch.Tensor,
        dy: torch.Tensor,
        dx: torch.Tensor,
        local_y: torch.Tensor,
        local_x: torch.Tensor,
    ) -> torch.Tensor:
        """Matched filter ``(N, n_y, n_x)`` at ``(dy + local_y, dx + local_x)`` around per-item ``(dy, dx)``.

        The per-item shift is a modulation of ``x``, so the local grids are shared matrix products.
        """
        ey = self._e_y(dy[:, None])[:, 0]  # (N, s_y)
        ex = self._e_x(dx[:, None])[..., 0]  # (N, s_x)
        return self._separable(x * ey[:, :, None] * ex[:, None, :], self._e_y(local_y), self._e_x(local_x))

    def translation(self, x: torch.Tensor, fine: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Peak ``(dx, dy)`` of the matched filter for whitened ``x`` ``(N, s_y, s_x)`` within the range.

        Coarse grid; with ``fine``, a 21 x 21 grid one coarse step around the peak and a parabolic fit.
        """
        surf = self._separable(x, *self.coarse)
        k = surf.flatten(1).argmax(1)
        n_gx = len(self.grid_x)
        dy, dx = self.grid_y[k // n_gx], self.grid_x[k % n_gx]
        if not fine:
            return dx, dy
        local = torch.linspace(-1.0, 1.0, 21, dtype=torch.float64, device=x.device)
        lx, ly = local * _spacing(self.grid_x), local * _spacing(self.grid_y)
        surf = self._local_surface(x, dy, dx, ly, lx)
        k = surf.flatten(1).argmax(1)
        iy, ix = k // len(local), k % len(local)
        along_x = surf.gather(1, iy[:, None, None].expand(-1, 1, len(local)))[:, 0]
        along_y = surf.gather(2, ix[:, None, None].expand(-1, len(local), 1))[..., 0]
        dx = _argmax_refined(along_x, dx[:, None] + lx)
        dy = _argmax_refined(along_y, dy[:, None] + ly)
        (rx, ry) = self.t_range
        return dx.clamp(-rx, rx), dy.clamp(-ry, ry)

    def coherence(
        self, x: torch.Tensor, norm: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor
    ) -> torch.Tensor:
        """Peak height ``max Re sum x e / norm`` on a small grid of +-1 coarse step around ``(dx, dy)``."""
        local = torch.linspace(-1.0, 1.0, _COHERENCE_GRID, dtype=torch.float64, device=x.device)
        surf = self._local_surface(x, dy, dx, local * self.step[1], local * self.step[0])
        return surf.flatten(1).max(1).values / norm.clamp_min(1e-30)

    # ----------------------------------------------------------------------------- estimators
    def _whitened(
        self, unfolded: torch.Tensor, moved: torch.Tensor, smp: _Sampling, width: float, sharp: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whitened, row-proximity weighted cross-power ``(B * A, s_y, s_x)`` and its normaliser."""
        x = self.cross_power(unfolded, moved, smp)
        d = smp.delta
        w = torch.exp(-0.5 * (d / width) ** 2) if sharp else 1.0 / (1.0 + (d / width) ** 2)
        root = x.abs().sqrt()
        xw = x * (w / root.clamp_min(1e-30))
        norm = (root * w).sum(-1)
        return xw.reshape(-1, self.geo.s_y, self.geo.s_x), norm.reshape(-1)

    def translate(
        self, reference: torch.Tensor, moved: torch.Tensor, phi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Translation ``(dx, dy)`` of every pair at its angle ``phi`` ``(B,)``."""
        n, n_c = reference.shape[:2]
        out = torch.empty((2, n), dtype=torch.float64, device=phi.device)
        for sl in _chunks(n, n_c * reference.shape[-1] * 2 * _LANCZOS_A):
            smp = self.sampling(phi[sl, None])
            xw, _ = self._whitened(
                self.unfold(reference[sl]), moved[sl], smp, _TRANS_WEIGHT_ROWS, sharp=False
            )
            out[0, sl], out[1, sl] = self.translation(xw)
        return out[0], out[1]

    def coherence_scores(
        self,
        reference: torch.Tensor,
        moved: torch.Tensor,
        angles: torch.Tensor,
        shift: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Rotation coherence ``(B, A)`` at ``angles`` (``(A,)`` shared or ``(B, A)`` per pair).

        The peak is searched near ``shift = (dx, dy)`` ``(B,)`` when given, else over the whole range.
        """
        n, n_c, n_p = reference.shape
        n_a = angles.shape[-1]
        shared = angles.ndim == 1
        smp_all = self.sampling(angles) if shared else None
        out = torch.empty((n, n_a), dtype=torch.float32, device=angles.device)
        for sl in _chunks(n, n_c * n_a * n_p * 2 * _LANCZOS_A):
            m = reference[sl].shape[0]
            smp = smp_all if smp_all is not None else self.sampling(angles[sl])
            unfolded = self.unfold(reference[sl])
            xc, norm = self._whitened(unfolded, moved[sl], smp, _COHERENCE_WEIGHT_ROWS, sharp=True)
            if shift is None:
                xt, _ = self._whitened(unfolded, moved[sl], smp, _TRANS_WEIGHT_ROWS, sharp=False)
                dx, dy = self.translation(xt, fine=False)
            else:
                dx, dy = (s[sl].repeat_interleave(n_a) for s in shift)
            out[sl] = self.coherence(xc, norm, dx, dy).reshape(m, n_a)
        return out


def _compress_coils(reference: torch.Tensor, moved: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project both crops ``(B, C, P)`` on the ``_MAX_VIRTUAL_COILS`` dominant coil modes of each pair."""
    n_c = reference.shape[1]
    if n_c <= _MAX_VIRTUAL_COILS:
        return reference, moved
    both = torch.cat([reference, moved], -1)
    _, vecs = torch.linalg.eigh(both @ both.conj().transpose(1, 2))  # ascending eigenvalues
    proj = vecs[..., -_MAX_VIRTUAL_COILS:].conj().transpose(1, 2)
    return proj @ reference, proj @ moved


# -------------------------------------------------------------------------------------------- public
def register_classical(
    reference: torch.Tensor,
    moved: torch.Tensor,
    config: StudyConfig,
    search_range: tuple[float, float, float] | None = None,
    *,
    refine: bool = True,
    initial: torch.Tensor | None = None,
) -> torch.Tensor:
    """Estimate the rigid in-plane motion between two under-sampled k-space crops (classical baseline).

    Parameters
    ----------
    reference, moved
        Complex crops ``(B, n_coils, s_y_crop, s_x_crop)`` as in :class:`~kmotion.simulation.study.PairBatch`:
        acquired rows only (full-grid rows ``n_ky // 2 + R * j``), consecutive readout samples.  A common
        real scale (standardisation) does not matter.
    config
        Study settings: ``matrix``, ``fov_mm`` (pixel spacing, physical rotation) and ``acceleration``;
        the crop size is taken from the data.
    search_range
        Known half-ranges ``(dx px, dy px, phi deg)`` the peak searches are restricted to; defaults to
        ``config.motion_range``.  A zero half-range fixes that parameter at 0.
    refine
        ``False``: the plain baseline (magnitude Fourier–Mellin rotation, then phase correlation) without
        the complex-coherence rotation search (step 4 of the module docstring).
    initial
        ``(B, 3)`` seed ``(dx, dy, phi)``, e.g. the network's estimate: its angle replaces the magnitude
        (Fourier–Mellin) estimate of step 1 as the extra candidate of the coherence search (step 4).

    Returns
    -------
    ``(B, 3)`` float32 ``dx`` [px], ``dy`` [px] of the encoded grid, ``phi`` [deg] (signs as in
    ``docs/conventions.md``), each within ``+-search_range``.

    Raises
    ------
    InputError
        Real, non-finite or mismatched inputs, a wrong number of dimensions, crops that do not fit the
        matrix, or an invalid search range.
    """
    rx, ry, rphi = _validate(reference, moved, config, search_range)
    n, _, s_y, s_x = reference.shape
    dev = reference.device
    geo = _geometry(config, s_y, s_x, dev)
    if n == 0:
        return torch.zeros((0, 3), dtype=torch.float32, device=dev)
    reference = reference.to(torch.complex64)
    moved = moved.to(torch.complex64)
    # one real scale per pair for both crops (conditioning only; nothing depends on it)
    scale = torch.sqrt((reference.abs() ** 2 + moved.abs() ** 2).mean((1, 2, 3)) / 2).clamp_min(1e-30)
    reference = reference / scale[:, None, None, None]
    moved = moved / scale[:, None, None, None]

    phi = torch.zeros(n, dtype=torch.float64, device=dev)
    ref_flat, mov_flat = _compress_coils(reference.flatten(2), moved.flatten(2))
    matcher = _ComplexMatcher(geo, (rx, ry))
    if initial is not None:
        if tuple(initial.shape) != (n, 3):
            raise InputError(f"initial: expected shape ({n}, 3) (dx, dy, phi), got {tuple(initial.shape)}")
        phi = initial[:, 2].to(dev, torch.float64).nan_to_num(0.0).clamp(-rphi, rphi)
    elif rphi > 0:
        phi = _MagnitudeRotation(geo, rphi).estimate(reference, moved, rphi)
    if rphi > 0 and refine:
        # coherence over the whole range (central part of the crops) and at the magnitude estimate
        gs = (min(s_y, _GLOBAL_CROP[0]), min(s_x, _GLOBAL_CROP[1]))
        oy, ox = s_y // 2 - gs[0] // 2, s_x // 2 - gs[1] // 2
        c_ref = ref_flat.reshape(n, -1, s_y, s_x)[..., oy : oy + gs[0], ox : ox + gs[1]].flatten(2)
        c_mov = mov_flat.reshape(n, -1, s_y, s_x)[..., oy : oy + gs[0], ox : ox + gs[1]].flatten(2)
        small = _ComplexMatcher(_geometry(config, gs[0], gs[1], dev), (rx, ry))
        grid = _steps(rphi, _GLOBAL_STEP, dev)
        candidates = torch.cat([grid.expand(n, -1), phi[:, None]], 1)
        scores = torch.cat(
            [small.coherence_scores(c_ref, c_mov, grid), small.coherence_scores(c_ref, c_mov, phi[:, None])],
            1,
        )
        phi = candidates.gather(1, scores.argmax(-1, keepdim=True))[:, 0]
        dx, dy = matcher.translate(ref_flat, mov_flat, phi)
        for half, step in _REFINE_PASSES:
            offsets = _steps(min(half, 2 * rphi), step, dev)
            candidates = phi[:, None] + offsets
            scores = matcher.coherence_scores(ref_flat, mov_flat, candidates, (dx, dy))
            phi = _argmax_refined(scores, candidates).clamp(-rphi, rphi)
    dx, dy = matcher.translate(ref_flat, mov_flat, phi)
    return torch.stack([dx, dy, phi], -1).to(torch.float32)
