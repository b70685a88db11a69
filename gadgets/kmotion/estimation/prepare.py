"""Bring k-space crops of any matrix and FOV onto the network's grid, and its answer back.

The network was trained on a square FOV (isotropic k-space spacing) with crops of ``crop`` acquired rows x
readout samples around the centre.  Data with another FOV or matrix is resampled along the fully sampled
readout only (exact, band-limited): the readout FOV is cropped or zero-padded in the image domain to the
phase-encoding FOV, which makes the k-space spacing isotropic (``1 / FOV_y`` in both directions) — objects
must lie inside the inscribed circle of the FOV (the project's convention), so cropping the readout FOV to
``FOV_y`` loses nothing.  Rotation is unchanged by this isotropic scaling; translations come back as
``t_mm = output_px * FOV_eff / n_net``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kmotion.physics.fft import fft1c, ifft1c
from kmotion.physics.validate import InputError


@dataclass
class GridMap:
    """How network outputs (pixels of the network's study grid) map to the data's millimetres."""

    mm_per_net_px: tuple[float, float]
    """(y, x): millimetres per network pixel for the data's effective (isotropic) FOV."""


def to_network_grid(
    reference: torch.Tensor,
    moved: torch.Tensor,
    fov_mm: tuple[float, float],
    net_matrix: tuple[int, int],
    net_crop: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, GridMap]:
    """Resample crops ``(B, n_coils, n_rows, n_kx)`` (acquired rows around the centre line, *all* readout
    samples) to the network's ``net_crop``.

    Parameters
    ----------
    reference, moved
        Complex k-space on the acquired rows (row ``n_rows // 2`` is the centre line) and the full readout.
    fov_mm
        ``(FOV_y, FOV_x)`` of the data's encoded grid.
    net_matrix, net_crop
        The network's study matrix and crop.
    """
    if reference.shape != moved.shape or reference.ndim != 4:
        raise InputError(
            f"reference and moved must both be (B, n_coils, n_rows, n_kx), got "
            f"{tuple(reference.shape)} and {tuple(moved.shape)}"
        )
    n_rows, n_kx = reference.shape[-2:]
    s_y, s_x = net_crop
    if n_rows < s_y:
        raise InputError(
            f"need at least {s_y} acquired rows around the centre for this network, got {n_rows}"
        )
    fov_y, fov_x = fov_mm
    px_x = fov_x / n_kx
    n_new = max(1, round(fov_y / px_x))  # readout samples spanning FOV_y
    fov_x_eff = n_new * px_x
    if n_new < s_x:
        raise InputError(f"the readout holds {n_new} samples over FOV_y, fewer than the network's crop {s_x}")

    def resample(k: torch.Tensor) -> torch.Tensor:
        img = ifft1c(k, -1)
        if n_new <= n_kx:
            start = n_kx // 2 - n_new // 2
            img = img[..., start : start + n_new]
        else:
            pad = torch.zeros((*img.shape[:-1], n_new), dtype=img.dtype, device=img.device)
            start = n_new // 2 - n_kx // 2
            pad[..., start : start + n_kx] = img
            img = pad
        # keep sample values: orthonormal FFT scales with sqrt(n); a shared scale is irrelevant downstream
        kx = fft1c(img, -1)
        c = n_new // 2 - s_x // 2
        r = n_rows // 2 - s_y // 2
        return kx[..., r : r + s_y, c : c + s_x]

    grid = GridMap(mm_per_net_px=(fov_y / net_matrix[0], fov_x_eff / net_matrix[1]))
    return resample(reference), resample(moved), grid
