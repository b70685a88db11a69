from __future__ import annotations

import math

import pytest
import torch
from _helpers import smooth_object

from kmotion.physics import fft2c
from kmotion.physics.nufft import CentralSpectrum


def direct_dtft(f: torch.Tensor, qy: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
    n_y, n_x = f.shape
    y = (torch.arange(n_y) - n_y // 2).double()
    x = (torch.arange(n_x) - n_x // 2).double()
    ey = torch.exp(-2j * math.pi * qy[:, None] * y[None] / n_y)  # (P, n_y)
    ex = torch.exp(-2j * math.pi * qx[:, None] * x[None] / n_x)
    return torch.einsum("py,yx,px->p", ey, f.to(torch.complex128), ex) / math.sqrt(n_y * n_x)


@pytest.mark.parametrize("width,tol", [(4, 5e-3), (5, 1e-3), (6, 2e-4)])
@pytest.mark.parametrize("shape", [(64, 60), (45, 51)])
def test_central_spectrum_matches_direct_dtft(width: int, tol: float, shape: tuple[int, int]) -> None:
    f = smooth_object(*shape) + 0.05 * torch.randn(
        shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(0)
    )
    cs = CentralSpectrum(shape, (20.0, 20.0), width=width)
    g = torch.Generator().manual_seed(1)
    qy = (torch.rand(1, 200, generator=g, dtype=torch.float64) * 2 - 1) * 20
    qx = (torch.rand(1, 200, generator=g, dtype=torch.float64) * 2 - 1) * 20
    got = cs.evaluate(cs.spectra(f[None, None]), torch.tensor([0]), qy, qx)[0, 0]
    exact = direct_dtft(f, qy[0], qx[0])
    rel = float((got - exact).norm() / exact.norm())
    assert rel < tol


def test_central_spectrum_on_grid_equals_fft2c() -> None:
    f = smooth_object(40, 36)
    cs = CentralSpectrum((40, 36), (8.0, 8.0), width=6)
    ky = torch.tensor([[-3.0, 0.0, 5.0]], dtype=torch.float64)
    kx = torch.tensor([[2.0, 0.0, -7.0]], dtype=torch.float64)
    got = cs.evaluate(cs.spectra(f[None, None]), torch.tensor([0]), ky, kx)[0, 0]
    k = fft2c(f)
    expected = torch.stack([k[20 - 3, 18 + 2], k[20, 18], k[20 + 5, 18 - 7]])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(k.abs().max()))


def test_points_outside_region_raise() -> None:
    cs = CentralSpectrum((32, 32), (4.0, 4.0))
    spectra = cs.spectra(torch.zeros(1, 1, 32, 32, dtype=torch.complex64))
    with pytest.raises(ValueError, match="k_max"):
        cs.evaluate(spectra, torch.tensor([0]), torch.tensor([[12.0]]), torch.tensor([[0.0]]))
