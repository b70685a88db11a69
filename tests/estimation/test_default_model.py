"""The shipped default model loads without pickles and estimates motion better than chance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kmotion.estimation.network import NetworkEstimator
from kmotion.physics import InputError
from kmotion.simulation.sources import PhantomSource, sample_pairs
from kmotion.simulation.study import StudyConfig, StudySimulator

DEFAULT = Path(__file__).resolve().parents[2] / "gadgets" / "kmotion" / "models" / "default.safetensors"


@pytest.mark.slow
def test_default_model_beats_chance_on_unseen_phantoms() -> None:
    if not DEFAULT.exists():
        pytest.skip("no shipped model in this checkout")
    est = NetworkEstimator.load(DEFAULT, device="cpu")
    assert est.study.matrix == (448, 448)
    cfg = StudyConfig(**{**est.study.to_dict(), "snr_range": None, "snr": None})
    batch = sample_pairs(StudySimulator(cfg), PhantomSource(cfg), 96, torch.Generator().manual_seed(424242))
    net = NetworkEstimator.load(DEFAULT, device="cpu", refine=False).estimate(batch.reference, batch.moved)
    mae = (net.motion - batch.motion).abs().mean(0)
    # predicting zero gives 6 px / 6 deg for U[-12, 12]; the network alone must be far better
    assert float(mae[0]) < 3.0 and float(mae[1]) < 3.0 and float(mae[2]) < 4.5
    # the shipped estimator (network + data-consistency refinement): measured ~0.07 px / 0.02 px / 0.07 deg
    out = est.estimate(batch.reference, batch.moved)
    assert out.network is not None
    torch.testing.assert_close(out.network, net.motion, rtol=0, atol=1e-5)
    mae_refined = (out.motion - batch.motion).abs().mean(0)
    assert float(mae_refined.max()) < 0.25, mae_refined
    # flagged: at the trained range's edge (|motion| >= 0.95 x 12) or network and refinement > 3 apart
    assert out.unreliable is not None
    edge = (out.motion.abs() >= 0.95 * 12.0).any(-1)
    far = ((out.motion - net.motion).abs() > 3.0).any(-1)
    assert torch.equal(out.unreliable, edge | far)


@pytest.mark.slow
def test_default_estimator_on_a_non_square_grid_in_data_pixels() -> None:
    """216 phase-encoding rows x 256 readout, square 0.86 mm pixels, 8 coils: answers in the data's pixels."""
    if not DEFAULT.exists():
        pytest.skip("no shipped model in this checkout")
    est = NetworkEstimator.load(DEFAULT, device="cpu")
    cfg = StudyConfig(
        matrix=(216, 256),
        fov_mm=(216 * 220 / 256, 220.0),
        crop=(64, 256),
        n_coils=8,
        motion_range=(5.0, 5.0, 10.0),
        standardise=False,
    )
    batch = sample_pairs(StudySimulator(cfg), PhantomSource(cfg), 24, torch.Generator().manual_seed(99))
    out = est.estimate_data(batch.reference, batch.moved, cfg.matrix, cfg.fov_mm, cfg.acceleration)
    err = (out.motion - batch.motion).abs()
    assert float(err.max()) < 0.5, err.max(0)
    assert float(err.mean()) < 0.1, err.mean(0)
    with pytest.raises(InputError, match="readout"):
        est.estimate_data(batch.reference[..., :128], batch.moved[..., :128], cfg.matrix, cfg.fov_mm, 2)
