"""Training pairs of the per-shot network: a reference crop and one echo train's rows under a random pose.

Per base object (a random head phantom with ``n_coils`` random fixed coils, ``kmotion.simulation.phantoms``)
``poses_per_phantom`` samples are drawn, each with

* a pose ``dx, dy ~ U[-motion_mm, motion_mm]`` mm, ``phi ~ U[-motion_deg, motion_deg]`` deg,
* an acquisition drawn uniformly from ``orderings`` x ``echo_train_lengths`` x ``accelerations`` x
  ``calibration_lines`` (:func:`kmotion.simulation.multishot.shot_sampling`) and one of its shots with at
  least one row in the crop,
* SNR log-uniform in ``snr_range`` (complex Gaussian noise of ``snr_sigma`` on every sample of both crops),

and becomes the network input of :func:`kmotion.estimation.shot_network.shot_inputs`: the motion-free
reference on every row of the central crop, the shot's rows of the moved object zero-filled, the row mask.

Fast path: the objects are simulated on a reduced ``sim_matrix`` grid holding the central k-space block of
the full one (the object band-limited to it; coils and rigid motion as in ``kmotion.simulation.multishot``).
On the crop this equals the full-grid simulation up to the wrap of the Fourier-shear rotation near the
block's edge (about 3e-4 relative at ``sim_matrix`` 160 for a 256 grid; tested against
:func:`kmotion.simulation.multishot.shot_kspace`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
import torch

from kmotion.estimation.shot_network import ShotGrid, shot_inputs
from kmotion.estimation.shots import move_image
from kmotion.physics.fft import fft2c, ifft2c
from kmotion.physics.validate import InputError
from kmotion.simulation.multishot import ORDERINGS, shot_sampling
from kmotion.simulation.phantoms import (
    coil_maps_from_coefficients,
    make_coil_coefficients,
    make_phantoms,
    snr_sigma,
)


@dataclass
class ShotStudyConfig:
    """Settings of the per-shot training data."""

    grid: ShotGrid = field(default_factory=ShotGrid)
    n_coils: int = 8
    coil_half_width: int = 4
    snr_range: tuple[float, float] = (15.0, 300.0)
    orderings: tuple[str, ...] = ORDERINGS
    echo_train_lengths: tuple[int, ...] = (8, 12, 16, 24, 32)
    accelerations: tuple[int, ...] = (1, 2, 3)
    calibration_lines: tuple[int, ...] = (0, 24, 32)
    poses_per_phantom: int = 16
    sim_matrix: int = 160
    """Side of the reduced simulation grid (holds the crop plus the rotation's and coils' reach)."""

    def __post_init__(self) -> None:
        if isinstance(self.grid, dict):
            self.grid = ShotGrid.from_dict(self.grid)
        self.snr_range = (float(self.snr_range[0]), float(self.snr_range[1]))
        for name in ("orderings", "echo_train_lengths", "accelerations", "calibration_lines"):
            setattr(self, name, tuple(getattr(self, name)))
            if not getattr(self, name):
                raise InputError(f"ShotStudyConfig.{name}: expected at least one value")
        bad = [o for o in self.orderings if o not in ORDERINGS]
        if bad:
            raise InputError(f"ShotStudyConfig.orderings: expected values of {ORDERINGS}, got {bad}")
        if not 0 < self.snr_range[0] <= self.snr_range[1]:
            raise InputError(f"ShotStudyConfig.snr_range: expected 0 < low <= high, got {self.snr_range}")
        if self.n_coils < 1 or self.poses_per_phantom < 1:
            raise InputError(
                f"ShotStudyConfig: n_coils, poses_per_phantom >= 1 expected, got {self.n_coils}, "
                f"{self.poses_per_phantom}"
            )
        g = self.grid
        reach = math.hypot(g.crop[0] / 2, g.crop[1] / 2) + self.coil_half_width + 2
        if self.sim_matrix > min(g.matrix) or self.sim_matrix < 2 * reach or self.sim_matrix % 2:
            raise InputError(
                f"ShotStudyConfig.sim_matrix: expected an even side in {math.ceil(2 * reach)}.."
                f"{min(g.matrix)} for the crop {g.crop}, got {self.sim_matrix}"
            )

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@lru_cache(maxsize=512)
def _crop_masks(
    n_ky: int, etl: int, ordering: str, acceleration: int, calibration: int, s_y: int
) -> np.ndarray:
    """``(n_shots, s_y)`` bool: the rows of every shot within the central ``s_y`` rows (shots with none
    left out)."""
    samp = shot_sampling(n_ky, etl, ordering, acceleration, calibration if acceleration > 1 else 0)
    r0 = n_ky // 2 - s_y // 2
    m = samp.masks().numpy()[:, r0 : r0 + s_y]
    return m[m.any(1)]


def draw_masks(cfg: ShotStudyConfig, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    """``(n, s_y)`` row masks of random shots of random acquisitions and the ordering of each."""
    g = cfg.grid
    out = np.zeros((n, g.crop[0]), dtype=bool)
    names = []
    for i in range(n):
        o = str(rng.choice(cfg.orderings))
        m = _crop_masks(
            g.matrix[0],
            int(rng.choice(cfg.echo_train_lengths)),
            o,
            int(rng.choice(cfg.accelerations)),
            int(rng.choice(cfg.calibration_lines)),
            g.crop[0],
        )
        out[i] = m[rng.integers(len(m))]
        names.append(o)
    return torch.from_numpy(out), names


def _crop_spectrum(img: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """``fft2c(img)`` on its central ``crop`` only, for even sides (no shift copies: the centred transform is
    ``(-1)^(ky + kx)`` times the plain one)."""
    n_y, n_x = img.shape[-2:]
    ky = torch.arange(crop[0]) - crop[0] // 2
    kx = torch.arange(crop[1]) - crop[1] // 2
    k = torch.fft.fft(img, dim=-1, norm="ortho")[..., kx % n_x]
    k = torch.fft.fft(k, dim=-2, norm="ortho")[..., ky % n_y, :]
    sign = (1 - 2 * (ky.abs() % 2))[:, None] * (1 - 2 * (kx.abs() % 2))[None, :]
    return k * sign.to(k.real.dtype)


def _centre_block(k: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The central ``size`` block of centred k-space ``(..., n_y, n_x)`` (centre index ``n // 2`` kept)."""
    n_y, n_x = k.shape[-2:]
    r0, c0 = n_y // 2 - size[0] // 2, n_x // 2 - size[1] // 2
    return k[..., r0 : r0 + size[0], c0 : c0 + size[1]]


@dataclass
class ShotBatch:
    """Simulated samples: network inputs, normalised targets and what they came from."""

    inputs: torch.Tensor
    """``(N, 4 * n_virtual + 1, s_y, s_x)`` float32."""
    targets: torch.Tensor
    """``(N, 3)`` pose / ``ShotGrid.target_scale()``."""
    motion: torch.Tensor
    """``(N, 3)`` dx [px], dy [px], phi [deg] of the network's grid."""
    orderings: list[str]


def simulate_crops(
    objects: torch.Tensor,
    maps_coef: torch.Tensor,
    motion: torch.Tensor,
    base_index: torch.Tensor,
    grid: ShotGrid,
    sim_matrix: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise-free reference and moved crops ``(N, n_coils, s_y, s_x)`` (every row) on the reduced grid.

    ``objects`` ``(n_base, n_y, n_x)`` on ``grid.matrix``, ``maps_coef`` ``(n_base, n_coils, 2M+1, 2M+1)``,
    ``motion`` ``(N, 3)`` in px/deg of ``grid.matrix``, ``base_index`` ``(N,)``.
    """
    size = (sim_matrix, sim_matrix)
    small = ifft2c(_centre_block(fft2c(objects.to(torch.complex64)), size))  # band-limited objects
    maps = coil_maps_from_coefficients(maps_coef, size)  # (n_base, C, s, s): the same smooth functions
    dy_mm, dx_mm = grid.pixel_spacing_mm
    spacing = (grid.fov_mm[0] / sim_matrix, grid.fov_mm[1] / sim_matrix)
    m = motion.to(torch.float64).clone()
    m[:, 0] *= dx_mm / spacing[1]
    m[:, 1] *= dy_mm / spacing[0]
    ref = _crop_spectrum(maps * small[:, None], grid.crop)[base_index]
    moved_img = move_image(small[base_index], m, spacing)
    mov = torch.empty_like(ref)
    for i in range(0, len(m), 32):  # bound the memory of the coil images
        j = slice(i, i + 32)
        mov[j] = _crop_spectrum(maps[base_index[j]] * moved_img[j, None], grid.crop)
    return ref, mov


def simulate_batch(cfg: ShotStudyConfig, n: int, seed: int) -> ShotBatch:
    """``n`` samples, deterministic by ``seed`` (module docstring)."""
    g = cfg.grid
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    n_base = -(-n // cfg.poses_per_phantom)
    objects = make_phantoms(n_base, g.matrix, g.fov_mm, generator=gen)
    coef = make_coil_coefficients(n_base, cfg.n_coils, g.matrix, g.fov_mm, cfg.coil_half_width, generator=gen)
    lo, hi = cfg.snr_range
    snr = torch.from_numpy(np.exp(rng.uniform(math.log(lo), math.log(hi), n_base))).float()
    sigma = snr_sigma(objects, snr)
    rng_t = g.motion_range().double()
    motion = (torch.from_numpy(rng.uniform(-1, 1, (n, 3))) * rng_t).double()
    base = torch.arange(n) // cfg.poses_per_phantom
    ref, mov = simulate_crops(objects, coef, motion, base, g, cfg.sim_matrix)
    sig = sigma[base].reshape(-1, 1, 1, 1)
    ref = ref + sig * torch.randn(ref.shape, dtype=torch.complex64, generator=gen)
    mov = mov + sig * torch.randn(mov.shape, dtype=torch.complex64, generator=gen)
    masks, names = draw_masks(cfg, n, rng)
    x = shot_inputs(ref, mov, masks, g.n_virtual)
    return ShotBatch(x, (motion / g.target_scale().double()).float(), motion.float(), names)
