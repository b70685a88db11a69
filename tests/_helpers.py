"""Shared test helpers (imported as ``_helpers``; a unique name, unlike ``conftest``)."""

from __future__ import annotations

from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def smooth_object(
    n_y: int, n_x: int, spacing: tuple[float, float] = (1.0, 1.0), seed: int = 0
) -> torch.Tensor:
    """A smooth complex test object inside the inscribed circle, ``(n_y, n_x)`` complex64."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n_y) - n_y // 2).double() * spacing[0]
    x = (torch.arange(n_x) - n_x // 2).double() * spacing[1]
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    radius = 0.42 * min(n_y * spacing[0], n_x * spacing[1])
    obj = torch.sigmoid((radius**2 - xx**2 - yy**2) / (2.0 * radius))
    for _ in range(4):
        cy, cx = (torch.rand(2, generator=g, dtype=torch.float64) - 0.5) * radius
        r = (0.1 + 0.2 * float(torch.rand(1, generator=g))) * radius
        obj = obj + 0.5 * torch.sigmoid((r**2 - (xx - cx) ** 2 - (yy - cy) ** 2) / r)
    phase = 0.5 * xx / radius - 0.3 * yy / radius
    return (obj * torch.exp(1j * phase)).to(torch.complex64)
