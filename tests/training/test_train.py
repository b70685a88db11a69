"""Training: the loop runs, learns, writes Figure 2 / checkpoint / weights, resumes; DDP with gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kmotion.network import KMotionNet, NetConfig, load_model
from kmotion.simulation.study import StudyConfig
from model_training.metrics import convergence, euclidean_loss, summarise
from model_training.train import TrainConfig, main, train

SMALL = dict(matrix=(64, 64), crop=(16, 16), motion_range=(6.0, 6.0, 6.0))


def _cfg(**kw) -> TrainConfig:
    base = dict(
        study=StudyConfig(**SMALL),
        net=NetConfig(n_conv=2, kernel_size=3),
        n_train=384,
        n_val=96,
        epochs=2,
        batch_size=32,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_training_writes_outputs_and_learns_translation(tmp_path: Path) -> None:
    cfg = _cfg(epochs=6, n_train=1024, lr=3e-3)
    result = train(cfg, tmp_path)
    hist = result["history"]
    assert len(hist) == 6
    # trained network beats predicting zero (MAE of U[-6, 6] is 3 px)
    assert min(h["mae_dx_px"] for h in hist) < 2.5
    for name in ("model.safetensors", "model.json", "checkpoint.pt", "history.json", "figure2.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert any((tmp_path / "tensorboard").iterdir())
    model, info = load_model(tmp_path / "model.safetensors")
    assert info["study"]["matrix"] == [64, 64]
    assert info["training"]["validation"]["mean_inplane_mae"] == pytest.approx(
        min(h["mean_inplane_mae"] for h in hist), rel=1e-6
    )
    assert model(torch.zeros(2, 4, 16, 16)).shape == (2, 6)


def test_resume_continues_from_checkpoint(tmp_path: Path) -> None:
    train(_cfg(epochs=1), tmp_path)
    result = train(_cfg(epochs=3), tmp_path, resume=True)
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    assert json.loads((tmp_path / "history.json").read_text())[-1]["epoch"] == 3


def test_fresh_samples_mode_runs(tmp_path: Path) -> None:
    result = train(_cfg(fresh=True, epochs=1, n_train=128), None)
    assert len(result["history"]) == 1


def test_metrics_definitions() -> None:
    scale = torch.tensor([10.0, 10.0, 1.0, 1.0, 1.0, 5.0])
    target = torch.zeros(4, 6)
    pred = torch.zeros(4, 6)
    pred[:, 0] = 0.1  # 1 px
    pred[:, 5] = -0.2  # 1 deg
    m = summarise(pred, target, scale)
    assert m["mae_dx_px"] == pytest.approx(1.0) and m["mae_phi_deg"] == pytest.approx(1.0)
    assert m["mean_inplane_mae"] == pytest.approx(2 / 3)
    assert float(euclidean_loss(pred, target)) == pytest.approx((0.01 + 0.04) ** 0.5, rel=1e-5)
    c = convergence([{**m, "mean_inplane_mae": v} for v in (7.0, 3.0, 1.5, 1.0)])
    assert c["converged"] and c["epochs_to_convergence"] == 3
    assert not convergence([{**m, "mean_inplane_mae": v} for v in (7.0, 6.5)])["converged"]


def test_net_config_options() -> None:
    for kw in (
        dict(downsample="maxpool", kernel_size=4),
        dict(batch_norm=False, init="xavier"),
        dict(downsample_factor=3, n_fully=2),
    ):
        cfg = NetConfig(crop=(16, 16), n_conv=2, **kw)
        assert KMotionNet(cfg)(torch.randn(3, 4, 16, 16)).shape == (3, 6)
    with pytest.raises(ValueError, match="downsample"):
        NetConfig(downsample="avg")  # type: ignore[arg-type]


def test_cli_bad_option_is_clear(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path), "--loss", "mae", "--epochs", "0"]) == 2
    assert "epochs" in capsys.readouterr().out


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "model_training.train",
        "--out",
        str(tmp_path),
        "--matrix",
        "64",
        "64",
        "--crop",
        "16",
        "16",
        "--n-train",
        "256",
        "--n-val",
        "64",
        "--epochs",
        "2",
        "--n-conv",
        "2",
        "--kernel-size",
        "3",
        "--device",
        "cpu",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hist = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    assert (tmp_path / "model.safetensors").exists()


def test_swap_augmentation_is_the_exact_inverse_motion() -> None:
    """Simulate (ref, mov) with motion m and (mov-object as reference) check: swap gives inverse motion."""
    from kmotion.physics.motion import apply_motion_image
    from kmotion.simulation.study import StudySimulator
    from model_training.train import swap_half

    study = StudyConfig(matrix=(64, 60), fov_mm=(220.0, 200.0), crop=(16, 16), standardise=False)
    sim = StudySimulator(study)
    y = (torch.arange(64) - 32).double()[:, None] * study.pixel_spacing_mm[0]
    x = (torch.arange(60) - 30).double()[None] * study.pixel_spacing_mm[1]
    obj = torch.exp(-((x - 15) ** 2 + (y + 10) ** 2) / 300) + torch.exp(-((x + 20) ** 2 + y**2) / 200)
    obj = obj.to(torch.complex64)[None, None]
    motion = torch.tensor([[3.0, -2.0, 9.0]], dtype=torch.float64)
    batch = sim.simulate(obj, motion, torch.zeros(1, dtype=torch.long))
    scale = study.target_scale()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # until the random half includes our pair
        xs, ys = swap_half(batch.inputs, batch.targets, scale, study.pixel_spacing_mm, gen)
        if not torch.equal(xs, batch.inputs):
            break
    inv = (ys * scale)[0, [0, 1, 5]].double()
    # simulating the inverse motion from the moved object reproduces the original reference
    moved_obj = apply_motion_image(obj[0], 3.0, -2.0, 9.0, study.pixel_spacing_mm)[None]
    back = sim.simulate(moved_obj, inv[None], torch.zeros(1, dtype=torch.long))
    rel = (back.moved - batch.reference).norm() / batch.reference.norm()
    assert float(rel) < 1e-3
    torch.testing.assert_close(xs[0, :2], batch.inputs[0, 2:])


def test_pool_mode_runs(tmp_path: Path) -> None:
    result = train(
        _cfg(fresh=True, pool=128, pool_refresh=0.5, augment_swap=True, epochs=2, n_train=128), None
    )
    assert len(result["history"]) == 2


def test_reproduce_runs_and_resumes(tmp_path: Path) -> None:
    from model_training.reproduce import run_all

    tiny = dict(n_train=64, n_val=32, epochs=1, study=dict(matrix=(64, 64), crop=(16, 16)))
    rows = run_all(tmp_path, reduced=True, only=["baseline", "xavier"], device="cpu", overrides=tiny)
    assert [r["run"] for r in rows] == ["baseline", "xavier"]
    text = (tmp_path / "summary.md").read_text()
    assert "| baseline |" in text and "Xavier" in text
    mtime = (tmp_path / "baseline" / "history.json").stat().st_mtime
    run_all(tmp_path, reduced=True, only=["baseline"], device="cpu", overrides=tiny)
    assert (tmp_path / "baseline" / "history.json").stat().st_mtime == mtime  # finished runs are skipped
