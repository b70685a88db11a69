"""Every convention of docs/conventions.md has a test here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _helpers import smooth_object

from kmotion.physics import (
    InputError,
    acquired_rows,
    apply_motion_image,
    apply_motion_kspace,
    center_crop,
    check_complex,
    crop_undersampled,
    fft2c,
    ifft2c,
    mm_to_px,
    phase_ramp,
    px_to_mm,
    remove_rows,
    rotate_image,
    row_mask,
    standardise_pair,
    to_six_vector,
    undo_motion_kspace,
)
from kmotion.physics.sampling import crop_row_indices
from kmotion.physics.standardise import to_channels

ATOL = 1e-5
SHAPES = [(32, 32), (31, 36), (33, 29), (448, 448)]


def numpy_fft2c(img: np.ndarray) -> np.ndarray:
    ax = (-2, -1)
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img, axes=ax), axes=ax, norm="ortho"), axes=ax)


@pytest.mark.parametrize("shape", SHAPES)
def test_fft_matches_numpy_definition_and_inverts(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.randn((2, 3) + shape, dtype=torch.complex64, generator=g)
    k = fft2c(img)
    np.testing.assert_allclose(k.numpy(), numpy_fft2c(img.numpy()), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ifft2c(k), img, rtol=1e-5, atol=1e-5)
    # orthonormal: energy preserved
    torch.testing.assert_close(k.abs().pow(2).sum(), img.abs().pow(2).sum(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", [(16, 16), (15, 17)])
def test_centre_index_is_dc_and_position_zero(shape: tuple[int, int]) -> None:
    n_y, n_x = shape
    delta = torch.zeros(shape, dtype=torch.complex64)
    delta[n_y // 2, n_x // 2] = 1  # position (0, 0)
    k = fft2c(delta)
    torch.testing.assert_close(k, torch.full(shape, 1 / math.sqrt(n_y * n_x), dtype=torch.complex64))
    const = torch.ones(shape, dtype=torch.complex64)
    kc = fft2c(const)
    assert kc.abs().argmax().item() == (n_y // 2) * n_x + n_x // 2


@pytest.mark.parametrize("shape", [(32, 32), (31, 36), (33, 29)])
@pytest.mark.parametrize("shift", [(3, -2), (-5, 7), (0, 1)])
def test_integer_translation_is_roll(shape: tuple[int, int], shift: tuple[int, int]) -> None:
    dx, dy = shift
    f = smooth_object(*shape)
    g = apply_motion_image(f[None], float(dx), float(dy), 0.0)[0]
    torch.testing.assert_close(g, torch.roll(f, (dy, dx), dims=(-2, -1)), rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize("shape", [(32, 32), (31, 36)])
def test_translation_is_phase_ramp(shape: tuple[int, int]) -> None:
    n_y, n_x = shape
    dx, dy = 2.0, -3.0
    ramp = phase_ramp(shape, dx, dy)
    ky = torch.arange(n_y) - n_y // 2
    kx = torch.arange(n_x) - n_x // 2
    expected = torch.exp(-2j * math.pi * (kx[None] * dx / n_x + ky[:, None] * dy / n_y))
    torch.testing.assert_close(ramp, expected.to(torch.complex64), rtol=1e-5, atol=1e-5)
    f = smooth_object(*shape)
    torch.testing.assert_close(
        ifft2c(fft2c(f) * ramp), torch.roll(f, (int(dy), int(dx)), dims=(-2, -1)), rtol=1e-4, atol=ATOL
    )


@pytest.mark.parametrize("shape", [(32, 32), (30, 36), (33, 29)])
def test_subpixel_ramp_matches_shift_theorem_with_nyquist_zeroed(shape: tuple[int, int]) -> None:
    """Compare against a continuous Fourier-series shift evaluated directly (numpy, float64)."""
    n_y, n_x = shape
    dx, dy = 1.37, -2.61
    g = torch.Generator().manual_seed(3)
    k = torch.randn(shape, dtype=torch.complex128, generator=g)
    if n_y % 2 == 0:
        k[0, :] = 0  # Nyquist row
    if n_x % 2 == 0:
        k[:, 0] = 0
    f = ifft2c(k)
    shifted = ifft2c(k * phase_ramp(shape, dx, dy).to(torch.complex128))
    # band-limited function evaluated at r - t
    ky = (torch.arange(n_y) - n_y // 2).double()
    kx = (torch.arange(n_x) - n_x // 2).double()
    y = (torch.arange(n_y) - n_y // 2).double() - dy
    x = (torch.arange(n_x) - n_x // 2).double() - dx
    ey = torch.exp(2j * math.pi * y[:, None] * ky[None] / n_y)
    ex = torch.exp(2j * math.pi * x[:, None] * kx[None] / n_x)
    direct = ey @ k @ ex.T / math.sqrt(n_y * n_x)
    torch.testing.assert_close(shifted, direct, rtol=1e-5, atol=1e-6)  # ramp is complex64
    assert not torch.allclose(shifted, f)


@pytest.mark.parametrize("shape", [(32, 32), (33, 33)])
def test_rotation_plus_90_moves_5_0_to_0_5(shape: tuple[int, int]) -> None:
    n_y, n_x = shape
    f = torch.zeros(shape, dtype=torch.complex64)
    f[n_y // 2 + 0, n_x // 2 + 5] = 1.0  # (x, y) = (5, 0)
    g = rotate_image(f, 90.0)
    expected = torch.zeros_like(f)
    expected[n_y // 2 + 5, n_x // 2 + 0] = 1.0  # (x, y) = (0, 5)
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-5)


def test_rotation_direction_small_angle_matches_definition() -> None:
    """g(r) = f(R^-1 r): the centroid of an off-centre blob moves by R(phi)."""
    n = 64
    y = (torch.arange(n) - n // 2).double()
    yy, xx = torch.meshgrid(y, y, indexing="ij")
    f = torch.exp(-((xx - 12) ** 2 + yy**2) / 8).to(torch.complex64)
    phi = 20.0
    g = rotate_image(f, phi).abs()
    cx = float((g * xx).sum() / g.sum())
    cy = float((g * yy).sum() / g.sum())
    rad = math.radians(phi)
    assert cx == pytest.approx(12 * math.cos(rad), abs=0.05)
    assert cy == pytest.approx(12 * math.sin(rad), abs=0.05)


def test_rotation_is_physical_for_non_square_pixels() -> None:
    """With pixel spacing (dy, dx) = (2, 1) mm a blob at x = 20 mm rotated by 90 deg lands at y = 20 mm."""
    n_y, n_x = 48, 96
    spacing = (2.0, 1.0)
    y = (torch.arange(n_y) - n_y // 2).double() * spacing[0]
    x = (torch.arange(n_x) - n_x // 2).double() * spacing[1]
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    f = torch.exp(-((xx - 20) ** 2 + yy**2) / 40).to(torch.complex64)
    g = rotate_image(f, 90.0, spacing).abs()
    cx = float((g * xx).sum() / g.sum())
    cy = float((g * yy).sum() / g.sum())
    assert cx == pytest.approx(0.0, abs=0.2)
    assert cy == pytest.approx(20.0, abs=0.2)


@pytest.mark.parametrize("shape", [(32, 32), (31, 36), (33, 29)])
def test_forward_then_inverse_round_trip(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(1)
    k = torch.randn((3, 2) + shape, dtype=torch.complex64, generator=g)
    dx = torch.tensor([1.3, -7.2, 0.0])
    dy = torch.tensor([-4.4, 2.0, 11.9])
    phi = torch.tensor([12.0, -3.5, 45.0])
    spacing = (0.9, 1.3)
    moved = apply_motion_kspace(k, dx, dy, phi, spacing)
    assert not torch.allclose(moved, k, atol=1e-2)
    torch.testing.assert_close(undo_motion_kspace(moved, dx, dy, phi, spacing), k, rtol=1e-4, atol=1e-4)


def test_motion_preserves_energy() -> None:
    f = smooth_object(40, 44)
    g = apply_motion_image(f[None], 2.5, -1.5, 8.0)[0]
    torch.testing.assert_close(g.abs().pow(2).sum(), f.abs().pow(2).sum(), rtol=1e-4, atol=0)


def test_units_mm_and_six_vector() -> None:
    dx_mm, dy_mm = px_to_mm(torch.tensor(2.0), torch.tensor(-3.0), (0.5, 0.25))
    assert float(dx_mm) == pytest.approx(0.5)
    assert float(dy_mm) == pytest.approx(-1.5)
    back = mm_to_px(dx_mm, dy_mm, (0.5, 0.25))
    assert float(back[0]) == pytest.approx(2.0) and float(back[1]) == pytest.approx(-3.0)
    six = to_six_vector(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0]))
    torch.testing.assert_close(six, torch.tensor([[1.0, 2.0, 0.0, 0.0, 0.0, 3.0]]))


@pytest.mark.parametrize("n_ky", [8, 9, 10, 11, 448])
def test_mask_parity_keeps_centre_line(n_ky: int) -> None:
    rows = acquired_rows(n_ky, 2)
    assert n_ky // 2 in rows.tolist()
    assert all((r - n_ky // 2) % 2 == 0 for r in rows.tolist())
    mask = row_mask(n_ky, 2)
    assert int(mask.sum()) == len(rows)
    k = torch.arange(n_ky * 3, dtype=torch.float32).reshape(n_ky, 3).to(torch.complex64)
    kept = remove_rows(k, 2)
    torch.testing.assert_close(kept, k[rows])


def test_mask_other_accelerations() -> None:
    assert acquired_rows(12, 3).tolist() == [0, 3, 6, 9]
    assert acquired_rows(12, 1).tolist() == list(range(12))


@pytest.mark.parametrize("shape,size", [((10, 12), (4, 5)), ((11, 9), (3, 4)), ((8, 8), (8, 8))])
def test_center_crop_keeps_centre(shape: tuple[int, int], size: tuple[int, int]) -> None:
    x = torch.zeros(shape)
    x[shape[0] // 2, shape[1] // 2] = 1
    c = center_crop(x, size)
    assert c.shape == size
    assert c[size[0] // 2, size[1] // 2] == 1


def test_crop_undersampled_equals_crop_of_removed_rows() -> None:
    g = torch.Generator().manual_seed(2)
    for n_ky in (448, 31, 30):
        k = torch.randn(2, n_ky, 20, dtype=torch.complex64, generator=g)
        c = crop_undersampled(k, (6, 8), 2)
        reduced = remove_rows(k, 2)
        centre = int((acquired_rows(n_ky, 2) == n_ky // 2).nonzero())
        expected = reduced[:, centre - 3 : centre + 3, 20 // 2 - 4 : 20 // 2 + 4]
        torch.testing.assert_close(c, expected)
        assert crop_row_indices(n_ky, 6, 2)[3] == n_ky // 2


def test_crop_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="s_x_crop"):
        center_crop(torch.zeros(4, 4), (2, 5))
    with pytest.raises(ValueError, match="do not fit"):
        crop_undersampled(torch.zeros(10, 10, dtype=torch.complex64), (8, 4), 2)


def test_standardisation_one_scale_for_both() -> None:
    g = torch.Generator().manual_seed(5)
    ref = 7 * torch.randn(3, 1, 8, 8, dtype=torch.complex64, generator=g)
    mov = 3 * torch.randn(3, 1, 8, 8, dtype=torch.complex64, generator=g)
    r, m, s = standardise_pair(ref, mov)
    torch.testing.assert_close(r * s[:, None, None, None], ref)
    torch.testing.assert_close(m / r, mov / ref)  # same scale for reference and moved
    ch = to_channels(r, m)
    assert ch.shape == (3, 4, 8, 8)
    torch.testing.assert_close(ch.pow(2).mean(dim=(1, 2, 3)) * 2, torch.ones(3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ch[:, 0], r[:, 0].real)
    torch.testing.assert_close(ch[:, 3], m[:, 0].imag)


def test_check_complex_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="dtype"):
        check_complex(np.zeros((4, 4), dtype=np.int32), "kspace")
    with pytest.raises(InputError, match="dimensions"):
        check_complex(torch.zeros(4, dtype=torch.complex64), "kspace")
    bad = torch.zeros(4, 4, dtype=torch.complex64)
    bad[1, 2] = float("nan")
    with pytest.raises(InputError, match="kspace: contains 1 non-finite"):
        check_complex(bad, "kspace")
    assert check_complex(np.ones((2, 2), dtype=np.float32), "img").dtype == torch.complex64


def test_rotation_refuses_more_than_90_degrees() -> None:
    with pytest.raises(ValueError, match="90"):
        rotate_image(torch.zeros(1, 8, 8, dtype=torch.complex64), 120.0)


@pytest.mark.cuda
def test_motion_round_trip_on_cuda() -> None:
    k = torch.randn(2, 1, 32, 30, dtype=torch.complex64)
    moved = apply_motion_kspace(
        k.cuda(), torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0]), torch.tensor([5.0, -9.0])
    )
    back = undo_motion_kspace(
        moved, torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0]), torch.tensor([5.0, -9.0])
    )
    torch.testing.assert_close(back.cpu(), k, rtol=1e-4, atol=1e-4)
