"""Input validation with messages that name the problem (field, expected vs. got)."""

from __future__ import annotations

import numpy as np
import torch


class InputError(ValueError):
    """Raised for bad user input: wrong dtype or shape, non-finite values, missing fields."""


def check_complex(x: torch.Tensor | np.ndarray, name: str, min_ndim: int = 2) -> torch.Tensor:
    """Return ``x`` as a complex torch tensor or raise :class:`InputError` naming the problem.

    Real floating input is promoted to complex64; integer, boolean or non-finite input is refused.
    """
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.complexfloating) or np.issubdtype(x.dtype, np.floating)):
            raise InputError(f"{name}: expected a complex or floating array, got dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}")
    if not (x.is_complex() or x.is_floating_point()):
        raise InputError(f"{name}: expected a complex or floating tensor, got dtype {x.dtype}")
    if x.ndim < min_ndim:
        raise InputError(
            f"{name}: expected at least {min_ndim} dimensions (..., n_y, n_x), got shape {tuple(x.shape)}"
        )
    if not x.is_complex():
        x = x.to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)
    if not bool(torch.isfinite(torch.view_as_real(x)).all()):
        n_bad = int((~torch.isfinite(torch.view_as_real(x))).any(-1).sum())
        raise InputError(f"{name}: contains {n_bad} non-finite (NaN or Inf) samples")
    return x
