"""Where base images come from: synthetic phantoms or users' raw data, as batches for the simulator."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from kmotion.physics.validate import InputError, check_complex
from kmotion.simulation.phantoms import (
    PhantomConfig,
    make_coil_coefficients,
    make_phantoms,
    snr_sigma,
)
from kmotion.simulation.study import PairBatch, StudyConfig, StudySimulator, draw_motion


@dataclass
class BaseDraw:
    """Base objects for one batch of pairs."""

    objects: torch.Tensor
    """``(n_base, n_ch, n_y, n_x)`` complex64."""
    coil_coefficients: torch.Tensor | None
    """``(n_base, n_coils, 2M+1, 2M+1)`` fixed coil maps, or None (all channels move together)."""
    noise_sigma: torch.Tensor | None
    """``(n_base,)`` complex noise standard deviation, or None."""


class BaseSource(Protocol):
    """Anything that draws base objects for a :class:`StudyConfig`."""

    def draw(self, n_base: int, generator: torch.Generator | None = None) -> BaseDraw: ...


class PhantomSource:
    """Synthetic head-like phantoms, fixed coil sensitivities (``config.n_coils > 1``) and noise."""

    def __init__(
        self,
        config: StudyConfig,
        phantom_config: PhantomConfig | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.phantom_config = phantom_config
        self.device = torch.device(device)

    def draw(self, n_base: int, generator: torch.Generator | None = None) -> BaseDraw:
        cfg = self.config
        objects = make_phantoms(n_base, cfg.matrix, cfg.fov_mm, self.phantom_config, generator, self.device)
        coef = None
        if cfg.n_coils > 1:
            coef = make_coil_coefficients(
                n_base, cfg.n_coils, cfg.matrix, cfg.fov_mm, cfg.coil_half_width, generator, self.device
            )
        sigma = None
        if cfg.snr_range is not None:
            lo, hi = cfg.snr_range
            u = torch.rand(n_base, generator=generator, device=generator.device if generator else "cpu")
            snr = torch.exp(math.log(lo) + u.to(objects.device) * (math.log(hi) - math.log(lo)))
            sigma = snr_sigma(objects, snr)
        elif cfg.snr is not None:
            sigma = snr_sigma(objects, cfg.snr)
        return BaseDraw(objects[:, None], coef, sigma)


class ImageSource:
    """Users' base images (e.g. from :mod:`kmotion.io`), each moved as a whole (coil images included).

    This is the abstract's protocol: motion applied to acquired (coil) k-spaces.  Random flips along x
    and y and a random global phase add variety.  Images must already be on the study's matrix
    (:func:`kmotion.io.base.resize_matrix`).
    """

    def __init__(self, images: torch.Tensor, config: StudyConfig, augment: bool = True) -> None:
        images = check_complex(images, "base images", min_ndim=4)
        if tuple(images.shape[-2:]) != config.matrix:
            raise InputError(
                f"base images: matrix {tuple(images.shape[-2:])} differs from the study's {config.matrix}; "
                "resample with kmotion.io.base.resize_matrix"
            )
        self.images = images.to(torch.complex64)
        self.config = config
        self.augment = augment

    def draw(self, n_base: int, generator: torch.Generator | None = None) -> BaseDraw:
        idx = torch.randint(len(self.images), (n_base,), generator=generator)
        objects = self.images[idx]
        if self.augment:
            flips = torch.rand(n_base, 2, generator=generator) < 0.5
            objects = torch.where(flips[:, 0, None, None, None], objects.flip(-2), objects)
            objects = torch.where(flips[:, 1, None, None, None], objects.flip(-1), objects)
            phase = torch.rand(n_base, generator=generator) * (2 * math.pi)
            objects = objects * torch.polar(torch.ones_like(phase), phase)[:, None, None, None]
        sigma = None
        if self.config.snr is not None:
            rss = objects.abs().pow(2).sum(1).sqrt()
            sigma = snr_sigma(rss, self.config.snr)
        return BaseDraw(objects, None, sigma)


def sample_pairs(
    simulator: StudySimulator,
    source: BaseSource,
    n_pairs: int,
    generator: torch.Generator | None = None,
) -> PairBatch:
    """Draw ``n_pairs`` pairs: ``ceil(n_pairs / pairs_per_base)`` base objects, uniform motion, simulate."""
    cfg = simulator.config
    if n_pairs < 1:
        raise InputError(f"n_pairs must be >= 1, got {n_pairs}")
    n_base = -(-n_pairs // cfg.pairs_per_base)
    base = source.draw(n_base, generator)
    motion = draw_motion(n_pairs, cfg.motion_range, generator)
    index = torch.arange(n_pairs) // cfg.pairs_per_base
    return simulator.simulate(
        base.objects, motion, index, base.coil_coefficients, base.noise_sigma, generator=generator
    )
