"""Cartesian under-sampling and central crops.

"Every second row removed" keeps the rows with ``(row - n_ky // 2) % R == 0`` so the centre line is
always acquired; removed rows are dropped, not zero-filled.
"""

from __future__ import annotations

import torch

from kmotion.physics.validate import InputError


def _check_positive(name: str, value: int) -> None:
    if int(value) != value or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def acquired_rows(n_ky: int, acceleration: int = 2, device: torch.device | str | None = None) -> torch.Tensor:
    """Indices of the acquired rows: ``(row - n_ky // 2) % acceleration == 0``."""
    _check_positive("n_ky", n_ky)
    _check_positive("acceleration", acceleration)
    rows = torch.arange(n_ky, device=device)
    return rows[(rows - n_ky // 2) % acceleration == 0]


def row_mask(n_ky: int, acceleration: int = 2, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask ``(n_ky,)`` of acquired rows (see :func:`acquired_rows`)."""
    mask = torch.zeros(n_ky, dtype=torch.bool, device=device)
    mask[acquired_rows(n_ky, acceleration, device)] = True
    return mask


def remove_rows(kspace: torch.Tensor, acceleration: int = 2) -> torch.Tensor:
    """Keep only the acquired rows of ``(..., n_ky, n_kx)`` k-space (the others are dropped)."""
    return kspace.index_select(-2, acquired_rows(kspace.shape[-2], acceleration, kspace.device))


def _crop_slice(n: int, s: int, name: str) -> slice:
    _check_positive(name, s)
    if s > n:
        raise InputError(f"{name}={s} is larger than the axis length {n}")
    start = n // 2 - s // 2
    return slice(start, start + s)


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Central crop ``(s_y, s_x)`` of the last two axes; the centre index ``n // 2`` maps to ``s // 2``."""
    sy = _crop_slice(x.shape[-2], size[0], "s_y_crop")
    sx = _crop_slice(x.shape[-1], size[1], "s_x_crop")
    return x[..., sy, sx]


def crop_row_indices(n_ky: int, s_y: int, acceleration: int = 2) -> torch.Tensor:
    """Full-grid row indices of a central crop of ``s_y`` acquired rows.

    Rows ``n_ky // 2 + acceleration * j`` for ``j = -(s_y // 2) ... s_y - s_y // 2 - 1``, so the centre line
    sits at index ``s_y // 2`` of the crop.
    """
    _check_positive("s_y_crop", s_y)
    j = torch.arange(s_y) - s_y // 2
    rows = n_ky // 2 + acceleration * j
    if int(rows.min()) < 0 or int(rows.max()) >= n_ky:
        raise InputError(
            f"s_y_crop={s_y} acquired rows at acceleration {acceleration} do not fit in n_ky={n_ky}"
        )
    return rows


def crop_undersampled(kspace: torch.Tensor, size: tuple[int, int], acceleration: int = 2) -> torch.Tensor:
    """Central crop of the under-sampled k-space, taken from fully sampled ``(..., n_ky, n_kx)`` input.

    Equivalent to ``center_crop`` of ``remove_rows(kspace)`` around the centre line: ``size[0]`` counts
    acquired rows, ``size[1]`` readout samples.
    """
    rows = crop_row_indices(kspace.shape[-2], size[0], acceleration).to(kspace.device)
    sx = _crop_slice(kspace.shape[-1], size[1], "s_x_crop")
    return kspace.index_select(-2, rows)[..., sx]
