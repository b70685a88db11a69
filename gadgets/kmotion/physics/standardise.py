"""Per-sample standardisation of a (reference, moved) k-space crop pair.

Definition: both crops of a sample are divided by **one real scale**, the root-mean-square magnitude of
the two crops together, ``s = sqrt(mean(|ref|^2 + |mov|^2) / 2)`` (over coils and samples).  No mean is
subtracted: a complex offset would break the phase-ramp / rotation structure the network has to read,
and a shared scale keeps reference and moved directly comparable.  After it the four real channels
have unit mean square jointly.
"""

from __future__ import annotations

import torch


def standardise_pair(
    ref: torch.Tensor, mov: torch.Tensor, eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale ``ref`` and ``mov`` ``(B, ..., s_y, s_x)`` by one real scale per sample.

    Returns ``(ref / s, mov / s, s)`` with ``s`` of shape ``(B,)``.
    """
    dims = tuple(range(1, ref.ndim))
    power = (ref.abs() ** 2).mean(dim=dims) + (mov.abs() ** 2).mean(dim=dims)
    s = torch.sqrt(power / 2).clamp_min(eps)
    shape = (-1,) + (1,) * (ref.ndim - 1)
    return ref / s.reshape(shape), mov / s.reshape(shape), s


def to_channels(ref: torch.Tensor, mov: torch.Tensor) -> torch.Tensor:
    """Stack complex crops ``(B, n_coils, s_y, s_x)`` into real channels ``(B, 4 * n_coils, s_y, s_x)``.

    Channel order per coil ``c``: ``[4c] = Re ref, [4c+1] = Im ref, [4c+2] = Re mov, [4c+3] = Im mov``;
    for one coil that is the abstract's 4 channels.
    """
    stacked = torch.stack([ref.real, ref.imag, mov.real, mov.imag], dim=2)
    return stacked.flatten(1, 2)
