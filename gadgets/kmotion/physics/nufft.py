"""Evaluate the spectrum of images at arbitrary (non-grid) k-space points near the centre.

A type-2 NUFFT restricted to a central k-space disc, made for the study's simulation: the spectrum of a
base image is computed once on an oversampled fine grid covering only ``|k| <= k_max`` (two small
matrix products instead of a padded FFT), then evaluated at any point with a separable Kaiser-Bessel
kernel of ``width`` fine-grid taps.  Deapodisation makes it exact up to the kernel's truncation error
(about 1e-6 relative for ``width=6``, ``oversampling=2``).

Frequencies are in index units of the centred grid (cycles per FOV): the value at integer ``(ky, kx)`` is
``fft2c(img)[n_ky // 2 + ky, n_kx // 2 + kx]``.
"""

from __future__ import annotations

import math

import torch

from kmotion.physics.fft import centered_indices


def _kb_beta(width: int, oversampling: float) -> float:
    # Beatty, Nishimura, Pauly, IEEE TMI 2005, eq. 5
    return math.pi * math.sqrt((width / oversampling) ** 2 * (oversampling - 0.5) ** 2 - 0.8)


class CentralSpectrum:
    """Oversampled central spectrum of images ``(n_y, n_x)`` and Kaiser-Bessel interpolation from it.

    Parameters
    ----------
    shape
        Image matrix ``(n_y, n_x)``.
    k_max
        Largest ``|ky|`` and ``|kx|`` (index units) that will be evaluated.
    oversampling, width
        Fine-grid oversampling factor and kernel width in fine-grid taps (even).
    """

    def __init__(
        self,
        shape: tuple[int, int],
        k_max: tuple[float, float],
        oversampling: float = 2.0,
        width: int = 6,
        device: torch.device | str | None = None,
    ) -> None:
        if width % 2:
            raise ValueError(f"width must be even, got {width}")
        self.shape = shape
        self.oversampling = oversampling
        self.width = width
        self.h = 1.0 / oversampling
        self.beta = _kb_beta(width, oversampling)
        self.half = width * self.h / 2  # kernel half-support in index units
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # fine-grid index range per axis: j in [-J, J]
        self.n_fine: list[int] = []
        mats = []
        for n, kmax in zip(shape, k_max, strict=True):
            j_max = int(math.ceil(kmax / self.h)) + width // 2 + 1
            self.n_fine.append(2 * j_max + 1)
            u = torch.arange(-j_max, j_max + 1, dtype=torch.float64) * self.h
            pos = centered_indices(n, dtype=torch.float64)
            deapod = self.h / self._kernel_ft(pos / n)
            mat = torch.polar(deapod.expand(len(u), n), -2 * math.pi * u[:, None] * pos[None] / n)
            mats.append((mat / math.sqrt(n)).to(torch.complex64).to(self.device))
        self.j_max = [(m - 1) // 2 for m in self.n_fine]
        self.a_y, self.a_x = mats

    def _kernel(self, s: torch.Tensor) -> torch.Tensor:
        """Kaiser-Bessel kernel at offsets ``s`` (index units); zero outside the support."""
        z = 1 - (s / self.half) ** 2
        return torch.where(z >= 0, torch.special.i0(self.beta * torch.sqrt(z.clamp_min(0))), 0.0)

    def _kernel_ft(self, t: torch.Tensor) -> torch.Tensor:
        """Continuous Fourier transform of the kernel at ``t`` = position / n (analytic)."""
        length = 2 * self.half
        arg = self.beta**2 - (math.pi * length * t) ** 2
        root = torch.sqrt(arg.abs().clamp_min(1e-30))
        ft = torch.where(arg > 0, torch.sinh(root) / root, torch.sin(root) / root)
        return length * ft

    def spectra(self, images: torch.Tensor) -> torch.Tensor:
        """Fine-grid central spectra ``(..., n_fine_y, n_fine_x)`` of images ``(..., n_y, n_x)``."""
        if tuple(images.shape[-2:]) != tuple(self.shape):
            raise ValueError(f"images have matrix {tuple(images.shape[-2:])}, expected {self.shape}")
        images = images.to(self.device, torch.complex64)
        return self.a_y @ images @ self.a_x.transpose(0, 1)

    def _taps(self, q: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
        """First fine-grid tap index (0-based in the fine array) and the ``width`` weights for ``q``."""
        j0 = torch.floor(q / self.h).to(torch.int64) - self.width // 2 + 1
        offs = torch.arange(self.width, device=q.device)
        j = j0[..., None] + offs
        w = self._kernel(q[..., None] - j.to(q.dtype) * self.h)
        return j0 + self.j_max[axis], w

    def evaluate(
        self, spectra: torch.Tensor, index: torch.Tensor, qy: torch.Tensor, qx: torch.Tensor
    ) -> torch.Tensor:
        """Spectrum values at points ``(qy, qx)``.

        Parameters
        ----------
        spectra
            ``(n_images, n_ch, n_fine_y, n_fine_x)`` from :meth:`spectra`.
        index
            ``(B,)`` which image each row of points belongs to.
        qy, qx
            ``(B, P)`` frequencies in index units (float64 or float32), ``|q| <= k_max``.

        Returns
        -------
        ``(B, n_ch, P)`` complex64.
        """
        n_images, n_ch, nfy, nfx = spectra.shape
        j0y, wy = self._taps(qy.to(torch.float64), 0)
        j0x, wx = self._taps(qx.to(torch.float64), 1)
        if int(j0y.min()) < 0 or int(j0y.max()) + self.width > nfy or int(j0x.min()) < 0 or (
            int(j0x.max()) + self.width > nfx
        ):
            raise ValueError("k-space points outside the precomputed central region (k_max too small)")
        offs = torch.arange(self.width, device=qy.device)
        base = index.to(qy.device)[:, None] * (nfy * nfx)
        flat_y = base[..., None] + (j0y[..., None] + offs) * nfx  # (B, P, W)
        flat = flat_y[..., :, None] + (j0x[..., None] + offs)[..., None, :]
        # flat: (B, P, W, W)
        src = spectra.permute(0, 2, 3, 1).reshape(-1, n_ch)
        vals = src[flat.reshape(-1)].reshape(flat.shape + (n_ch,))
        w2 = (wy[..., :, None] * wx[..., None, :]).to(torch.float32)
        out = torch.einsum("bpyxc,bpyx->bcp", vals, w2.to(vals.dtype))
        return out
