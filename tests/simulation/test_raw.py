"""``kmotion.simulation.raw``: header, flags, counts, the stored truth and its sign convention."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import ismrmrd
import numpy as np
import pytest
import torch

from kmotion.gadget import SliceBuffer, SliceGeometry, assemble, buffer_slices
from kmotion.io.ismrmrd_h5 import load_ismrmrd_h5, parse_encoding
from kmotion.io.ismrmrd_writer import read_true_motion, true_motion_from_header
from kmotion.physics.fft import fft2c, ifft2c
from kmotion.physics.motion import apply_motion_image, undo_motion_kspace
from kmotion.simulation.raw import NETWORK_RANGE_DEG, NETWORK_RANGE_MM, RawConfig, simulate_raw, write_raw

SMALL = RawConfig(
    matrix=(64, 48), fov_mm=(200.0, 150.0), n_coils=3, n_slices=2, n_repetitions=5, calibration_lines=8
)


@pytest.fixture(scope="module")
def small() -> object:
    return simulate_raw(replace(SMALL, waveforms=True))


def test_header_is_valid_and_complete(small) -> None:  # noqa: ANN001
    enc = parse_encoding(small.xml, "simulated")
    assert enc.encoded_matrix == (96, 64, 1)  # 2x readout oversampling in encodedSpace
    assert enc.encoded_fov_mm[:2] == (300.0, 200.0)
    assert enc.recon_matrix == (48, 64, 1) and enc.recon_fov_mm[:2] == (150.0, 200.0)
    assert enc.step1_limits == (0, 63, 32)
    assert enc.trajectory == "cartesian"
    geo = SliceGeometry.from_header(small.header)
    assert geo.acceleration == 2 and geo.echo_train_length == 8
    e0 = small.header.encoding[0]
    assert e0.parallelImaging.calibrationMode.value == "embedded"
    lim = e0.encodingLimits
    assert (lim.slice.maximum, lim.repetition.maximum) == (1, 4)
    n_lines = 32 + 4  # every second row + the off-grid half of the 8 calibration rows
    assert lim.segment.maximum == -(-n_lines // 8) - 1
    asi = small.header.acquisitionSystemInformation
    assert asi.receiverChannels == 3 and len(asi.coilLabel) == 3
    assert small.header.waveformInformation[0].waveformType.value == "respiratory"


def test_flags_counts_and_order(small) -> None:  # noqa: ANN001
    acqs = small.acquisitions
    assert acqs[0].is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    assert acqs[0].data.shape == (3, 96)
    lines = acqs[1:]
    assert len(lines) == 2 * 5 * 36
    assert len(small.waveforms) == 5
    assert all(a.data.shape == (3, 96) and a.center_sample == 48 for a in lines)
    stamps = [a.acquisition_time_stamp for a in acqs]
    assert stamps == sorted(stamps)
    for r in range(5):
        for s in range(2):
            grp = [a for a in lines if a.idx.repetition == r and a.idx.slice == s]
            assert len(grp) == 36
            assert grp[0].is_flag_set(ismrmrd.ACQ_FIRST_IN_SLICE)
            assert grp[-1].is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE)
            assert sum(a.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE) for a in grp) == 1
            ky = np.array([a.idx.kspace_encode_step_1 for a in grp])
            calib = np.array([a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) for a in grp])
            both = np.array([a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING) for a in grp])
            assert np.all(np.diff(ky) > 0)
            assert set(ky[~calib]) == set(range(0, 64, 2))  # (row - 32) % 2 == 0: centre row kept
            assert set(ky[calib]) == {29, 31, 33, 35} and set(ky[both]) == {28, 30, 32, 34}
            assert [a.idx.segment for a in grp] == [i // 8 for i in range(36)]
            assert {tuple(a.slice_dir) for a in grp} == {(0.0, 0.0, 1.0)}
            assert len({a.position[2] for a in grp}) == 1
    assert lines[0].is_flag_set(ismrmrd.ACQ_FIRST_IN_REPETITION)
    assert lines[-1].is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    assert {a.position[2] for a in lines} == {-3.0, 3.0}


def test_gadget_stages_accept_the_stream(small) -> None:  # noqa: ANN001
    out = list(buffer_slices(small.items, small.header))
    bufs = [o for o in out if isinstance(o, SliceBuffer)]
    assert len(bufs) == 10 and all(b.complete for b in bufs)
    a = assemble(bufs[0])
    assert a.correctable, a.reason
    assert a.kspace.shape == (3, 64, 48) and a.matrix == (64, 48)
    assert (a.acceleration, a.parity) == (2, 0) and a.mask.sum() == 32
    assert a.pixel_spacing_mm == (200.0 / 64, 150.0 / 48)


def test_truth_range_rotation_and_storage(tmp_path: Path) -> None:
    raw = simulate_raw(RawConfig(matrix=(64, 64), n_coils=2, n_slices=1, n_repetitions=12, snr=None))
    moved = [t for t in raw.truth if t.repetition > 0]
    assert len(moved) == 11 and all(t.slice == 0 for t in raw.truth)
    assert raw.truth[0].dx_px == raw.truth[0].dy_px == raw.truth[0].phi_deg == 0.0
    assert sum(abs(t.phi_deg) >= 5.0 for t in moved) >= len(moved) / 2
    assert max(abs(t.phi_deg) for t in moved) <= 0.8 * NETWORK_RANGE_DEG
    assert max(max(abs(t.dx_mm), abs(t.dy_mm)) for t in moved) <= 0.8 * NETWORK_RANGE_MM
    assert all(abs(t.dx_mm - t.dx_px * 220 / 64) < 1e-9 for t in moved)
    model = json.loads((Path(__file__).parents[2] / "gadgets/kmotion/models/default.json").read_text())
    study = model["study"]
    assert NETWORK_RANGE_MM == pytest.approx(
        study["motion_range"][0] * study["fov_mm"][0] / study["matrix"][0]
    )
    assert NETWORK_RANGE_DEG == study["motion_range"][2]
    path = write_raw(raw, tmp_path / "raw.h5")
    assert read_true_motion(path) == raw.truth
    assert true_motion_from_header(raw.header) == raw.truth
    assert not any(a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) for a in raw.acquisitions)  # no noise


def test_stored_truth_round_trips_through_the_physics(tmp_path: Path) -> None:
    """Fully sampled, noise-free: the file's coil images are apply_motion_image(object, truth) x fixed coils,
    and undoing the stored truth on the coil-combined moved image recovers the reference object."""
    cfg = RawConfig(
        matrix=(64, 56),
        fov_mm=(200.0, 175.0),
        n_coils=3,
        n_slices=1,
        n_repetitions=3,
        acceleration=1,
        calibration_lines=0,
        snr=None,
    )
    raw = simulate_raw(cfg)
    path = write_raw(raw, tmp_path / "full.h5")
    base = load_ismrmrd_h5(path)  # readout oversampling removed by the loader
    assert base.images.shape == (3, 3, 64, 56) and base.fov_mm == (200.0, 175.0)
    truth = read_true_motion(path)
    assert truth is not None
    obj = torch.from_numpy(raw.objects[0])
    maps = torch.from_numpy(raw.coil_maps[0])
    spacing = cfg.pixel_spacing_mm
    for t in truth:
        img = torch.from_numpy(base.images[t.repetition])
        expected = apply_motion_image(obj[None], t.dx_px, t.dy_px, t.phi_deg, spacing)[0] * maps
        assert float((img - expected).abs().max()) < 1e-4 * float(expected.abs().max())
        combined = (maps.conj() * img).sum(0) / (maps.abs().square().sum(0) + 1e-12)
        back = ifft2c(undo_motion_kspace(fft2c(combined[None]), t.dx_px, t.dy_px, t.phi_deg, spacing))[0]
        err = float((back - obj).abs().norm() / obj.abs().norm())
        assert err < 1e-3, (t, err)


def test_deterministic_and_motion_free_twin() -> None:
    cfg = RawConfig(matrix=(32, 32), n_coils=2, n_slices=1, n_repetitions=3, calibration_lines=4, seed=3)
    a = simulate_raw(cfg)
    b = simulate_raw(cfg)
    still = simulate_raw(replace(cfg, motion=((0.0, 0.0, 0.0),) * 3))
    for x, y, z in zip(a.acquisitions, b.acquisitions, still.acquisitions, strict=True):
        assert np.array_equal(x.data, y.data)
        if x.idx.repetition == 0:  # same objects, coils and noise; only the motion differs
            assert np.array_equal(x.data, z.data)
    assert all(t.phi_deg == 0 for t in still.truth)
