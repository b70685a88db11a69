"""``kmotion.simulation.multishot``: echo-train orderings, motion patterns and the k-space of one shot."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kmotion.physics.fft import fft2c
from kmotion.physics.motion import apply_motion_image
from kmotion.physics.validate import InputError
from kmotion.simulation.multishot import (
    MOTION_PATTERNS,
    ORDERINGS,
    acquired_rows,
    motion_pattern,
    shot_kspace,
    shot_sampling,
)
from kmotion.simulation.phantoms import coil_maps_from_coefficients, make_coil_coefficients, make_phantoms

GRIDS = [(31, 3, 1, 0), (64, 8, 1, 0), (64, 8, 2, 12), (96, 8, 2, 16), (96, 16, 3, 24), (256, 16, 2, 24)]


@pytest.mark.parametrize("ordering", ORDERINGS)
def test_every_row_once_and_no_train_longer_than_etl(ordering: str) -> None:
    for n_ky, etl, r, cal in GRIDS:
        s = shot_sampling(n_ky, etl, ordering, r, cal)
        rows = [row for shot in s.shots for row in shot]
        assert sorted(rows) == acquired_rows(n_ky, r, cal).tolist()  # each acquired row exactly once
        assert len(rows) == len(set(rows))
        assert all(1 <= len(shot) <= etl for shot in s.shots), (n_ky, etl, r, cal)
        assert s.n_shots == -(-len(rows) // etl)
        of_row = s.shot_of_row()
        echo = s.echo_of_row()
        for k, shot in enumerate(s.shots):
            assert of_row[list(shot)].tolist() == [k] * len(shot)
            assert echo[list(shot)].tolist() == list(range(len(shot)))
        assert s.masks().sum().item() == len(rows)


def test_orderings_follow_their_definition() -> None:
    n_ky, etl = 64, 8
    c = n_ky // 2
    rows = acquired_rows(n_ky, 2, 12).tolist()  # 38 rows -> 5 shots
    n_shots = 5
    lin = shot_sampling(n_ky, etl, "linear", 2, 12)
    assert [list(s) for s in lin.shots] == [rows[i * etl : (i + 1) * etl] for i in range(n_shots)]
    inter = shot_sampling(n_ky, etl, "interleaved", 2, 12)
    assert [list(s) for s in inter.shots] == [rows[i::n_shots] for i in range(n_shots)]
    cen = shot_sampling(n_ky, etl, "centric", 2, 12)
    by_dist = sorted(rows, key=lambda r: (abs(r - c), r))
    assert [list(s) for s in cen.shots] == [by_dist[i * etl : (i + 1) * etl] for i in range(n_shots)]
    assert cen.shots[0][0] == c  # echo 0 of shot 0 reads the centre
    for ordering in ("checkered", "linear_checkered"):
        chk = shot_sampling(n_ky, etl, ordering, 2, 12)
        central = set(sorted(rows, key=lambda r: (abs(r - c), r))[: max(2 * n_shots, 12)])
        for shot in chk.shots:
            mine = sorted(set(shot) & central)
            # every shot holds at least one pair of adjacent central rows
            assert any(b - a == 1 for a, b in itertools.pairwise(mine)), (ordering, shot)
            assert list(shot) == sorted(shot)
    lc = shot_sampling(n_ky, etl, "linear_checkered", 2, 12)
    outer = [sorted(set(s) - central) for s in lc.shots]
    flat = [r for o in outer for r in o]
    assert flat == sorted(flat)  # outer rows in consecutive bands


def test_bad_ordering_and_train_length() -> None:
    with pytest.raises(InputError, match="ordering"):
        shot_sampling(64, 8, "spiral")
    with pytest.raises(InputError, match="echo_train_length"):
        shot_sampling(64, 0)
    with pytest.raises(InputError, match="motion pattern"):
        motion_pattern(4, "wobble")


@pytest.mark.parametrize("pattern", MOTION_PATTERNS)
def test_motion_patterns_stay_in_range(pattern: str) -> None:
    spacing = (2.0, 0.5)
    m = motion_pattern(12, pattern, max_mm=6.0, max_deg=4.0, pixel_spacing_mm=spacing, seed=3)
    assert m.shape == (12, 3)
    assert np.all(np.abs(m[:, 0] * spacing[1]) <= 6.0 + 1e-9)
    assert np.all(np.abs(m[:, 1] * spacing[0]) <= 6.0 + 1e-9)
    assert np.all(np.abs(m[:, 2]) <= 4.0 + 1e-9)
    changes = int(np.any(np.diff(m, axis=0) != 0, axis=1).sum())
    if pattern == "none":
        assert not m.any()
    elif pattern == "jerk":
        assert changes == 1 and not m[0].any()
    elif pattern == "steps":
        assert 1 <= changes <= 4 and not m[0].any()
    else:
        assert changes >= 10
    assert np.array_equal(m, motion_pattern(12, pattern, 6.0, 4.0, spacing, seed=3))  # deterministic
    ref = motion_pattern(12, pattern, 6.0, 4.0, spacing, seed=3, reference_shot=5)
    assert not ref[5].any()


def _object_and_maps(n: int = 48, n_coils: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    obj = make_phantoms(1, (n, n), (200.0, 200.0), generator=g)[0].to(torch.complex64)
    coef = make_coil_coefficients(1, n_coils, (n, n), (200.0, 200.0), generator=g)
    return obj, coil_maps_from_coefficients(coef, (n, n))[0].to(torch.complex64)


def test_shot_kspace_rows_are_those_of_the_moved_object() -> None:
    obj, maps = _object_and_maps()
    s = shot_sampling(48, 6, "interleaved", 2, 8)
    motion = motion_pattern(s.n_shots, "random", 8.0, 8.0, (200 / 48, 200 / 48), seed=2)
    k = shot_kspace(obj, maps, s, motion, (200 / 48, 200 / 48))
    for i, rows in enumerate(s.shots):
        direct = fft2c(maps * apply_motion_image(obj[None], *motion[i], (200 / 48, 200 / 48))[0][None])
        torch.testing.assert_close(k[:, list(rows)], direct[:, list(rows)], rtol=0, atol=1e-5)
    assert not k[:, s.shot_of_row() < 0].any()  # rows not acquired stay zero


def test_shot_kspace_oversampling_and_t2() -> None:
    obj, maps = _object_and_maps()
    s = shot_sampling(48, 6, "linear", 1, 0)
    motion = np.zeros((s.n_shots, 3))
    decay = np.exp(-np.arange(1, 7) * 10.0 / 80.0)
    k = shot_kspace(obj, maps, s, motion, t2_decay=decay, readout_oversampling=2)
    assert k.shape == (3, 48, 96)
    padded = torch.zeros(3, 48, 96, dtype=torch.complex64)
    padded[..., 24:72] = maps * obj[None]
    full = fft2c(padded)
    echo = torch.as_tensor(decay[s.echo_of_row()], dtype=torch.float32)
    torch.testing.assert_close(k, full * echo[None, :, None], rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="t2_decay"):
        shot_kspace(obj, maps, s, motion, t2_decay=decay[:3])
    with pytest.raises(InputError, match="motion"):
        shot_kspace(obj, maps, s, motion[:2])
