"""Tests for kmotion.simulation.phantoms: phantoms, band-limited coil maps and complex noise."""

from __future__ import annotations

import math

import pytest
import torch

from kmotion.physics.fft import fft2c
from kmotion.physics.validate import InputError
from kmotion.simulation.phantoms import (
    PhantomConfig,
    _band_coefficients,
    _coil_profiles,
    add_complex_noise,
    coil_maps_from_coefficients,
    make_coil_coefficients,
    make_phantoms,
    snr_sigma,
)


def _radius_mm(shape: tuple[int, int], fov: tuple[float, float]) -> torch.Tensor:
    n_y, n_x = shape
    y = (torch.arange(n_y) - n_y // 2).double() * (fov[0] / n_y)
    x = (torch.arange(n_x) - n_x // 2).double() * (fov[1] / n_x)
    return torch.sqrt(y.view(-1, 1) ** 2 + x.view(1, -1) ** 2)


def _support(img: torch.Tensor) -> torch.Tensor:
    mag = img.abs()
    return mag > 0.1 * mag.flatten(-2).amax(-1)[..., None, None]


# ------------------------------------------------------------------------------------------------ phantoms


@pytest.mark.parametrize("shape", [(64, 64), (65, 63), (96, 80)])
def test_phantom_shape_dtype_range(shape: tuple[int, int]) -> None:
    x = make_phantoms(3, shape=shape, generator=0)
    assert x.shape == (3, *shape)
    assert x.dtype == torch.complex64
    mag = x.abs()
    assert torch.isfinite(mag).all()
    assert mag.amax() <= 1.0 + 1e-5
    assert torch.allclose(mag.flatten(1).amax(1), torch.ones(3), atol=1e-5)


def test_phantom_determinism() -> None:
    a = make_phantoms(2, shape=(64, 64), generator=7)
    b = make_phantoms(2, shape=(64, 64), generator=torch.Generator().manual_seed(7))
    c = make_phantoms(2, shape=(64, 64), generator=8)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.05


@pytest.mark.parametrize(
    ("shape", "fov"), [((96, 80), (220.0, 200.0)), ((65, 63), (220.0, 220.0)), ((80, 96), (180.0, 240.0))]
)
def test_phantom_zero_outside_support_circle(shape: tuple[int, int], fov: tuple[float, float]) -> None:
    x = make_phantoms(8, shape=shape, fov_mm=fov, generator=3)
    r = _radius_mm(shape, fov)
    r_support = 0.92 * min(fov) / 2
    assert (x[:, r > r_support] == 0).all()
    # the hard cut-off does not truncate anything: the object ends a pixel before it
    pixel = max(fov[0] / shape[0], fov[1] / shape[1])
    assert (x[:, r > r_support - pixel] == 0).all()
    assert (x.abs() > 0).any(dim=0)[r < 0.5 * r_support].all()


def test_phantom_round_in_mm_with_non_square_pixels() -> None:
    cfg = PhantomConfig(head_aspect=(1.0, 1.0), max_offset_mm=0.0)
    shape, fov = (96, 60), (220.0, 200.0)  # pixels 2.29 mm x 3.33 mm
    x = make_phantoms(4, shape=shape, fov_mm=fov, config=cfg, generator=1)
    y = (torch.arange(shape[0]) - shape[0] // 2) * (fov[0] / shape[0])
    xx = (torch.arange(shape[1]) - shape[1] // 2) * (fov[1] / shape[1])
    inside = x.abs() > 0
    extent_y = (inside.any(-1) * y.abs()).amax(-1)
    extent_x = (inside.any(-2) * xx.abs()).amax(-1)
    assert torch.allclose(extent_y, extent_x, atol=fov[1] / shape[1] + 1e-3)


def test_phantom_variety() -> None:
    x = make_phantoms(4, shape=(96, 96), generator=11).abs()
    for i in range(4):
        for j in range(i + 1, 4):
            diff = (x[i] - x[j]).square().mean() / (0.5 * (x[i].square().mean() + x[j].square().mean()))
            assert diff > 0.2


def test_phantom_texture_and_phase() -> None:
    x = make_phantoms(6, shape=(128, 128), generator=5)
    supp = _support(x)
    mag = x.abs()
    # high-pass energy (minus 4-neighbour mean) inside the support, relative to the mean intensity
    smooth = 0.25 * (mag.roll(1, -1) + mag.roll(-1, -1) + mag.roll(1, -2) + mag.roll(-1, -2))
    interior = supp & torch.roll(supp, 2, -1) & torch.roll(supp, -2, -1)
    interior &= torch.roll(supp, 2, -2) & torch.roll(supp, -2, -2)
    for i in range(x.shape[0]):
        hp = (mag[i] - smooth[i])[interior[i]]
        assert hp.std() / mag[i][interior[i]].mean() > 0.01
        # smooth background phase: relative to the mean phase (no wrapping for a few radians)
        z = x[i][supp[i]]
        rel = torch.angle(z * torch.exp(-1j * torch.angle(z.sum())))
        assert rel.std() > 0.05
        # smooth: neighbouring phase differences are small
        dphi = torch.angle(x[i, :, 1:] * x[i, :, :-1].conj())[supp[i, :, 1:] & supp[i, :, :-1]]
        assert dphi.abs().max() < 0.3


def test_phantom_spectrum_decays() -> None:
    x = make_phantoms(2, shape=(128, 128), generator=2)
    k = fft2c(x).abs().square()
    c = 64
    low = k[:, c - 16 : c + 16, c - 16 : c + 16].sum()
    edge = k[:, :8, :].sum() + k[:, -8:, :].sum() + k[:, :, :8].sum() + k[:, :, -8:].sum()
    assert edge / low < 0.02


def test_phantom_config_validation() -> None:
    with pytest.raises(InputError, match="head_size"):
        PhantomConfig(head_size=(0.5, 1.5))
    with pytest.raises(InputError, match="texture_strength"):
        PhantomConfig(texture_strength=(0.3, 0.1))


# ---------------------------------------------------------------------------------------------------- coils


@pytest.mark.parametrize(("shape", "half_width"), [((64, 64), 4), ((65, 63), 3), ((96, 80), 2)])
def test_coil_convolution_identity(shape: tuple[int, int], half_width: int) -> None:
    coef = make_coil_coefficients(2, 3, shape, fov_mm=(220.0, 200.0), half_width=half_width, generator=0)
    assert coef.shape == (2, 3, 2 * half_width + 1, 2 * half_width + 1)
    assert coef.dtype == torch.complex64
    maps = coil_maps_from_coefficients(coef, shape)
    assert maps.shape == (2, 3, *shape)
    f = make_phantoms(2, shape=shape, generator=1)
    lhs = fft2c(maps * f[:, None])
    spec = fft2c(f)[:, None]
    rhs = torch.zeros_like(lhs)
    for my in range(-half_width, half_width + 1):
        for mx in range(-half_width, half_width + 1):
            c_m = coef[..., half_width + my, half_width + mx][..., None, None]
            rhs += c_m * torch.roll(spec, shifts=(my, mx), dims=(-2, -1))
    scale = lhs.abs().max()
    assert torch.allclose(lhs / scale, rhs / scale, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 64), (65, 63)])
def test_coil_coefficients_are_central_dft(shape: tuple[int, int]) -> None:
    n_y, n_x = shape
    half_width = 4
    prof_y, prof_x = _coil_profiles(
        2, 4, shape, (220.0, 210.0), torch.Generator().manual_seed(3), torch.device("cpu")
    )
    raw = prof_y[..., :, None] * prof_x[..., None, :]  # the map on the image grid
    spec = fft2c(raw.to(torch.complex128)) / math.sqrt(n_y * n_x)
    cy, cx = n_y // 2, n_x // 2
    crop = spec[..., cy - half_width : cy + half_width + 1, cx - half_width : cx + half_width + 1]
    coef = _band_coefficients(prof_y, prof_x, half_width)
    assert torch.allclose(coef.to(torch.complex128), crop, atol=1e-6)
    # reconstructing from the coefficients gives the band-limited map (zero-filled DFT)
    band = torch.zeros_like(spec)
    band[..., cy - half_width : cy + half_width + 1, cx - half_width : cx + half_width + 1] = crop
    band_map = torch.fft.fftshift(
        torch.fft.ifft2(torch.fft.ifftshift(band, dim=(-2, -1)), dim=(-2, -1), norm="forward"), dim=(-2, -1)
    )
    maps = coil_maps_from_coefficients(coef, shape)
    assert torch.allclose(maps.to(torch.complex128), band_map, atol=1e-5)
    # the normalised coefficients are one real positive multiple of these
    norm = make_coil_coefficients(2, 4, shape, (220.0, 210.0), half_width, generator=3)
    ratio = (norm / coef).flatten(1)
    assert torch.allclose(ratio, ratio[:, :1].real.expand_as(ratio).to(ratio.dtype), rtol=1e-4)
    assert (ratio.real > 0).all()


@pytest.mark.parametrize(("shape", "fov"), [((64, 64), (220.0, 220.0)), ((96, 80), (220.0, 200.0))])
def test_coil_rss_normalisation(shape: tuple[int, int], fov: tuple[float, float]) -> None:
    coef = make_coil_coefficients(3, 8, shape, fov_mm=fov, generator=4)
    maps = coil_maps_from_coefficients(coef, shape)
    rss = maps.abs().square().sum(1).sqrt()
    disc = _radius_mm(shape, fov) <= min(fov) / 2
    mean = rss[:, disc].mean(-1)
    assert torch.allclose(mean, torch.ones(3), atol=2e-3)  # normalised on a <= 64 x 64 grid
    # coils differ and are smooth, spatially varying
    assert (maps[:, 0].abs() - maps[:, 4].abs()).abs()[:, disc].mean() > 0.05


def test_coil_determinism() -> None:
    a = make_coil_coefficients(2, 4, (64, 64), generator=5)
    b = make_coil_coefficients(2, 4, (64, 64), generator=5)
    c = make_coil_coefficients(2, 4, (64, 64), generator=6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# ---------------------------------------------------------------------------------------------------- noise


def test_noise_sigma_and_snr() -> None:
    x = make_phantoms(3, shape=(96, 80), fov_mm=(220.0, 200.0), generator=9)
    snr = torch.tensor([5.0, 20.0, 50.0])
    sigma = snr_sigma(x, snr)
    assert sigma.shape == (3,)
    noisy = add_complex_noise(x, sigma, generator=10)
    noise = noisy - x
    emp = noise.abs().square().flatten(1).mean(1).sqrt()
    assert torch.allclose(emp, sigma, rtol=0.05)
    assert torch.allclose(noise.real.flatten(1).std(1), sigma / math.sqrt(2), rtol=0.05)
    assert torch.allclose(noise.imag.flatten(1).std(1), sigma / math.sqrt(2), rtol=0.05)
    # the SNR as defined in the module docstring
    supp = _support(x)
    mean = (x.abs() * supp).flatten(1).sum(1) / supp.flatten(1).sum(1)
    assert torch.allclose(mean / emp, snr, rtol=0.05)
    # the same sigma holds in k-space (orthonormal FFT)
    k_emp = fft2c(noise).abs().square().flatten(1).mean(1).sqrt()
    assert torch.allclose(k_emp, sigma, rtol=0.05)


def test_noise_broadcast_and_determinism() -> None:
    x = torch.zeros(2, 3, 40, 40, dtype=torch.complex64)
    sigma = torch.tensor([1.0, 3.0])
    a = add_complex_noise(x, sigma, generator=1)
    b = add_complex_noise(x, sigma, generator=1)
    c = add_complex_noise(x, sigma, generator=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    ratio = a[1].abs().square().mean().sqrt() / a[0].abs().square().mean().sqrt()
    assert abs(float(ratio) - 3.0) < 0.15
    d = add_complex_noise(x, 0.5, generator=1)
    assert d.shape == x.shape and d.dtype == torch.complex64
    assert torch.equal(add_complex_noise(x, 0.0), x)


# ------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("n", [0, -3])
def test_bad_n_images(n: int) -> None:
    with pytest.raises(InputError, match=rf"n_images.*{n}"):
        make_phantoms(n, shape=(32, 32))
    with pytest.raises(InputError, match=rf"n_images.*{n}"):
        make_coil_coefficients(n, 4, (32, 32))


@pytest.mark.parametrize("shape", [(0, 64), (64, -1)])
def test_bad_shape(shape: tuple[int, int]) -> None:
    bad = str(shape[0] if shape[0] <= 0 else shape[1])
    with pytest.raises(InputError, match=rf"shape.*{bad}"):
        make_phantoms(1, shape=shape)
    with pytest.raises(InputError, match=rf"shape.*{bad}"):
        make_coil_coefficients(1, 4, shape)
    with pytest.raises(InputError, match="shape"):
        coil_maps_from_coefficients(torch.zeros(1, 1, 3, 3, dtype=torch.complex64), shape)


def test_bad_coil_arguments() -> None:
    with pytest.raises(InputError, match=r"half_width.*-1"):
        make_coil_coefficients(1, 4, (32, 32), half_width=-1)
    with pytest.raises(InputError, match=r"half_width.*20"):
        make_coil_coefficients(1, 4, (32, 32), half_width=20)
    with pytest.raises(InputError, match=r"n_coils.*0"):
        make_coil_coefficients(1, 0, (32, 32))
    with pytest.raises(InputError, match="coefficients"):
        coil_maps_from_coefficients(torch.zeros(1, 3, 4, dtype=torch.complex64), (32, 32))
    with pytest.raises(InputError, match="fov_mm"):
        make_coil_coefficients(1, 4, (32, 32), fov_mm=(220.0, -1.0))


@pytest.mark.parametrize("snr", [0.0, -2.0])
def test_bad_snr(snr: float) -> None:
    x = make_phantoms(1, shape=(32, 32), generator=0)
    with pytest.raises(InputError, match=rf"snr.*{snr}"):
        snr_sigma(x, snr)
    with pytest.raises(InputError, match="snr"):
        snr_sigma(x, torch.tensor([snr]))


def test_bad_noise_arguments() -> None:
    x = torch.zeros(2, 8, 8, dtype=torch.complex64)
    with pytest.raises(InputError, match="sigma"):
        add_complex_noise(x, -1.0)
    with pytest.raises(InputError, match="sigma"):
        add_complex_noise(x, torch.ones(3))
    with pytest.raises(InputError, match="objects"):
        snr_sigma(x, 10.0)  # all-zero images have no SNR
    assert issubclass(InputError, ValueError)


@pytest.mark.cuda
def test_cuda_matches_cpu() -> None:
    cpu = make_phantoms(2, shape=(64, 64), generator=3)
    gpu = make_phantoms(2, shape=(64, 64), generator=3, device="cuda")
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)
    coef = make_coil_coefficients(2, 4, (64, 64), generator=3, device="cuda")
    assert torch.allclose(coef.cpu(), make_coil_coefficients(2, 4, (64, 64), generator=3), atol=1e-5)
    noisy = add_complex_noise(gpu, snr_sigma(gpu, 10.0), generator=torch.Generator("cuda").manual_seed(0))
    assert noisy.device.type == "cuda"
