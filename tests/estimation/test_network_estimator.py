from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kmotion.estimation.network import NetworkEstimator
from kmotion.network import KMotionNet, NetConfig, save_model
from kmotion.physics import InputError
from kmotion.simulation.sources import PhantomSource, sample_pairs
from kmotion.simulation.study import StudyConfig, StudySimulator


def _saved(tmp_path: Path) -> tuple[Path, StudyConfig]:
    study = StudyConfig(matrix=(64, 64), crop=(8, 16), standardise=True)
    model = KMotionNet(NetConfig(crop=study.crop, n_conv=2, kernel_size=3, features="reim+mag+cross"))
    path = save_model(tmp_path / "m.safetensors", model, {"study": study.to_dict()})
    return path, study


def test_estimator_loads_and_returns_physical_units(tmp_path: Path) -> None:
    path, study = _saved(tmp_path)
    est = NetworkEstimator.load(path, device="cpu")
    batch = sample_pairs(StudySimulator(study), PhantomSource(study), 5, torch.Generator().manual_seed(0))
    out = est.estimate(batch.reference, batch.moved)
    assert out.motion.shape == (5, 3) and out.at_range_edge.shape == (5,)
    # predictions are tanh outputs scaled by range * margin
    assert float(out.motion.abs().max()) <= 12.0 * study.target_margin + 1e-4
    # scale invariance of the network: standardisation inside the estimator
    net = NetworkEstimator.load(path, device="cpu", refine=False)
    out1 = net.estimate(batch.reference, batch.moved)
    out2 = net.estimate(batch.reference * 7, batch.moved * 7)
    torch.testing.assert_close(out1.motion, out2.motion, rtol=1e-4, atol=1e-4)
    assert out.network is not None
    torch.testing.assert_close(out.network, out1.motion, rtol=0, atol=1e-6)


def test_estimator_rejects_bad_crops(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    est = NetworkEstimator.load(path, device="cpu")
    with pytest.raises(InputError, match="crops must be"):
        est.estimate(
            torch.zeros(2, 1, 9, 16, dtype=torch.complex64), torch.zeros(2, 1, 9, 16, dtype=torch.complex64)
        )
    with pytest.raises(InputError, match="both be"):
        est.estimate(
            torch.zeros(2, 1, 8, 16, dtype=torch.complex64), torch.zeros(3, 1, 8, 16, dtype=torch.complex64)
        )


def test_missing_or_corrupt_model_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        NetworkEstimator.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match="not a readable safetensors"):
        NetworkEstimator.load(bad)
    pickle_like = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, pickle_like)
    with pytest.raises(InputError):
        NetworkEstimator.load(pickle_like)
