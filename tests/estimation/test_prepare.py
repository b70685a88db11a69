from __future__ import annotations

import pytest
import torch

from kmotion.estimation.prepare import to_network_grid
from kmotion.physics import InputError
from kmotion.simulation.study import StudyConfig, StudySimulator, draw_motion


def _obj(cfg: StudyConfig) -> torch.Tensor:
    n_y, n_x = cfg.matrix
    dy, dx = cfg.pixel_spacing_mm
    y = (torch.arange(n_y) - n_y // 2).double()[:, None] * dy
    x = (torch.arange(n_x) - n_x // 2).double()[None] * dx
    r = 0.35 * min(cfg.fov_mm)
    obj = torch.sigmoid((r**2 - x**2 - y**2) / 40) * (1 + 0.3 * torch.cos(x / 6) * torch.sin(y / 9))
    return obj.to(torch.complex64)[None, None]


def test_resampled_crops_equal_a_square_fov_simulation() -> None:
    """Data at 216 x 256 (FOV 185.6 x 220) resampled to an isotropic grid == simulating at FOV 185.6^2."""
    data = StudyConfig(matrix=(216, 256), fov_mm=(185.625, 220.0), crop=(16, 256), standardise=False)
    square = StudyConfig(matrix=(216, 216), fov_mm=(185.625, 185.625), crop=(16, 24), standardise=False)
    motion = draw_motion(3, (4.0, 4.0, 8.0), torch.Generator().manual_seed(0))
    idx = torch.zeros(3, dtype=torch.long)
    a = StudySimulator(data).simulate(_obj(data), motion, idx)
    ref, mov, grid = to_network_grid(a.reference, a.moved, data.fov_mm, (216, 216), (16, 24))
    # same object on the square grid: the object is inside the inscribed circle, so the crop loses nothing
    obj_sq = _obj(data)[..., :, 20:236]
    b = StudySimulator(square).simulate(obj_sq, motion, idx)
    rel = (mov - b.moved).norm() / b.moved.norm()
    assert float(rel) < 2e-3
    assert grid.mm_per_net_px == pytest.approx((185.625 / 216, 216 * 220 / 256 / 216))


def test_prepare_errors() -> None:
    z = torch.zeros(1, 1, 8, 64, dtype=torch.complex64)
    with pytest.raises(InputError, match="acquired rows"):
        to_network_grid(z, z, (220.0, 220.0), (448, 448), (16, 16))
    with pytest.raises(InputError, match="both be"):
        to_network_grid(z, z[:, :, :4], (220.0, 220.0), (448, 448), (4, 4))
