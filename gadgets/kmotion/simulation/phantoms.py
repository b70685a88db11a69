"""Synthetic base images: head-like phantoms, band-limited coil sensitivities and complex noise.

Everything is batched torch code (CPU or CUDA) and deterministic given a ``torch.Generator`` or an
integer seed.  Random numbers are drawn on the generator's device (CPU for an integer seed or None)
and then moved to ``device``, so a seed gives the same images on CPU and CUDA up to rounding.

Geometry follows ``kmotion.physics.fft``: images ``(..., n_y, n_x)``, centred positions
``x = column - n_x // 2``, ``y = row - n_y // 2``, physical coordinates ``(x * dx_mm, y * dy_mm)`` with
pixel size ``fov_mm / shape``.  Phantoms are round in millimetres (non-square pixels included) and exactly
zero outside the circle of radius ``0.92 * min(fov_mm) / 2``.

Coil sensitivities are Fourier series with ``|m_x|, |m_y| <= half_width``::

    c(y, x) = sum_m c_m * exp(+2j*pi*(m_x * x / n_x + m_y * y / n_y))

so that, with the orthonormal centred FFT, ``fft2c(c * f)[k] = sum_m c_m * fft2c(f)[k - m]`` (circular).

Noise and SNR
-------------
``sigma`` is the standard deviation of the complex noise, ``E|n|^2 = sigma^2`` (real and imaginary
parts each ``sigma / sqrt(2)``).  The SNR of an image is::

    SNR = mean(|object| over its support) / sigma,
    support = pixels where |object| > 0.1 * max|object| (per image).

Because the FFT is orthonormal, the same ``sigma`` applies to k-space samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kmotion.physics.fft import centered_indices
from kmotion.physics.validate import InputError, check_complex

__all__ = [
    "PhantomConfig",
    "add_complex_noise",
    "coil_maps_from_coefficients",
    "make_coil_coefficients",
    "make_phantoms",
    "snr_sigma",
]

_SUPPORT_FRACTION = 0.92
"""Objects lie inside the circle of radius ``_SUPPORT_FRACTION * min(fov_mm) / 2``."""

GeneratorLike = torch.Generator | int | None


@dataclass
class PhantomConfig:
    """Random ranges for :func:`make_phantoms`; ``(lo, hi)`` pairs are sampled uniformly per image.

    Lengths are in mm unless said otherwise; intensities are before the per-image normalisation to a
    maximum magnitude of 1.
    """

    head_size: tuple[float, float] = (0.78, 0.97)
    """Long semi-axis of the head as a fraction of the largest allowed (inside the 0.92 circle)."""
    head_aspect: tuple[float, float] = (1.05, 1.3)
    """Long / short semi-axis of the head."""
    max_rotation_deg: float = 180.0
    """Head orientation uniform in ``[-max, max]`` degrees."""
    max_offset_mm: float = 12.0
    """Largest shift of the head centre (further limited so the head stays inside the circle)."""
    scalp_mm: tuple[float, float] = (2.5, 6.0)
    skull_mm: tuple[float, float] = (3.0, 7.0)
    csf_mm: tuple[float, float] = (1.5, 4.0)
    white_matter_fraction: tuple[float, float] = (0.6, 0.8)
    """White-matter ellipse relative to the brain ellipse."""
    fold_mm: tuple[float, float] = (1.0, 4.0)
    """Amplitude of the cortical folding (displacement of the grey/white and brain/CSF boundaries)."""
    fold_wavelength_mm: float = 14.0
    """Typical wavelength of the folding pattern."""
    scalp_intensity: tuple[float, float] = (0.5, 1.0)
    skull_intensity: tuple[float, float] = (0.02, 0.15)
    csf_intensity: tuple[float, float] = (0.05, 1.0)
    grey_intensity: tuple[float, float] = (0.35, 0.75)
    white_intensity: tuple[float, float] = (0.25, 0.9)
    ventricle_probability: float = 0.9
    n_blobs: tuple[int, int] = (2, 10)
    """Number of extra inner structures (inclusive range)."""
    blob_size_mm: tuple[float, float] = (2.0, 14.0)
    blob_contrast: tuple[float, float] = (0.08, 0.4)
    """Absolute intensity change of a structure; the sign is random (dark or bright)."""
    texture_strength: tuple[float, float] = (0.04, 0.18)
    """Relative standard deviation of the multi-scale intensity texture."""
    texture_exponent: tuple[float, float] = (0.7, 1.6)
    """Amplitude spectrum of the texture ~ |k| ** -exponent."""
    fine_texture: tuple[float, float] = (0.0, 0.04)
    """Relative standard deviation of pixel-scale detail."""
    phase_peak_to_peak: tuple[float, float] = (1.0, 4.0)
    """Peak-to-peak background phase over the support circle in radians (random quadratic polynomial)."""
    edge_px: float = 0.6
    """Sigmoid scale of tissue boundaries in pixels (the outer edge uses a compact equivalent)."""

    def __post_init__(self) -> None:
        for name in (
            "head_size",
            "head_aspect",
            "scalp_mm",
            "skull_mm",
            "csf_mm",
            "white_matter_fraction",
            "fold_mm",
            "scalp_intensity",
            "skull_intensity",
            "csf_intensity",
            "grey_intensity",
            "white_intensity",
            "n_blobs",
            "blob_size_mm",
            "blob_contrast",
            "texture_strength",
            "texture_exponent",
            "fine_texture",
            "phase_peak_to_peak",
        ):
            lo, hi = getattr(self, name)
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi or lo < 0:
                raise InputError(f"PhantomConfig.{name}: expected 0 <= lo <= hi, got {(lo, hi)}")
        if not 0 < self.head_size[1] <= 1:
            raise InputError(f"PhantomConfig.head_size: expected values in (0, 1], got {self.head_size}")
        if self.head_aspect[0] < 1:
            raise InputError(f"PhantomConfig.head_aspect: expected values >= 1, got {self.head_aspect}")
        if not 0 < self.white_matter_fraction[1] < 1:
            raise InputError(
                f"PhantomConfig.white_matter_fraction: expected values in (0, 1), got "
                f"{self.white_matter_fraction}"
            )
        if not 0 <= self.ventricle_probability <= 1:
            raise InputError(
                f"PhantomConfig.ventricle_probability: expected a value in [0, 1], got "
                f"{self.ventricle_probability}"
            )
        if self.edge_px <= 0 or self.fold_wavelength_mm <= 0:
            raise InputError(
                f"PhantomConfig.edge_px and fold_wavelength_mm must be positive, got {self.edge_px}, "
                f"{self.fold_wavelength_mm}"
            )


# --------------------------------------------------------------------------------------------------------
# argument checks and random numbers


def _check_count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    try:
        n_y, n_x = shape
    except (TypeError, ValueError):
        raise InputError(f"shape: expected (n_y, n_x), got {shape!r}") from None
    for n in (n_y, n_x):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"shape: expected two positive integers (n_y, n_x), got {shape!r}")
    return int(n_y), int(n_x)


def _check_fov(fov_mm: tuple[float, float]) -> tuple[float, float]:
    try:
        fy, fx = (float(v) for v in fov_mm)
    except (TypeError, ValueError):
        raise InputError(f"fov_mm: expected (fov_y_mm, fov_x_mm), got {fov_mm!r}") from None
    if not (math.isfinite(fy) and math.isfinite(fx) and fy > 0 and fx > 0):
        raise InputError(f"fov_mm: expected two positive finite lengths, got {fov_mm!r}")
    return fy, fx


def _as_generator(generator: GeneratorLike) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise InputError(f"generator: expected a torch.Generator, an int seed or None, got {generator!r}")
    g = torch.Generator()
    g.manual_seed(generator)
    return g


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) float32 drawn on the generator's device, then moved to ``device``."""
    return torch.rand(shape, generator=generator, device=_gen_device(generator)).to(device)


def _randn(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=_gen_device(generator), dtype=dtype).to(device)


def _uniform(u: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * u


def _grid_mm(
    shape: tuple[int, int], fov_mm: tuple[float, float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D physical coordinates (mm) of the rows ``(n_y,)`` and columns ``(n_x,)``."""
    n_y, n_x = shape
    y = centered_indices(n_y, device=device) * (fov_mm[0] / n_y)
    x = centered_indices(n_x, device=device) * (fov_mm[1] / n_x)
    return y, x


# --------------------------------------------------------------------------------------------------------
# phantoms


def _smoothstep_(t: torch.Tensor) -> torch.Tensor:
    """In place: clamp to [0, 1] and apply the quintic smoothstep ``t^3 (10 - 15 t + 6 t^2)`` (C2)."""
    t.clamp_(0.0, 1.0)
    t2 = t * t
    poly = t.mul(6.0).sub_(15.0).mul_(t).add_(10.0)
    return t.mul_(t2).mul_(poly)


def _render_local_ellipses(
    mag: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    theta: torch.Tensor,
    weight: torch.Tensor,
    pixel_mm: tuple[float, float],
    width_mm: float,
) -> None:
    """Add ``weight *`` soft ellipses to ``mag`` ``(B, n_y, n_x)`` in place, on small patches only.

    Ellipse parameters are ``(B, n)`` in mm (centre, semi-axes ``a`` along ``theta`` and ``b`` across).
    The edge is a compact quintic smoothstep of full width ``width_mm`` on the approximate signed
    distance ``(1 - rho^2) * sqrt(a b) / 2``, so each ellipse is exactly zero outside its patch.
    """
    B, n_y, n_x = mag.shape
    n = cx.shape[1]
    if n == 0:
        return
    dy, dx = pixel_mm
    dev = mag.device
    r_ab = torch.sqrt(a * b)
    # the smoothstep vanishes for rho^2 >= 1 + width / sqrt(ab): bound the patch by that ellipse
    extent = torch.maximum(a, b) * torch.sqrt(1.0 + width_mm / r_ab)
    half = float(extent.max()) + max(dy, dx)
    h_y, h_x = math.ceil(half / dy), math.ceil(half / dx)
    oy = torch.arange(-h_y, h_y + 1, device=dev)
    ox = torch.arange(-h_x, h_x + 1, device=dev)
    row0 = torch.round(cy / dy).long() + n_y // 2
    col0 = torch.round(cx / dx).long() + n_x // 2
    rows = row0.unsqueeze(-1) + oy  # (B, n, P_y)
    cols = col0.unsqueeze(-1) + ox  # (B, n, P_x)
    yy = ((rows - n_y // 2).float() * dy - cy.unsqueeze(-1)).unsqueeze(-1)  # (B, n, P_y, 1)
    xx = ((cols - n_x // 2).float() * dx - cx.unsqueeze(-1)).unsqueeze(-2)  # (B, n, 1, P_x)
    c = torch.cos(theta)[..., None, None]
    s = torch.sin(theta)[..., None, None]
    u = (xx * c + yy * s) / a[..., None, None]
    v = (yy * c - xx * s) / b[..., None, None]
    t = 1.0 - u * u - v * v
    t.mul_((r_ab / (2.0 * width_mm))[..., None, None]).add_(0.5)
    val = _smoothstep_(t).mul_(weight[..., None, None])
    ok = ((rows >= 0) & (rows < n_y)).unsqueeze(-1) & ((cols >= 0) & (cols < n_x)).unsqueeze(-2)
    val = torch.where(ok, val, torch.zeros((), device=dev))
    flat = rows.clamp(0, n_y - 1).unsqueeze(-1) * n_x + cols.clamp(0, n_x - 1).unsqueeze(-2)
    mag.view(B, -1).scatter_add_(1, flat.reshape(B, -1), val.reshape(B, -1))


def _texture_field(
    strength: torch.Tensor,
    exponent: torch.Tensor,
    fine: torch.Tensor,
    shape: tuple[int, int],
    pixel_mm: tuple[float, float],
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """``(B, n_y, n_x)`` real Gaussian field: power law ``|k|^-exponent`` plus white detail.

    The two parts have standard deviations about ``strength`` and ``fine`` (per image, ``(B,)``).
    Built with one batched inverse real FFT of uniform complex noise (Gaussian by the central limit).
    """
    n_y, n_x = shape
    B = strength.shape[0]
    ky = torch.fft.fftfreq(n_y, d=pixel_mm[0], device=device).view(-1, 1)
    kx = torch.fft.rfftfreq(n_x, d=pixel_mm[1], device=device).view(1, -1)
    k_min = 1.0 / max(n_y * pixel_mm[0], n_x * pixel_mm[1])
    log_k = torch.log(torch.sqrt(ky * ky + kx * kx).clamp_min(k_min))
    filt = torch.exp(log_k * -exponent.view(-1, 1, 1))  # (B, n_y, n_x // 2 + 1)
    filt[:, 0, 0] = 0.0
    rms = filt.square().mean(dim=(-2, -1), keepdim=True).sqrt_().clamp_min_(1e-12)
    filt.mul_(strength.view(-1, 1, 1) / rms).add_(fine.view(-1, 1, 1))
    filt[:, 0, 0] = 0.0
    filt.mul_(1.0 / math.sqrt(2.0))  # irfft2 of noise with E|N|^2 = 2 gives variance 2 mean(filt^2)
    noise = _rand((B, n_y, n_x // 2 + 1, 2), generator, device).sub_(0.5).mul_(math.sqrt(12.0))
    spec = torch.view_as_complex(noise) * filt
    return torch.fft.irfft2(spec, s=(n_y, n_x), norm="ortho")


def _fold_field(
    n_images: int,
    shape: tuple[int, int],
    fov_mm: tuple[float, float],
    wavelength_mm: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """``(B, n_y, n_x)`` band-pass random field (unit std, wavelength about ``wavelength_mm``).

    Made on a coarse grid (a few samples per wavelength) and upsampled bilinearly.
    """
    n_y, n_x = shape
    lo = [
        min(n, max(8, -(-n // 4), math.ceil(4.0 * f / wavelength_mm)))
        for n, f in zip(shape, fov_mm, strict=True)
    ]
    ky = torch.fft.fftfreq(lo[0], d=fov_mm[0] / lo[0], device=device).view(-1, 1)
    kx = torch.fft.fftfreq(lo[1], d=fov_mm[1] / lo[1], device=device).view(1, -1)
    k0 = 1.0 / wavelength_mm
    filt = torch.exp(-0.5 * ((torch.sqrt(ky * ky + kx * kx) - k0) / (0.35 * k0)) ** 2)
    filt[0, 0] = 0.0
    noise = _randn((n_images, lo[0], lo[1]), generator, device, torch.complex64)
    field = torch.fft.ifft2(noise * filt, norm="ortho").real
    field = field / field.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    if (lo[0], lo[1]) == (n_y, n_x):
        return field
    return F.interpolate(field.unsqueeze(1), size=(n_y, n_x), mode="bilinear", align_corners=False)[:, 0]


def make_phantoms(
    n_images: int,
    shape: tuple[int, int] = (448, 448),
    fov_mm: tuple[float, float] = (220.0, 220.0),
    config: PhantomConfig | None = None,
    generator: GeneratorLike = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Random head-like complex objects.

    Scalp, skull, CSF, folded grey and white matter, optional ventricles and random dark or bright inner
    structures, a multi-scale multiplicative texture and a smooth quadratic background phase.  Heads
    are round in mm, randomly sized, stretched, rotated and shifted, and exactly zero outside the circle
    of radius ``0.92 * min(fov_mm) / 2``.  Tissue boundaries are sigmoids of ``config.edge_px`` pixels;
    the outer edge and the small structures use a compactly supported smoothstep of the same slope.

    Parameters
    ----------
    n_images
        Number of phantoms.
    shape
        ``(n_y, n_x)`` matrix.
    fov_mm
        ``(fov_y, fov_x)`` field of view in mm; pixel size is ``fov_mm / shape``.
    config
        Random ranges (defaults: :class:`PhantomConfig`).
    generator
        ``torch.Generator`` or int seed (None: torch's global generator).
    device
        Where the images are built.

    Returns
    -------
    torch.Tensor
        ``(n_images, n_y, n_x)`` complex64, maximum magnitude 1 per image.
    """
    n_images = _check_count(n_images, "n_images")
    n_y, n_x = _check_shape(shape)
    fov = _check_fov(fov_mm)
    cfg = PhantomConfig() if config is None else config
    gen = _as_generator(generator)
    dev = torch.device(device)
    B = n_images

    dy, dx = fov[0] / n_y, fov[1] / n_x
    px = max(dy, dx)
    r_fov = min(fov) / 2
    r_support = _SUPPORT_FRACTION * r_fov
    w_sig = cfg.edge_px * px  # sigmoid scale (mm)
    w_out = 6.0 * w_sig  # full width of the compact smoothstep (same central slope as the sigmoid)

    uu = _rand((B, 32), gen, dev)
    cols = iter(uu.unbind(1))

    def draw(bounds: tuple[float, float]) -> torch.Tensor:
        return _uniform(next(cols), bounds)

    # ---- head: semi-axis a along theta, b across; |centre| + a + w_out <= r_support - px
    limit = r_support - px - w_out
    if limit <= 2 * w_out:
        raise InputError(f"shape: matrix {shape} is too coarse for a phantom in a FOV of {fov_mm} mm")
    a = draw(cfg.head_size) * limit
    b = a / draw(cfg.head_aspect)
    r_head = torch.sqrt(a * b)
    theta = draw((-1.0, 1.0)) * math.radians(cfg.max_rotation_deg)
    off_r = (limit - a).clamp(min=0.0, max=cfg.max_offset_mm) * torch.sqrt(next(cols))
    off_t = draw((0.0, 2 * math.pi))
    cx, cy = off_r * torch.cos(off_t), off_r * torch.sin(off_t)
    ct, st = torch.cos(theta), torch.sin(theta)

    # ---- nested layers: relative scales r_k of the head ellipse
    r_skull = 1.0 - draw(cfg.scalp_mm) / r_head
    r_csf = r_skull - draw(cfg.skull_mm) / r_head
    r_brain = (r_csf - draw(cfg.csf_mm) / r_head).clamp_min(0.2)
    r_white = r_brain * draw(cfg.white_matter_fraction)
    i_scalp = draw(cfg.scalp_intensity)
    i_skull = draw(cfg.skull_intensity)
    i_csf = draw(cfg.csf_intensity)
    i_grey = draw(cfg.grey_intensity)
    i_white = draw(cfg.white_intensity)
    layers = [  # (scale, intensity step, folded)
        (r_skull, i_skull - i_scalp, False),
        (r_csf, i_csf - i_skull, False),
        (r_brain, i_grey - i_csf, True),
        (r_white, i_white - i_grey, True),
    ]
    fold_amp = draw(cfg.fold_mm)
    tex_strength = draw(cfg.texture_strength)
    tex_exponent = draw(cfg.texture_exponent)
    fine = draw(cfg.fine_texture)
    has_vent = next(cols) < cfg.ventricle_probability
    n_blobs = torch.floor(draw((cfg.n_blobs[0], cfg.n_blobs[1] + 1 - 1e-4)))
    phase_pp = draw(cfg.phase_peak_to_peak)
    phase_0 = draw((-math.pi, math.pi))

    def to_image(pu: torch.Tensor, pv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head frame ``(B, n)`` (mm) -> image frame (mm)."""
        c, s = ct.unsqueeze(-1), st.unsqueeze(-1)
        return cx.unsqueeze(-1) + pu * c - pv * s, cy.unsqueeze(-1) + pu * s + pv * c

    # ---- normalised head radius rho^2 = (u / a)^2 + (v / b)^2, built from 1-D pieces
    yv, xv = _grid_mm((n_y, n_x), fov, dev)
    X = xv.view(1, 1, -1)
    Y = yv.view(1, -1, 1)
    B3 = (-1, 1, 1)
    ia, ib = (1.0 / a).view(B3), (1.0 / b).view(B3)
    cx3, cy3, ct3, st3 = cx.view(B3), cy.view(B3), ct.view(B3), st.view(B3)
    u_img = torch.add((X - cx3) * (ct3 * ia), (Y - cy3) * (st3 * ia))
    v_img = torch.add((Y - cy3) * (ct3 * ib), (X - cx3) * (-st3 * ib))
    rho2 = u_img.mul_(u_img).addcmul_(v_img, v_img)
    del v_img

    fold = _fold_field(B, (n_y, n_x), fov, cfg.fold_wavelength_mm, gen, dev)
    fold.mul_((fold_amp / w_sig).view(B3))

    # ---- nested sigmoid layers: arg = signed distance / w = (r^2 - rho^2) * R / (2 r w)
    mag = i_scalp.view(B3).expand(B, n_y, n_x).contiguous()
    buf = torch.empty_like(mag)
    for r_k, step, folded in layers:
        g = r_head / (2.0 * r_k * w_sig)
        torch.addcmul((r_k * r_k * g).view(B3), rho2, (-g).view(B3), out=buf)
        if folded:
            buf.add_(fold)
        mag.addcmul_(buf.sigmoid_(), step.view(B3))
    del fold

    # ---- ventricles (mirrored pair) and random inner structures, rendered on patches
    rb = r_head * r_brain
    v_len = draw((0.16, 0.30)) * rb
    v_wid = v_len * draw((0.2, 0.4))
    v_u = draw((-0.1, 0.1)) * rb
    v_v = draw((0.02, 0.06)) * rb + v_wid
    v_ang = draw((-0.35, 0.35))
    sgn = torch.tensor([1.0, -1.0], device=dev)
    vx, vy = to_image(v_u.unsqueeze(-1).expand(B, 2), v_v.unsqueeze(-1) * sgn)
    vent_w = torch.where(has_vent, i_csf - i_white, torch.zeros_like(i_csf)).unsqueeze(-1).expand(B, 2)
    _render_local_ellipses(
        mag,
        vx,
        vy,
        v_len.unsqueeze(-1).expand(B, 2),
        v_wid.unsqueeze(-1).expand(B, 2),
        theta.unsqueeze(-1) + v_ang.unsqueeze(-1) * sgn,
        vent_w,
        (dy, dx),
        w_out,
    )
    n_max = int(cfg.n_blobs[1])
    if n_max > 0:
        ub = _rand((B, n_max, 7), gen, dev)
        size = _uniform(ub[..., 0], cfg.blob_size_mm).clamp(min=2 * px, max=None)
        size = torch.minimum(size, 0.25 * rb.unsqueeze(-1))
        rr = 0.6 * torch.sqrt(ub[..., 1])
        ang = 2 * math.pi * ub[..., 2]
        bx, by = to_image(
            rr * torch.cos(ang) * (a * r_brain).unsqueeze(-1),
            rr * torch.sin(ang) * (b * r_brain).unsqueeze(-1),
        )
        used = torch.arange(n_max, device=dev) < n_blobs.unsqueeze(-1)
        sign = torch.where(ub[..., 4] < 0.5, -1.0, 1.0)
        w_b = torch.where(used, sign * _uniform(ub[..., 5], cfg.blob_contrast), torch.zeros((), device=dev))
        _render_local_ellipses(
            mag,
            bx,
            by,
            size,
            size / _uniform(ub[..., 6], (1.0, 2.5)),
            math.pi * ub[..., 3],
            w_b,
            (dy, dx),
            w_out,
        )

    # ---- compact outer edge: smoothstep of the signed distance to the head ellipse
    torch.addcmul((r_head / (2.0 * w_out) + 0.5).view(B3), rho2, (-r_head / (2.0 * w_out)).view(B3), out=buf)
    mag.clamp_min_(0.0).mul_(_smoothstep_(buf))
    del rho2

    # ---- multiplicative texture (power law over all scales + pixel detail)
    tex = _texture_field(tex_strength, tex_exponent, fine, (n_y, n_x), (dy, dx), gen, dev)
    mag.mul_(tex.add_(1.0).clamp_min_(0.0))
    del tex

    # hard guarantee of the support circle (already zero there by construction), max magnitude 1
    outside = (X * X + Y * Y) > r_support**2
    mag.masked_fill_(outside, 0.0)
    mag.div_(mag.flatten(1).amax(dim=1).clamp_min(1e-12).view(B3))

    # ---- smooth background phase: constant + linear + quadratic in x / R, y / R, bounded peak-to-peak
    # coefficients on [x, y, x^2, y^2, x y] (x, y in units of the support radius), scaled to the
    # requested peak-to-peak over the support disc (measured on a fixed polar sample of the disc)
    pc = 2 * _rand((B, 5), gen, dev) - 1
    rs, ts = torch.meshgrid(
        torch.linspace(0.0, 1.0, 9, device=dev),
        torch.linspace(0.0, 2 * math.pi, 33, device=dev)[:-1],
        indexing="ij",
    )
    xs, ys = (rs * torch.cos(ts)).flatten(), (rs * torch.sin(ts)).flatten()
    poly = pc @ torch.stack([xs, ys, xs * xs, ys * ys, xs * ys])
    pp = (poly.amax(dim=1) - poly.amin(dim=1)).clamp_min(1e-6)
    pc = pc * (phase_pp / pp).unsqueeze(-1)
    xn, yn = X / r_support, Y / r_support
    phase = torch.add(
        (pc[:, 0].view(B3) * xn + pc[:, 2].view(B3) * xn * xn) + phase_0.view(B3),
        pc[:, 1].view(B3) * yn + pc[:, 3].view(B3) * yn * yn,
    )
    phase.addcmul_(pc[:, 4].view(B3) * yn, xn)
    re = torch.cos(phase).mul_(mag)
    im = phase.sin_().mul_(mag)
    return torch.complex(re, im)


# --------------------------------------------------------------------------------------------------------
# coil sensitivities


def _check_half_width(half_width: int, shape: tuple[int, int]) -> int:
    if isinstance(half_width, bool) or not isinstance(half_width, int) or half_width < 0:
        raise InputError(f"half_width: expected a non-negative integer, got {half_width!r}")
    if 2 * half_width + 1 > min(shape):
        raise InputError(
            f"half_width: 2 * half_width + 1 = {2 * half_width + 1} exceeds the matrix {shape} "
            f"(half_width={half_width})"
        )
    return half_width


def _fourier_matrix(n: int, half_width: int, sign: float, device: torch.device) -> torch.Tensor:
    """``(n, 2M+1)`` complex64 ``exp(sign * 2j*pi * m * p / n)`` for centred positions ``p``, ``|m| <= M``."""
    p = centered_indices(n, device=device, dtype=torch.float64).view(-1, 1)
    m = torch.arange(-half_width, half_width + 1, device=device, dtype=torch.float64).view(1, -1)
    phase = (2 * math.pi / n) * torch.remainder(p * m, n)  # exact integer product, reduced mod n
    return torch.polar(torch.ones_like(phase), sign * phase).to(torch.complex64)


def _coil_profiles(
    n_images: int,
    n_coils: int,
    shape: tuple[int, int],
    fov_mm: tuple[float, float],
    generator: torch.Generator | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable raw coil maps on the image grid: ``map = prof_y[..., :, None] * prof_x[..., None, :]``.

    Coils sit on a circle around the head (random global rotation, small jitter, radius 0.6-0.8 of
    ``min(fov_mm) / 2``); each map is a Gaussian bump in mm around its coil times a random constant and
    linear phase (at most half a cycle across the FOV per axis).  Returns ``prof_y`` ``(B, C, n_y)`` and
    ``prof_x`` ``(B, C, n_x)`` complex64 (the constant phase is in ``prof_y``).
    """
    B, C = n_images, n_coils
    r_fov = min(fov_mm) / 2
    u = _rand((B, C, 7), generator, device)
    rot = 2 * math.pi * _rand((B, 1), generator, device)
    angle = rot + (2 * math.pi / C) * (torch.arange(C, device=device) + 0.3 * (u[..., 0] - 0.5))
    radius = _uniform(u[..., 1], (0.6, 0.8)) * r_fov
    width = _uniform(u[..., 2], (0.45, 0.75)) * r_fov
    grad_y = (2 * u[..., 3] - 1) * (math.pi / fov_mm[0])  # rad / mm
    grad_x = (2 * u[..., 4] - 1) * (math.pi / fov_mm[1])
    phase0 = 2 * math.pi * u[..., 5]
    amp = _uniform(u[..., 6], (0.7, 1.0))
    yv, xv = _grid_mm(shape, fov_mm, device)

    def profile(
        pos: torch.Tensor, centre: torch.Tensor, grad: torch.Tensor, const: torch.Tensor
    ) -> torch.Tensor:
        d = pos - centre.unsqueeze(-1)
        mag = torch.exp(-0.5 * (d / width.unsqueeze(-1)) ** 2)
        return torch.polar(mag, grad.unsqueeze(-1) * pos + const.unsqueeze(-1))

    prof_y = profile(yv, radius * torch.sin(angle), grad_y, phase0) * amp.unsqueeze(-1)
    prof_x = profile(xv, radius * torch.cos(angle), grad_x, torch.zeros_like(phase0))
    return prof_y.to(torch.complex64), prof_x.to(torch.complex64)


def _band_coefficients(prof_y: torch.Tensor, prof_x: torch.Tensor, half_width: int) -> torch.Tensor:
    """Central DFT coefficients of the separable map: ``fft2c(map)[centre +- M] / sqrt(n_y * n_x)``."""
    n_y, n_x = prof_y.shape[-1], prof_x.shape[-1]
    dev = prof_y.device
    cy = prof_y @ _fourier_matrix(n_y, half_width, -1.0, dev) / n_y  # (B, C, 2M+1) over m_y
    cx = prof_x @ _fourier_matrix(n_x, half_width, -1.0, dev) / n_x
    return cy.unsqueeze(-1) * cx.unsqueeze(-2)


def make_coil_coefficients(
    n_images: int,
    n_coils: int,
    shape: tuple[int, int],
    fov_mm: tuple[float, float] = (220.0, 220.0),
    half_width: int = 4,
    generator: GeneratorLike = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Random band-limited coil sensitivities as Fourier coefficients.

    Coils lie on a circle around the head (radius 0.6-0.8 of ``min(fov_mm) / 2``, random rotation),
    each a Gaussian bump in mm with a random constant + linear phase, computed on the image grid and
    projected onto ``|m_x|, |m_y| <= half_width`` by keeping the central DFT coefficients
    (``fft2c(map) / sqrt(n_y * n_x)``).  All coils of an image are then scaled by one real number so
    that the root-sum-of-squares over coils, averaged over the inscribed circle (radius
    ``min(fov_mm) / 2`` in mm), is 1.

    Parameters
    ----------
    n_images, n_coils
        Batch size and number of coils.
    shape
        ``(n_y, n_x)`` image matrix (``2 * half_width + 1 <= min(shape)``).
    fov_mm
        ``(fov_y, fov_x)`` in mm.
    half_width
        Band limit ``M``.
    generator
        ``torch.Generator`` or int seed (None: torch's global generator).
    device
        Where the result lives.

    Returns
    -------
    torch.Tensor
        ``(n_images, n_coils, 2M+1, 2M+1)`` complex64; ``[..., M + m_y, M + m_x]`` is ``c_m`` of
        ``c(y, x) = sum_m c_m exp(+2j*pi*(m_x x / n_x + m_y y / n_y))``.
    """
    n_images = _check_count(n_images, "n_images")
    n_coils = _check_count(n_coils, "n_coils")
    shape = _check_shape(shape)
    fov = _check_fov(fov_mm)
    half_width = _check_half_width(half_width, shape)
    gen = _as_generator(generator)
    dev = torch.device(device)

    prof_y, prof_x = _coil_profiles(n_images, n_coils, shape, fov, gen, dev)
    coef = _band_coefficients(prof_y, prof_x, half_width)

    # root-sum-of-squares of the band-limited maps averaged over the inscribed circle; the maps are
    # band-limited (|m| <= M), so a coarse grid of <= 64 x 64 positions over the FOV gives the average
    n_c = [min(n, 64) for n in shape]
    pos = [
        (torch.arange(nc, device=dev, dtype=torch.float64) - nc // 2) * (n / nc)
        for n, nc in zip(shape, n_c, strict=True)
    ]
    m = torch.arange(-half_width, half_width + 1, device=dev, dtype=torch.float64)
    e_y, e_x = (
        torch.polar(
            torch.ones(len(p), len(m), device=dev, dtype=torch.float64), 2 * math.pi * p[:, None] * m / n
        ).to(torch.complex64)
        for p, n in zip(pos, shape, strict=True)
    )
    yv = pos[0] * (fov[0] / shape[0])
    xv = pos[1] * (fov[1] / shape[1])
    disc = (yv.view(-1, 1) ** 2 + xv.view(1, -1) ** 2) <= (min(fov) / 2) ** 2
    maps = e_y @ coef @ e_x.T  # (n_images, n_coils, n_cy, n_cx)
    rss = maps.abs().square().sum(1).sqrt()
    mean_rss = (rss * disc).sum(dim=(-2, -1)) / disc.sum()
    return coef / mean_rss.clamp_min(1e-12).view(-1, 1, 1, 1)


def coil_maps_from_coefficients(coefficients: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Coil maps on the image grid from their Fourier coefficients.

    Parameters
    ----------
    coefficients
        ``(..., 2M+1, 2M+1)`` complex, as returned by :func:`make_coil_coefficients`.
    shape
        ``(n_y, n_x)``.

    Returns
    -------
    torch.Tensor
        ``(..., n_y, n_x)`` complex64 ``c(y, x) = sum_m c_m exp(+2j*pi*(m_x x / n_x + m_y y / n_y))``.
    """
    coef = check_complex(coefficients, "coefficients", min_ndim=2).to(torch.complex64)
    n_y, n_x = _check_shape(shape)
    size = coef.shape[-1]
    if coef.shape[-2] != size or size % 2 != 1:
        raise InputError(
            f"coefficients: expected square odd (2M+1, 2M+1) last two axes, got shape {tuple(coef.shape)}"
        )
    half_width = size // 2
    e_y = _fourier_matrix(n_y, half_width, 1.0, coef.device)
    e_x_t = _fourier_matrix(n_x, half_width, 1.0, coef.device).T
    return e_y @ coef @ e_x_t


# --------------------------------------------------------------------------------------------------------
# noise


def snr_sigma(objects: torch.Tensor, snr: float | torch.Tensor) -> torch.Tensor:
    """Complex noise standard deviation per image for a given SNR (definition in the module docstring).

    Parameters
    ----------
    objects
        ``(..., n_y, n_x)`` images (complex or real).
    snr
        Positive SNR, a number or a tensor broadcastable to ``objects.shape[:-2]``.

    Returns
    -------
    torch.Tensor
        ``objects.shape[:-2]`` float32: ``mean(|object| over |object| > 0.1 max|object|) / snr``.
    """
    x = check_complex(objects, "objects", min_ndim=2)
    snr_t = torch.as_tensor(snr, dtype=torch.float32, device=x.device)
    if not bool(torch.isfinite(snr_t).all()) or bool((snr_t <= 0).any()):
        raise InputError(f"snr: expected positive finite values, got {snr!r}")
    mag = x.abs().float().flatten(-2)
    peak = mag.amax(dim=-1, keepdim=True)
    if bool((peak <= 0).any()):
        raise InputError("objects: an image is all zero, its SNR is undefined")
    support = mag > 0.1 * peak
    mean = (mag * support).sum(dim=-1) / support.sum(dim=-1)
    return mean / snr_t


def add_complex_noise(
    x: torch.Tensor, sigma: float | torch.Tensor, generator: GeneratorLike = None
) -> torch.Tensor:
    """Add circular complex Gaussian noise with ``E|n|^2 = sigma^2`` (real and imaginary ``sigma / sqrt 2``).

    Parameters
    ----------
    x
        ``(B, ...)`` complex images or k-space.
    sigma
        A number or a tensor whose shape matches the leading dims of ``x`` (e.g. ``(B,)``); it is
        broadcast over the remaining trailing dims.
    generator
        ``torch.Generator`` or int seed (None: torch's global generator).

    Returns
    -------
    torch.Tensor
        ``x + noise`` with the dtype of ``x`` (complex; real input is promoted to complex64).
    """
    x = check_complex(x, "x", min_ndim=1)
    sig = torch.as_tensor(sigma, device=x.device)
    if sig.is_complex() or not bool(torch.isfinite(sig).all()) or bool((sig < 0).any()):
        raise InputError(f"sigma: expected non-negative finite real values, got {sigma!r}")
    if sig.ndim > x.ndim or tuple(sig.shape) != tuple(x.shape[: sig.ndim]) and sig.ndim > 0:
        raise InputError(f"sigma: shape {tuple(sig.shape)} must match the leading dims of x {tuple(x.shape)}")
    sig = sig.to(x.real.dtype).reshape(tuple(sig.shape) + (1,) * (x.ndim - sig.ndim))
    gen = _as_generator(generator)
    noise = _randn(tuple(x.shape), gen, x.device, x.dtype)
    return x + sig * noise
