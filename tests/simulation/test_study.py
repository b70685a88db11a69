"""The study's simulation: fast k-space path vs. the image-domain version, seeds, targets, config."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import smooth_object

from kmotion.physics import InputError
from kmotion.simulation.study import (
    StudyConfig,
    StudySimulator,
    draw_motion,
    simulate_image_domain,
)


def _objects(cfg: StudyConfig, n: int) -> torch.Tensor:
    return torch.stack([smooth_object(*cfg.matrix, cfg.pixel_spacing_mm, seed=i) for i in range(n)])[:, None]


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


@pytest.mark.parametrize(
    "matrix,fov,crop",
    [
        ((96, 96), (220.0, 220.0), (16, 32)),
        ((97, 90), (230.0, 200.0), (15, 21)),
        ((128, 108), (220.0, 186.0), (32, 32)),
    ],
)
def test_fast_path_matches_image_domain(matrix, fov, crop) -> None:
    cfg = StudyConfig(matrix=matrix, fov_mm=fov, crop=crop, standardise=False)
    objects = _objects(cfg, 2)
    motion = draw_motion(6, cfg.motion_range, torch.Generator().manual_seed(3))
    index = torch.tensor([0, 1, 0, 1, 0, 1])
    fast = StudySimulator(cfg).simulate(objects, motion, index)
    ref, mov = simulate_image_domain(cfg, objects, motion, index)
    assert float(_rel(fast.reference, ref).max()) < 1e-5
    assert float(_rel(fast.moved, mov).max()) < 1e-3


def test_fast_path_with_fixed_coils_matches_image_domain() -> None:
    cfg = StudyConfig(
        matrix=(96, 90), fov_mm=(220.0, 206.0), crop=(16, 24), n_coils=3, coil_half_width=2, standardise=False
    )
    objects = _objects(cfg, 1)
    g = torch.Generator().manual_seed(0)
    coef = torch.randn(1, 3, 5, 5, dtype=torch.complex64, generator=g)
    m = torch.arange(-2, 3).double()
    y = (torch.arange(96) - 48).double()
    x = (torch.arange(90) - 45).double()
    ey = torch.exp(2j * math.pi * m[:, None] * y[None] / 96)
    ex = torch.exp(2j * math.pi * m[:, None] * x[None] / 90)
    maps = torch.einsum("bcij,iy,jx->bcyx", coef.to(torch.complex128), ey, ex).to(torch.complex64)
    motion = draw_motion(4, cfg.motion_range, torch.Generator().manual_seed(1))
    index = torch.zeros(4, dtype=torch.long)
    fast = StudySimulator(cfg).simulate(objects, motion, index, coil_coefficients=coef)
    ref, mov = simulate_image_domain(cfg, objects, motion, index, coil_maps=maps)
    assert fast.moved.shape == (4, 3, 16, 24)
    assert float(_rel(fast.reference, ref).max()) < 1e-5
    assert float(_rel(fast.moved, mov).max()) < 1e-3


def test_targets_channels_and_standardisation() -> None:
    cfg = StudyConfig(matrix=(64, 64), crop=(8, 16))
    objects = _objects(cfg, 1)
    motion = torch.tensor([[12.0, -6.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    batch = StudySimulator(cfg).simulate(objects, motion, torch.zeros(2, dtype=torch.long))
    assert batch.inputs.shape == (2, 4, 8, 16) and batch.inputs.dtype == torch.float32
    scale = 12.0 * cfg.target_margin
    torch.testing.assert_close(
        batch.targets[0], torch.tensor([12 / scale, -6 / scale, 0, 0, 0, 3 / scale]), rtol=1e-6, atol=1e-6
    )
    assert float(batch.targets.abs().max()) < 1.0
    torch.testing.assert_close(
        batch.inputs.pow(2).mean(dim=(1, 2, 3)), torch.full((2,), 0.5), rtol=1e-5, atol=1e-5
    )
    # zero motion: moved == reference
    torch.testing.assert_close(batch.moved[1], batch.reference[1], rtol=1e-3, atol=1e-3)


def test_noise_is_seeded_and_has_requested_sigma() -> None:
    cfg = StudyConfig(matrix=(64, 64), crop=(16, 32), standardise=False)
    objects = torch.zeros(1, 1, 64, 64, dtype=torch.complex64)
    motion = torch.zeros(50, 3, dtype=torch.float64)
    sim = StudySimulator(cfg)
    sigma = torch.tensor([0.3])
    a = sim.simulate(
        objects,
        motion,
        torch.zeros(50, dtype=torch.long),
        noise_sigma=sigma,
        generator=torch.Generator().manual_seed(7),
    )
    b = sim.simulate(
        objects,
        motion,
        torch.zeros(50, dtype=torch.long),
        noise_sigma=sigma,
        generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(a.moved, b.moved)
    measured = float(a.moved.abs().pow(2).mean().sqrt())
    assert measured == pytest.approx(0.3, rel=0.03)


def test_motion_draw_is_uniform_and_seeded() -> None:
    a = draw_motion(20000, (12.0, 6.0, 3.0), torch.Generator().manual_seed(0))
    b = draw_motion(20000, (12.0, 6.0, 3.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(
        a.abs().max(0).values, torch.tensor([12.0, 6.0, 3.0], dtype=torch.float64), rtol=1e-3, atol=0
    )
    torch.testing.assert_close(a.mean(0), torch.zeros(3, dtype=torch.float64), rtol=0, atol=0.15)


def test_default_config_is_the_abstracts() -> None:
    cfg = StudyConfig()
    assert cfg.matrix == (448, 448)
    assert cfg.fov_mm == (220.0, 220.0)
    assert cfg.motion_range == (12.0, 12.0, 12.0)
    assert cfg.acceleration == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"matrix": (1, 64)}, "matrix"),
        ({"fov_mm": (0.0, 220.0)}, "fov_mm"),
        ({"crop": (300, 64)}, "do not fit"),
        ({"crop": (8, 500)}, "s_x_crop"),
        ({"snr": -1.0}, "snr"),
        ({"motion_range": (1.0, 2.0)}, "motion_range"),
    ],
)
def test_config_errors_name_the_field(kwargs, match) -> None:
    with pytest.raises((InputError, ValueError), match=match):
        StudyConfig(**kwargs)


def test_simulate_rejects_wrong_matrix() -> None:
    cfg = StudyConfig(matrix=(64, 64), crop=(8, 8))
    with pytest.raises(InputError, match="expected shape"):
        StudySimulator(cfg).simulate(
            torch.zeros(1, 1, 32, 32, dtype=torch.complex64),
            torch.zeros(1, 3),
            torch.zeros(1, dtype=torch.long),
        )


def test_image_source_moves_all_channels_together() -> None:
    from kmotion.simulation.sources import ImageSource, sample_pairs

    cfg = StudyConfig(matrix=(64, 64), crop=(8, 16), pairs_per_base=4)
    images = torch.stack([smooth_object(64, 64, seed=1), 0.5 * smooth_object(64, 64, seed=2)])[None]
    src = ImageSource(images, cfg)
    batch = sample_pairs(StudySimulator(cfg), src, 8, torch.Generator().manual_seed(0))
    assert batch.inputs.shape == (8, 8, 8, 16)
    with pytest.raises(InputError, match="resize_matrix"):
        ImageSource(torch.zeros(1, 1, 32, 32, dtype=torch.complex64), cfg)


def test_sample_pairs_is_deterministic_by_seed() -> None:
    from kmotion.simulation.sources import PhantomSource, sample_pairs

    cfg = StudyConfig(matrix=(64, 64), crop=(8, 16), n_coils=2, snr=30.0, pairs_per_base=4)
    sim = StudySimulator(cfg)
    a = sample_pairs(sim, PhantomSource(cfg), 10, torch.Generator().manual_seed(5))
    b = sample_pairs(sim, PhantomSource(cfg), 10, torch.Generator().manual_seed(5))
    c = sample_pairs(sim, PhantomSource(cfg), 10, torch.Generator().manual_seed(6))
    torch.testing.assert_close(a.inputs, b.inputs, rtol=0, atol=0)
    torch.testing.assert_close(a.motion, b.motion, rtol=0, atol=0)
    assert not torch.allclose(a.inputs, c.inputs)


def test_nan_objects_are_rejected() -> None:
    cfg = StudyConfig(matrix=(32, 32), crop=(4, 8))
    obj = torch.zeros(1, 1, 32, 32, dtype=torch.complex64)
    obj[0, 0, 3, 3] = float("nan")
    with pytest.raises(InputError, match="non-finite"):
        StudySimulator(cfg).simulate(obj, torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))


def test_coil_compression_uses_the_same_weights_for_both() -> None:
    from kmotion.simulation.study import compress_coils

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 5, 8, 8, dtype=torch.complex64, generator=g)
    v_ref, v_ref2 = compress_coils(ref, ref.clone(), 1)
    torch.testing.assert_close(v_ref, v_ref2)
    assert v_ref.shape == (3, 1, 8, 8)
    # all virtual coils keep all energy
    full, _ = compress_coils(ref, ref, 5)
    torch.testing.assert_close(
        full.abs().pow(2).sum((1, 2, 3)), ref.abs().pow(2).sum((1, 2, 3)), rtol=1e-4, atol=0
    )
    # the leading virtual coil captures the most energy of any unit-norm combination
    first = v_ref.abs().pow(2).sum((1, 2, 3))
    assert bool((first >= ref[:, :1].abs().pow(2).sum((1, 2, 3)) / 1.0001).all())
    # virtual coil's centre sample is real and positive
    centre = v_ref[:, 0, 4, 4]
    assert float(centre.imag.abs().max()) < 1e-4 and bool((centre.real > 0).all())


def test_snr_range_and_virtual_coils_in_simulation() -> None:
    from kmotion.simulation.sources import PhantomSource, sample_pairs

    cfg = StudyConfig(matrix=(64, 64), crop=(8, 16), n_coils=4, virtual_coils=1, snr_range=(10.0, 100.0))
    batch = sample_pairs(StudySimulator(cfg), PhantomSource(cfg), 8, torch.Generator().manual_seed(0))
    assert batch.inputs.shape == (8, 4, 8, 16)
    with pytest.raises(InputError, match="snr_range"):
        StudyConfig(snr_range=(10.0, 5.0))
