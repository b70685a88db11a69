"""Centred orthonormal 2-D FFTs over the last two axes (the project's one FFT convention).

``K = fftshift(fft2(ifftshift(img)))`` with ``norm="ortho"``, shifts over ``(-2, -1)`` only.
Index ``n // 2`` is the centre (position 0, frequency 0); odd sizes work.
"""

from __future__ import annotations

import torch

_AXES = (-2, -1)


def fft2c(img: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal forward FFT over the last two axes: image ``(..., n_y, n_x)`` -> k-space."""
    return torch.fft.fftshift(
        torch.fft.fft2(torch.fft.ifftshift(img, dim=_AXES), dim=_AXES, norm="ortho"), dim=_AXES
    )


def ifft2c(kspace: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal inverse FFT over the last two axes: k-space ``(..., n_ky, n_kx)`` -> image."""
    return torch.fft.fftshift(
        torch.fft.ifft2(torch.fft.ifftshift(kspace, dim=_AXES), dim=_AXES, norm="ortho"), dim=_AXES
    )


def fft1c(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Centred orthonormal forward FFT along one axis (same convention as :func:`fft2c`)."""
    return torch.fft.fftshift(torch.fft.fft(torch.fft.ifftshift(x, dim=dim), dim=dim, norm="ortho"), dim=dim)


def ifft1c(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Centred orthonormal inverse FFT along one axis (same convention as :func:`ifft2c`)."""
    return torch.fft.fftshift(torch.fft.ifft(torch.fft.ifftshift(x, dim=dim), dim=dim, norm="ortho"), dim=dim)


def centered_indices(
    n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Positions (or frequencies) of a centred axis of length ``n``: ``arange(n) - n // 2``."""
    return torch.arange(n, device=device, dtype=dtype) - (n // 2)
