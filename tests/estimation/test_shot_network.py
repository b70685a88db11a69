"""The per-shot network: architecture with a mask channel, storage, input preparation, the estimator's units,
the training simulation against the full-grid simulation, and a training smoke test."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import REPO_ROOT

from kmotion.estimation.shot_network import (
    ShotGrid,
    ShotNetworkEstimator,
    crop_shot_grid,
    shot_inputs,
    virtual_coils,
)
from kmotion.network import KMotionNet, NetConfig, load_model, save_model
from kmotion.physics.validate import InputError
from kmotion.simulation.multishot import shot_kspace, shot_sampling
from kmotion.simulation.phantoms import coil_maps_from_coefficients, make_coil_coefficients, make_phantoms
from kmotion.simulation.study import compress_coils
from model_training.shot_study import ShotStudyConfig, draw_masks, simulate_batch, simulate_crops
from model_training.shot_train import ShotTrainConfig, default_net, train_shots

TINY = ShotGrid(matrix=(64, 64), crop=(32, 16), n_virtual=1)


def _net(grid: ShotGrid = TINY) -> KMotionNet:
    torch.manual_seed(0)
    cfg = NetConfig(
        in_channels=4 * grid.n_virtual + 1,
        crop=grid.crop,
        features="reim+mag+cross",
        mask_channel=True,
        n_outputs=3,
        n_conv=2,
        kernel_size=3,
        max_channels=8,
        min_size=4,
    )
    return KMotionNet(cfg).eval()


def test_mask_channel_architecture_shapes() -> None:
    net = _net(ShotGrid(matrix=(64, 64), crop=(32, 16), n_virtual=2))
    x = torch.randn(3, 9, 32, 16)
    assert net(x).shape == (3, 3)
    feats = net.represent(x)
    # 8 features per virtual coil (Re/Im ref, Re/Im shot, 2 log-magnitudes, cross-power) + the mask, unchanged
    assert feats.shape == (3, 17, 32, 16)
    torch.testing.assert_close(feats[:, -1], x[:, -1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected input"):
        net(torch.randn(3, 8, 32, 16))
    with pytest.raises(ValueError, match="4 per coil \\+ 1 mask channel"):
        NetConfig(in_channels=8, mask_channel=True)
    # configs stored before the mask channel existed load as before
    old = json.loads((REPO_ROOT / "gadgets/kmotion/models/default.json").read_text())["net"]
    assert "mask_channel" not in old and NetConfig.from_dict(old).mask_channel is False


def test_save_load_round_trip_without_pickles(tmp_path: Path) -> None:
    net = _net()
    path = save_model(tmp_path / "shot.safetensors", net, {"shot_grid": TINY.to_dict()})
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8 : 8 + 1] == b"{" and json.loads(raw[8 : 8 + header_len])  # a safetensors header, no pickle
    loaded, info = load_model(path)
    assert loaded.config == net.config and info["shot_grid"]["crop"] == [32, 16]
    x = torch.randn(4, 5, 32, 16)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    est = ShotNetworkEstimator.load(path, "cpu")
    assert est.grid == TINY
    # the repetition network is not a per-shot network
    plain = save_model(tmp_path / "plain.safetensors", KMotionNet(NetConfig(crop=(8, 16), n_conv=2)), {})
    with pytest.raises(InputError, match="not a per-shot network"):
        ShotNetworkEstimator.load(plain, "cpu")


def test_virtual_coils_match_the_svd_compression() -> None:
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(4, 6, 8, 12, dtype=torch.complex64, generator=g)
    mov = torch.randn(4, 6, 8, 12, dtype=torch.complex64, generator=g)
    a_ref, a_mov = virtual_coils(ref, mov, 2)
    b_ref, b_mov = compress_coils(ref, mov, 2)
    torch.testing.assert_close(a_ref, b_ref, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(a_mov, b_mov, rtol=1e-3, atol=1e-4)


def test_shot_inputs_standardised_masked_and_scale_free() -> None:
    g = torch.Generator().manual_seed(4)
    ref = torch.randn(2, 4, 32, 16, dtype=torch.complex64, generator=g)
    shot = torch.randn(2, 4, 32, 16, dtype=torch.complex64, generator=g)
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[0, ::4] = True
    mask[1, 10:14] = True
    x = shot_inputs(ref, shot, mask, 1)
    assert x.shape == (2, 5, 32, 16)
    torch.testing.assert_close(x[:, :2].square().sum(1).mean((1, 2)), torch.ones(2), rtol=1e-5, atol=1e-5)
    assert float(x[:, 2:4].abs().sum(1)[~mask].max()) == 0.0  # rows outside the shot are zero
    torch.testing.assert_close(x[:, 4], mask[:, :, None].float().expand(2, 32, 16), rtol=0, atol=0)
    factor = 3.0 * complex(math.cos(0.7), math.sin(0.7))
    torch.testing.assert_close(shot_inputs(ref * factor, shot * factor, mask, 1), x, rtol=1e-4, atol=1e-4)


def test_estimator_on_a_tiny_grid_returns_finite_poses_in_data_pixels(tmp_path: Path) -> None:
    path = save_model(tmp_path / "shot.safetensors", _net(), {"shot_grid": TINY.to_dict()})
    est = ShotNetworkEstimator.load(path, "cpu")
    n = 128  # data at twice the network's resolution, same FOV, readout oversampled x2
    obj = make_phantoms(1, (n, n), (220.0, 220.0), generator=11)
    maps = coil_maps_from_coefficients(make_coil_coefficients(1, 4, (n, n), generator=12), (n, n))
    samp = shot_sampling(n, 16, "linear", acceleration=2)
    poses = np.zeros((samp.n_shots, 3))
    poses[:, 0] = 3.0
    k = shot_kspace(obj[0], maps[0], samp, poses, readout_oversampling=2)  # (4, n, 2n)
    ref = shot_kspace(
        obj[0], maps[0], shot_sampling(n, n, "linear"), np.zeros((1, 3)), readout_oversampling=2
    )
    masks = samp.masks()
    p = samp.n_shots
    out = est.estimate(ref[None], k[None].expand(p, -1, -1, -1), masks, (n, 2 * n), (220.0, 440.0))
    inside = masks[:, n // 2 - 16 : n // 2 + 16].any(1)
    assert out.motion.shape == (p, 3) and bool((out.valid == inside).all())
    assert bool(torch.isfinite(out.motion[inside]).all()) and bool(out.motion[~inside].isnan().all())
    assert 0 < int(inside.sum()) < p  # the outer bands of a linear ordering get no seed
    # units: network pixels (220 / 64 mm) -> the data's (220 / 128 mm in y, 440 / 256 mm in x): x 2
    ref_n, shot_n, mask_n, mm = crop_shot_grid(
        ref[None].expand(p, -1, -1, -1), k[None].expand(p, -1, -1, -1), masks, (220.0, 440.0), TINY
    )
    assert mm == pytest.approx((220 / 64, 220 / 64))
    net = est.predict(shot_inputs(ref_n, shot_n, mask_n, 1)).double()
    expected = net[inside] * torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(out.motion[inside], expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(InputError, match="masks must be"):
        est.estimate(ref[None], k[None].expand(p, -1, -1, -1), masks[:, :-1], (n, 2 * n), (220.0, 440.0))


def test_training_simulation_matches_the_full_grid_simulation() -> None:
    grid = ShotGrid(matrix=(96, 96), crop=(48, 24), n_virtual=1)
    obj = make_phantoms(1, grid.matrix, grid.fov_mm, generator=5)
    coef = make_coil_coefficients(1, 4, grid.matrix, grid.fov_mm, 4, generator=6)
    maps = coil_maps_from_coefficients(coef, grid.matrix)
    motion = torch.tensor([[3.5, -4.0, 8.0], [-2.0, 1.5, -6.0]], dtype=torch.float64)
    ref, mov = simulate_crops(obj, coef, motion, torch.tensor([0, 0]), grid, 72)
    whole = shot_sampling(96, 96, "linear")
    r0, c0 = 48 - 24, 48 - 12
    for i in range(2):
        full = shot_kspace(obj[0], maps[0], whole, motion[i : i + 1].numpy(), grid.pixel_spacing_mm)
        crop = full[:, r0 : r0 + 48, c0 : c0 + 24]
        assert float((mov[i] - crop).norm() / crop.norm()) < 2e-3
    full0 = shot_kspace(obj[0], maps[0], whole, np.zeros((1, 3)), grid.pixel_spacing_mm)
    torch.testing.assert_close(ref[0], full0[:, r0 : r0 + 48, c0 : c0 + 24], rtol=1e-4, atol=1e-5)


def test_drawn_shots_are_shots_of_their_acquisitions() -> None:
    cfg = ShotStudyConfig(
        grid=ShotGrid(matrix=(64, 64), crop=(32, 16)), echo_train_lengths=(8,), sim_matrix=56
    )
    masks, names = draw_masks(cfg, 40, np.random.default_rng(0))
    assert masks.shape == (40, 32) and bool(masks.any(1).all()) and set(names) <= set(cfg.orderings)
    for m, o in zip(masks, names, strict=True):
        rows = set((torch.nonzero(m).flatten() + 16).tolist())
        shots = [
            set(s) & set(range(16, 48))
            for a in (1, 2, 3)
            for c in (0, 24, 32)
            for s in shot_sampling(64, 8, o, a, c if a > 1 else 0).shots
        ]
        assert rows in shots


def test_training_smoke(tmp_path: Path) -> None:
    cfg = ShotTrainConfig(
        study=ShotStudyConfig(grid=TINY, n_coils=4, sim_matrix=56, echo_train_lengths=(4, 8)),
        net=replace(default_net(), n_conv=2, kernel_size=3, max_channels=8, min_size=4),
        pool=256,
        n_train=256,
        n_val=64,
        epochs=2,
        batch_size=32,
        chunk=128,
    )
    result = train_shots(cfg, tmp_path)
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert all(math.isfinite(h["euclidean_loss"]) for h in result["history"])
    for name in ("model.safetensors", "model.json", "checkpoint.pt", "history.json", "figure2.png"):
        assert (tmp_path / name).stat().st_size > 0
    est = ShotNetworkEstimator.load(tmp_path / "model.safetensors", "cpu")
    info = json.loads((tmp_path / "model.json").read_text())
    assert est.grid == TINY and set(info["training"]["validation_per_ordering"]) <= set(cfg.study.orderings)


SHIPPED = REPO_ROOT / "gadgets" / "kmotion" / "models" / "shot.safetensors"


def test_shipped_per_shot_network_loads_and_reads_translations() -> None:
    """The shipped weights load with their grid and, on held-out phantoms, estimate the translation of a shot
    far better than chance (the rotation it did not learn: docs/intra_scan.md)."""
    est = ShotNetworkEstimator.load(SHIPPED, "cpu")
    info = json.loads(SHIPPED.with_suffix(".json").read_text())
    study = ShotStudyConfig(**info["study"])
    assert est.grid == study.grid
    batch = simulate_batch(study, 64, 7_000_000)  # phantoms of a seed never used in training
    pred = est.predict(batch.inputs)
    err = (pred - batch.motion).abs().mean(0)
    chance = study.grid.motion_range() / 2  # MAE of predicting zero for a uniform pose
    assert float(err[0]) < 0.5 * float(chance[0])
    assert bool(torch.isfinite(pred).all())
