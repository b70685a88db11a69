"""The shipped default model loads without pickles and estimates motion better than chance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kmotion.estimation.network import NetworkEstimator
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
    out = est.estimate(batch.reference, batch.moved)
    mae = (out.motion - batch.motion).abs().mean(0)
    # predicting zero gives 6 px / 6 deg for U[-12, 12]; the shipped model must be far better
    assert float(mae[0]) < 3.0 and float(mae[1]) < 3.0 and float(mae[2]) < 4.5
