"""SENSE with motion in the forward model (``kmotion.physics.sense``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kmotion.physics import InputError, apply_motion_image, fft2c, ifft2c
from kmotion.physics.sense import (
    MotionSense,
    calibration_block,
    coil_maps_lowres,
    conjugate_gradient,
    sense_reconstruct,
    snr_limited_halfwidth,
)
from kmotion.simulation.phantoms import coil_maps_from_coefficients, make_coil_coefficients, make_phantoms

N_Y, N_X, N_C = 48, 40, 6
SPACING = (1.1, 0.9)


def _coils(n_y: int = N_Y, n_x: int = N_X, n_c: int = N_C, seed: int = 1) -> torch.Tensor:
    fov = (n_y * SPACING[0], n_x * SPACING[1])
    return coil_maps_from_coefficients(
        make_coil_coefficients(1, n_c, (n_y, n_x), fov, generator=seed), (n_y, n_x)
    )


def _rows(n_y: int, r: int = 2) -> torch.Tensor:
    return ((torch.arange(n_y) - n_y // 2) % r == 0)[None]


def _nrmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.abs() - b.abs()).norm() / b.abs().norm())


def test_adjoint_with_motion_and_non_square_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, N_C, N_Y, N_X, dtype=torch.complex64, generator=g)
    motion = torch.tensor([[1.3, -2.2, 7.0], [-0.4, 0.9, -11.0]])
    op = MotionSense(maps, _rows(N_Y).expand(2, N_Y), motion, SPACING)
    x = torch.randn(2, N_Y, N_X, dtype=torch.complex64, generator=g)
    y = torch.randn(2, N_C, N_Y, N_X, dtype=torch.complex64, generator=g)
    lhs = (op.forward(x).conj() * y).sum()
    rhs = (x.conj() * op.adjoint(y)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-4, atol=0)
    # the motion is the physics core's forward model, and T^H = T^-1
    assert torch.allclose(
        op.move(x), apply_motion_image(x, motion[:, 0], motion[:, 1], motion[:, 2], SPACING), atol=1e-5
    )
    assert torch.allclose(op.unmove(op.move(x)), x, atol=1e-4)


def test_mask_shape_is_checked() -> None:
    maps = torch.ones(1, 2, 8, 8, dtype=torch.complex64)
    with pytest.raises(InputError, match="mask"):
        MotionSense(maps, torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(InputError, match="maps"):
        MotionSense(maps[0], torch.ones(1, 8, dtype=torch.bool))


def test_calibration_block() -> None:
    m = np.zeros(20, bool)
    m[::2] = True
    m[7:14] = True
    assert calibration_block(m) == (6, 15)
    m[10] = False
    assert calibration_block(m) == (10, 10)  # centre row missing: empty


def test_cg_solves_a_diagonal_system() -> None:
    d = torch.linspace(0.1, 2.0, 30, dtype=torch.float64).reshape(1, 30).to(torch.complex64)
    b = torch.randn(1, 30, dtype=torch.complex64, generator=torch.Generator().manual_seed(3))
    x = conjugate_gradient(lambda v: d * v, b, iterations=60, lam=0.0)
    assert torch.allclose(x, b / d, atol=1e-4)


def test_coil_maps_from_calibration_match_true_maps_up_to_one_phase_and_rss() -> None:
    f = make_phantoms(1, (N_Y, N_X), (N_Y * SPACING[0], N_X * SPACING[1]), generator=4)
    c = _coils()
    k = fft2c(c * f[:, None])[0]
    maps = coil_maps_lowres(k, (N_Y // 2 - 8, N_Y // 2 + 8), aspect=N_X * SPACING[1] / (N_Y * SPACING[0]))
    support = f[0].abs() > 0.3
    est = maps[:, support]
    true = c[0][:, support] / c[0][:, support].abs().square().sum(0).sqrt()
    # same coil-relative structure: est = true * exp(i theta(r)) with one smooth phase per pixel
    rel = (est * true.conj()).sum(0)
    assert float((rel.abs() - 1).abs().mean()) < 0.05
    assert float(maps.abs().square().sum(0).sqrt()[support].mean()) == pytest.approx(1.0, abs=0.05)
    with pytest.raises(InputError, match="fully sampled rows"):
        coil_maps_lowres(k, (N_Y // 2, N_Y // 2 + 1))


def test_snr_limited_halfwidth_keeps_every_row_without_noise_and_drops_the_noisy_ones() -> None:
    n = 128
    f = make_phantoms(1, (n, n), (220.0, 220.0), generator=5)
    c = _coils(n, n, 8)
    k = fft2c(c * f[:, None])[0]
    rows = (n // 2 - 16, n // 2 + 16)
    assert snr_limited_halfwidth(k, rows) == 15  # noise-free: the whole block (half = min(16, 15))
    gen = torch.Generator().manual_seed(0)
    scale = float(k.abs().square().mean().sqrt())
    widths = []
    for rel in (0.05, 0.5, 5.0):  # noise std relative to the RMS of the k-space samples
        z = torch.complex(torch.randn(k.shape, generator=gen), torch.randn(k.shape, generator=gen))
        widths.append(snr_limited_halfwidth(k + z * (rel * scale / 2**0.5), rows))
    assert widths[0] >= widths[1] >= widths[2]  # more noise, fewer rows
    assert widths[2] < 15 and widths[2] >= 4  # never below min_half
    assert snr_limited_halfwidth(k, (n // 2 - 3, n // 2 + 4)) == 3  # a block no wider than min_half: as it is


def test_true_motion_correction_in_the_forward_model() -> None:
    """8 coils, R = 2, 64 x 64: recon of the moved data with the motion in the model ~ the reference."""
    n = 64
    fov = (n * 1.0, n * 1.0)
    f = make_phantoms(1, (n, n), fov, generator=1)
    c = coil_maps_from_coefficients(make_coil_coefficients(1, 8, (n, n), fov, generator=2), (n, n))
    motion = torch.tensor([[2.3, -1.7, 6.0]])
    g = apply_motion_image(f, motion[:, 0], motion[:, 1], motion[:, 2])
    mask = _rows(n)
    full_ref = fft2c(c * f[:, None])
    y_ref = full_ref * mask[:, None, :, None]
    y_mov = fft2c(c * g[:, None]) * mask[:, None, :, None]
    maps = coil_maps_lowres(full_ref[0], (n // 2 - 8, n // 2 + 8))[None]
    x_ref = sense_reconstruct(y_ref, mask, maps)
    x_unc = sense_reconstruct(y_mov, mask, maps)
    x_cor = sense_reconstruct(y_mov, mask, maps, motion)
    # re-sampled on the acquired lines and reconstructed again (what the gadget writes back)
    y_corr = MotionSense(maps, mask).forward(x_cor)
    x_again = sense_reconstruct(y_corr, mask, maps)
    unc, cor, again = _nrmse(x_unc, x_ref), _nrmse(x_cor, x_ref), _nrmse(x_again, x_ref)
    assert unc > 0.2
    assert cor < 0.25 * unc and again < 0.25 * unc, (unc, cor, again)
    # with the true maps the moved data give back the object itself
    x_true = sense_reconstruct(y_mov, mask, c, motion, iterations=40)
    assert _nrmse(x_true, f) < 0.02
    # zero-filled RSS of the re-sampled data matches the reference's too
    rss = lambda y: ifft2c(y).abs().square().sum(1).sqrt()  # noqa: E731
    assert _nrmse(rss(y_corr), rss(y_ref)) < 0.25 * _nrmse(rss(y_mov), rss(y_ref))
