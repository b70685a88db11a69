"""The study's training/validation pair simulation (the abstract's "data creation"), batched and fast.

Pipeline per pair (all in torch, no per-sample Python loops):

1. a base object ``f`` (``(n_ch, n_y, n_x)``; synthetic phantoms or users' raw data),
2. motion ``dx, dy ~ U[-range, range]`` px and ``phi ~ U[-range, range]`` degrees,
3. reference k-space ``F`` and moved k-space ``G(k) = ramp(k) * F(R(phi)^-1 k)`` (conventions in
   ``docs/conventions.md``); with coil sensitivities (coils do not move) ``G_c = conv(G, c_c)``,
4. every second row removed, central crop ``(s_y_crop, s_x_crop)`` of the acquired rows,
5. optional complex Gaussian noise, per-sample standardisation (one real scale for both crops),
6. 4 real channels per coil (Re/Im reference, Re/Im moved); targets = the 6-vector / ``target_scale``.

Fast path: the base image's spectrum is computed once on an oversampled central grid
(:class:`kmotion.physics.nufft.CentralSpectrum`) and evaluated only at the few thousand rotated k-space
points of the crop.  :func:`simulate_image_domain` is the straightforward version (band-limited rotation
of the image, full FFTs) that the fast one is tested against.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from kmotion.physics.fft import fft2c
from kmotion.physics.motion import apply_motion_image, to_six_vector
from kmotion.physics.nufft import CentralSpectrum
from kmotion.physics.sampling import crop_row_indices, crop_undersampled
from kmotion.physics.standardise import standardise_pair, to_channels
from kmotion.physics.validate import InputError, check_complex


@dataclass
class StudyConfig:
    """Settings of the simulated study; defaults are the abstract's (matrix 448, FOV 220 mm, R=2, ±12)."""

    matrix: tuple[int, int] = (448, 448)
    """Encoded matrix ``(n_y, n_x)`` (phase encoding, readout)."""
    fov_mm: tuple[float, float] = (220.0, 220.0)
    """Field of view ``(FOV_y, FOV_x)`` in mm."""
    motion_range: tuple[float, float, float] = (12.0, 12.0, 12.0)
    """Half-widths of the uniform motion distribution: dx [px], dy [px], phi [deg]."""
    target_margin: float = 1.1
    """Targets are motion / (range * margin), so the range edge is not on tanh's asymptote."""
    acceleration: int = 2
    """Keep every ``acceleration``-th row (centre line always kept)."""
    crop: tuple[int, int] = (64, 64)
    """Central crop ``(s_y_crop, s_x_crop)``: acquired rows x readout samples."""
    n_coils: int = 1
    """Receive coils for synthetic objects (1: no sensitivities)."""
    coil_half_width: int = 4
    """Coil maps are Fourier series with ``|m| <= coil_half_width``."""
    snr: float | None = None
    """Complex Gaussian noise at this SNR (definition in ``kmotion.simulation.phantoms``); None: no noise."""
    snr_range: tuple[float, float] | None = None
    """Per base image SNR drawn log-uniformly from this range (overrides ``snr``; training variety)."""
    virtual_coils: int = 0
    """Compress the coils to this many virtual coils (SVD of the reference crop, same weights for the moved
    crop; 0 = off) before standardisation: one network then serves any coil count."""
    standardise: bool = True
    kernel_width: int = 5
    """Interpolation kernel taps of the fast path (accuracy vs. speed, see ``kmotion.physics.nufft``)."""
    pairs_per_base: int = 16
    """Pairs drawn from each base image."""

    def __post_init__(self) -> None:
        self.matrix = (int(self.matrix[0]), int(self.matrix[1]))
        self.fov_mm = (float(self.fov_mm[0]), float(self.fov_mm[1]))
        self.motion_range = tuple(float(r) for r in self.motion_range)  # type: ignore[assignment]
        self.crop = (int(self.crop[0]), int(self.crop[1]))
        if min(self.matrix) < 2:
            raise InputError(f"StudyConfig.matrix must be >= 2 in each axis, got {self.matrix}")
        if min(self.fov_mm) <= 0:
            raise InputError(f"StudyConfig.fov_mm must be positive, got {self.fov_mm}")
        if len(self.motion_range) != 3 or min(self.motion_range) < 0:
            raise InputError(
                f"StudyConfig.motion_range must be 3 non-negative values, got {self.motion_range}"
            )
        if self.acceleration < 1:
            raise InputError(f"StudyConfig.acceleration must be >= 1, got {self.acceleration}")
        if self.n_coils < 1 or self.pairs_per_base < 1:
            raise InputError(
                "StudyConfig.n_coils and pairs_per_base must be >= 1, "
                f"got {self.n_coils}, {self.pairs_per_base}"
            )
        if self.snr_range is not None:
            self.snr_range = (float(self.snr_range[0]), float(self.snr_range[1]))
            if not 0 < self.snr_range[0] <= self.snr_range[1]:
                raise InputError(f"StudyConfig.snr_range must be 0 < low <= high, got {self.snr_range}")
        if self.virtual_coils < 0:
            raise InputError(f"StudyConfig.virtual_coils must be >= 0, got {self.virtual_coils}")
        if self.snr is not None and self.snr <= 0:
            raise InputError(f"StudyConfig.snr must be positive or None, got {self.snr}")
        n_y, n_x = self.matrix
        s_y, s_x = self.crop
        if s_x < 1 or s_x > n_x:
            raise InputError(f"StudyConfig.crop: s_x_crop={s_x} must be in [1, n_x={n_x}]")
        crop_row_indices(n_y, s_y, self.acceleration)  # raises if the rows do not fit

    @property
    def pixel_spacing_mm(self) -> tuple[float, float]:
        """``(dy_mm, dx_mm)`` of the encoded grid."""
        return self.fov_mm[0] / self.matrix[0], self.fov_mm[1] / self.matrix[1]

    def target_scale(self) -> torch.Tensor:
        """Divisor of the 6-vector ``(dx, dy, dz, phi_x, phi_y, phi_z)``; 1 for the zeroed entries."""
        rx, ry, rphi = (max(r, 1e-6) * self.target_margin for r in self.motion_range)
        return torch.tensor([rx, ry, 1.0, 1.0, 1.0, rphi], dtype=torch.float32)

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly dict (for model configs and provenance)."""
        return asdict(self)


@dataclass
class PairBatch:
    """A batch of simulated pairs."""

    inputs: torch.Tensor
    """``(B, 4 * n_coils, s_y_crop, s_x_crop)`` float32 network input."""
    targets: torch.Tensor
    """``(B, 6)`` float32: the 6-vector divided by ``StudyConfig.target_scale()``."""
    motion: torch.Tensor
    """``(B, 3)`` float32: dx [px], dy [px], phi [deg]."""
    reference: torch.Tensor
    """``(B, n_coils, s_y_crop, s_x_crop)`` complex64 crop (after noise and standardisation)."""
    moved: torch.Tensor
    base_index: torch.Tensor
    """``(B,)`` index of the base image of each pair."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def draw_motion(
    n_pairs: int,
    motion_range: tuple[float, float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``(n_pairs, 3)`` float64 motions, uniform in ``[-range, range]`` per parameter."""
    u = torch.rand(n_pairs, 3, generator=generator, dtype=torch.float64)
    return ((2 * u - 1) * torch.tensor(motion_range, dtype=torch.float64)).to(device)


def _crop_frequencies(cfg: StudyConfig, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer frequencies (ky, kx) of the crop; with ``pad > 0`` the padded, fully sampled block."""
    n_y, n_x = cfg.matrix
    s_y, s_x = cfg.crop
    rows = crop_row_indices(n_y, s_y, cfg.acceleration) - n_y // 2
    kx = torch.arange(s_x) - s_x // 2
    if pad:
        ky = torch.arange(int(rows[0]) - pad, int(rows[-1]) + pad + 1)
        kx = torch.arange(int(kx[0]) - pad, int(kx[-1]) + pad + 1)
    else:
        ky = rows
    return ky.to(torch.float64), kx.to(torch.float64)


class StudySimulator:
    """Fast batched simulation of (reference, moved) crop pairs for one :class:`StudyConfig`.

    Parameters
    ----------
    config
        Study settings.
    device
        Where the simulation runs (``"cpu"`` or ``"cuda"``).
    """

    def __init__(self, config: StudyConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        cfg = config
        self.pad = cfg.coil_half_width if cfg.n_coils > 1 else 0
        ky, kx = _crop_frequencies(cfg, self.pad)
        self.ky, self.kx = ky.to(self.device), kx.to(self.device)
        fy, fx = cfg.fov_mm
        # rotated points stay within the disc of the crop corner's physical radius
        r_phys = math.hypot(float(ky.abs().max()) / fy, float(kx.abs().max()) / fx)
        k_max = (r_phys * fy + 1.0, r_phys * fx + 1.0)
        self.spectrum = CentralSpectrum(cfg.matrix, k_max, width=cfg.kernel_width, device=self.device)
        n_y, _ = cfg.matrix
        # exact DFT rows/cols for the (unmoved) reference crop
        rows = crop_row_indices(n_y, cfg.crop[0], cfg.acceleration) - n_y // 2
        self._ref_mats = (
            _dft_matrix(rows.to(torch.float64), cfg.matrix[0]).to(self.device),
            _dft_matrix(_crop_frequencies(cfg, 0)[1], cfg.matrix[1]).to(self.device),
        )
        # with fixed coils: exact DFT rows/cols of the padded, fully sampled block around the crop
        self._block_mats = (
            (_dft_matrix(ky, cfg.matrix[0]).to(self.device), _dft_matrix(kx, cfg.matrix[1]).to(self.device))
            if self.pad
            else self._ref_mats
        )

    # ------------------------------------------------------------------ core
    def simulate(
        self,
        objects: torch.Tensor,
        motion: torch.Tensor,
        base_index: torch.Tensor,
        coil_coefficients: torch.Tensor | None = None,
        noise_sigma: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PairBatch:
        """Simulate pairs from given base objects and motions.

        Parameters
        ----------
        objects
            ``(n_base, n_ch, n_y, n_x)`` complex base images.  With ``coil_coefficients`` ``n_ch`` must be 1
            (one object seen by fixed coils); otherwise every channel moves (e.g. coil images of raw data).
        motion
            ``(B, 3)`` dx [px], dy [px], phi [deg].
        base_index
            ``(B,)`` base image of each pair.
        coil_coefficients
            ``(n_base, n_coils, 2M+1, 2M+1)`` Fourier coefficients of fixed coil maps (see
            ``kmotion.simulation.phantoms``), or None.
        noise_sigma
            ``(n_base,)`` complex noise standard deviation per base image, or None.
        """
        cfg = self.config
        if objects.ndim != 4 or tuple(objects.shape[-2:]) != cfg.matrix:
            raise InputError(
                f"objects: expected shape (n_base, n_ch, {cfg.matrix[0]}, {cfg.matrix[1]}), "
                f"got {tuple(objects.shape)}"
            )
        dev = self.device
        objects = check_complex(objects, "objects", min_ndim=4).to(dev, torch.complex64)
        motion = motion.to(dev, torch.float64)
        base_index = base_index.to(dev)
        n_pairs = motion.shape[0]
        s_y, s_x = cfg.crop
        spectra = self.spectrum.spectra(objects)  # (n_base, n_ch, nfy, nfx)

        # rotated frequencies q = R(phi)^-1 k, in physical units then back to index units
        fy, fx = cfg.fov_mm
        ky = self.ky[:, None].expand(-1, len(self.kx)).reshape(-1)
        kx = self.kx[None, :].expand(len(self.ky), -1).reshape(-1)
        rad = motion[:, 2:3] * (math.pi / 180.0)
        c, s = torch.cos(rad), torch.sin(rad)
        qx = c * kx + s * ky * (fx / fy)
        qy = -s * kx * (fy / fx) + c * ky
        values = self.spectrum.evaluate(spectra, base_index, qy, qx)  # (B, n_ch, P)
        n_y, n_x = cfg.matrix
        ramp_arg = motion[:, 0:1] * kx / n_x + motion[:, 1:2] * ky / n_y
        ramp = torch.polar(torch.ones_like(ramp_arg), -2 * math.pi * ramp_arg).to(torch.complex64)
        moved = (values * ramp[:, None]).reshape(n_pairs, -1, len(self.ky), len(self.kx))

        a_y, a_x = self._ref_mats
        if coil_coefficients is not None:
            if objects.shape[1] != 1:
                raise InputError(
                    f"objects: with coil coefficients expected 1 channel, got {objects.shape[1]}"
                )
            coef = coil_coefficients.to(dev, torch.complex64)[base_index]  # (B, C, 2M+1, 2M+1)
            moved = _apply_coils(moved[:, 0], coef, cfg.acceleration)
            # reference: the same coil convolution on the exact (unmoved) spectrum
            a_yb, a_xb = self._block_mats
            ref_block = a_yb @ objects[:, 0] @ a_xb.transpose(0, 1)  # (n_base, Ly, Lx)
            ref = _apply_coils(ref_block[base_index], coef, cfg.acceleration)
        else:
            ref = (a_y @ objects @ a_x.transpose(0, 1))[base_index]  # (B, n_ch, s_y, s_x)
        ref = ref[..., :s_y, :s_x]
        moved = moved[..., :s_y, :s_x]

        if noise_sigma is not None:
            # complex randn has E|n|^2 = 1, so sigma scales it directly
            sig = noise_sigma.to(dev, torch.float32)[base_index].reshape(-1, 1, 1, 1)
            ref = ref + sig * torch.randn(ref.shape, dtype=torch.complex64, generator=generator).to(dev)
            moved = moved + sig * torch.randn(moved.shape, dtype=torch.complex64, generator=generator).to(dev)
        if cfg.virtual_coils and ref.shape[1] > cfg.virtual_coils:
            ref, moved = compress_coils(ref, moved, cfg.virtual_coils)
        if cfg.standardise:
            ref, moved, _ = standardise_pair(ref, moved)
        six = to_six_vector(motion[:, 0], motion[:, 1], motion[:, 2]).to(torch.float32)
        targets = six / cfg.target_scale().to(dev)
        return PairBatch(
            inputs=to_channels(ref, moved).to(torch.float32),
            targets=targets,
            motion=motion.to(torch.float32),
            reference=ref,
            moved=moved,
            base_index=base_index,
        )


def compress_coils(
    reference: torch.Tensor, moved: torch.Tensor, n_virtual: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress coils ``(B, n_coils, s_y, s_x)`` to ``n_virtual`` virtual coils, per pair.

    The weights are the leading left singular vectors of the reference crop (coils x samples); the same
    weights apply to the moved crop (receive coils do not move with the patient).
    """
    b, c, h, w = reference.shape
    u, _, _ = torch.linalg.svd(reference.reshape(b, c, h * w), full_matrices=False)
    weights = u[:, :, :n_virtual].conj().transpose(1, 2)  # (B, n_virtual, C)
    # fix the arbitrary phase of each singular vector: make the virtual coil's DC sample real positive
    v_ref = weights @ reference.reshape(b, c, h * w)
    dc = v_ref[:, :, (h // 2) * w + w // 2]
    phase = torch.where(dc.abs() > 0, dc.conj() / dc.abs().clamp_min(1e-30), torch.ones_like(dc))
    weights = weights * phase[..., None]
    return (
        (weights @ reference.reshape(b, c, h * w)).reshape(b, n_virtual, h, w),
        (weights @ moved.reshape(b, c, h * w)).reshape(b, n_virtual, h, w),
    )


def _dft_matrix(freqs: torch.Tensor, n: int) -> torch.Tensor:
    """Rows of the centred orthonormal DFT at integer frequencies ``freqs``: ``(len(freqs), n)``."""
    pos = torch.arange(n, dtype=torch.float64) - n // 2
    arg = -2 * math.pi * freqs.to(torch.float64)[:, None] * pos[None] / n
    return (torch.polar(torch.ones_like(arg), arg) / math.sqrt(n)).to(torch.complex64)


def _apply_coils(block: torch.Tensor, coef: torch.Tensor, acceleration: int) -> torch.Tensor:
    """Coil images' k-space on the acquired crop rows from the object's padded k-space block.

    ``block``: ``(B, L_y, L_x)`` object spectrum on the fully sampled block padded by ``M`` on each side;
    ``coef``: ``(B, C, 2M+1, 2M+1)``.  ``FT[c f](k) = sum_m c_m F(k - m)``.
    """
    n_pairs, l_y, l_x = block.shape
    n_coils, width = coef.shape[1], coef.shape[-1]
    m = (width - 1) // 2
    out_x = l_x - 2 * m
    n_rows = len(range(0, l_y - 2 * m, acceleration))
    block = block.contiguous()
    # patches[b, r, x, a, c] = block[b, acceleration * r + a, x + c]  (a strided view, no copy)
    sb, sy, sx = block.stride()
    patches = block.as_strided((n_pairs, n_rows, out_x, width, width), (sb, acceleration * sy, sx, sy, sx))
    # FT[c f](k) = sum_m c_m F(k - m): patch offset (a, c) pairs with coefficient m = (m - a, m - c)
    kernel = coef.flip(-2, -1).reshape(n_pairs, n_coils, width * width).transpose(1, 2)
    out = torch.empty((n_pairs, n_rows * out_x, n_coils), dtype=block.dtype, device=block.device)
    step = 16
    for i in range(0, n_pairs, step):  # chunks bound the memory of the unfolded patches
        p = patches[i : i + step].reshape(-1, n_rows * out_x, width * width)
        out[i : i + step] = torch.bmm(p, kernel[i : i + step])
    return out.transpose(1, 2).reshape(n_pairs, n_coils, n_rows, out_x)


def simulate_image_domain(
    config: StudyConfig,
    objects: torch.Tensor,
    motion: torch.Tensor,
    base_index: torch.Tensor,
    coil_maps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Straightforward reference: band-limited image rotation + ramp, coil maps, full FFTs, rows, crop.

    Returns the raw complex crops ``(reference, moved)``, each ``(B, n_coils, s_y, s_x)``, without noise or
    standardisation.  Used to test :class:`StudySimulator`.
    """
    obj = objects[base_index].to(torch.complex64)
    moved_img = apply_motion_image(obj, motion[:, 0], motion[:, 1], motion[:, 2], config.pixel_spacing_mm)
    if coil_maps is not None:
        maps = coil_maps[base_index]
        obj = obj * maps
        moved_img = moved_img * maps
    ref = crop_undersampled(fft2c(obj), config.crop, config.acceleration)
    mov = crop_undersampled(fft2c(moved_img), config.crop, config.acceleration)
    return ref, mov
