"""``kmotion.simulation.intra_scan``: multi-shot raw data with motion between echo trains (issue 10, item 1).

Shot identity per ordering, the stored per-shot truth and its gauge, the forward model of one shot against a
direct simulation, T2 decay, the separate calibration scan in encoding space 1, counts, time stamps, flags,
the gadget's slice buffer on the stream, and ``kmotion simulate-raw --intra-scan``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest
import torch

from kmotion.cli import main
from kmotion.gadget import SliceBuffer, SliceGeometry, buffer_slices
from kmotion.gadget.calibration import geometry_mismatch
from kmotion.io.ismrmrd_writer import (
    TrueMotion,
    centre_shots,
    read_true_motion,
    true_motion_from_header,
    truth_path,
    write_true_motion,
)
from kmotion.physics.fft import fft2c
from kmotion.physics.motion import apply_motion_image
from kmotion.physics.validate import InputError
from kmotion.simulation.intra_scan import (
    IntraScanConfig,
    relative_motion,
    simulate_intra_scan,
    write_intra_scan,
)
from kmotion.simulation.multishot import MOTION_PATTERNS, ORDERINGS

SMALL = IntraScanConfig(
    matrix=(64, 64),
    fov_mm=(200.0, 200.0),
    n_coils=4,
    n_slices=2,
    echo_train_length=8,
    calibration_lines=12,
    snr=None,
    pattern="random",
    reference_repetitions=1,
)
TICK_MS = 2.5


def _imaging(acq: object) -> list[ismrmrd.Acquisition]:
    return [
        a
        for a in acq.acquisitions  # type: ignore[attr-defined]
        if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) and a.encoding_space_ref == 0
    ]


def _user_long(header: object, name: str) -> int | None:
    for p in header.userParameters.userParameterLong:  # type: ignore[attr-defined]
        if p.name == name:
            return int(p.value)
    return None


@pytest.fixture(scope="module")
def small() -> object:
    return simulate_intra_scan(SMALL)


@pytest.mark.parametrize("ordering", ORDERINGS)
def test_shot_identity_per_ordering(ordering: str) -> None:
    cfg = replace(SMALL, ordering=ordering, n_slices=1, reference_repetitions=0)
    acq = simulate_intra_scan(cfg)
    s = acq.sampling
    assert s.ordering == ordering and s.n_shots == 5  # 38 rows (32 on the grid + 6 ACS) in trains of 8
    lines = _imaging(acq)
    assert len(lines) == 38
    ky = [a.idx.kspace_encode_step_1 for a in lines]
    assert sorted(ky) == sorted(r for shot in s.shots for r in shot)  # every acquired row exactly once
    assert len(set(ky)) == len(ky)
    for shot, rows in enumerate(s.shots):
        mine = [a for a in lines if a.idx.segment == shot]
        assert [a.idx.kspace_encode_step_1 for a in mine] == list(rows)  # the train's rows in echo order
        assert len(rows) <= cfg.echo_train_length
        # lines echo_spacing apart within a train, trains TR apart
        stamps = np.array([a.acquisition_time_stamp for a in mine])
        start = stamps[0]
        np.testing.assert_array_equal(stamps - start, np.arange(len(rows)) * cfg.echo_spacing_ms / TICK_MS)
        first = [a for a in lines if a.idx.segment == 0][0].acquisition_time_stamp
        assert start - first == shot * cfg.tr_ms / TICK_MS
    centre = acq.centre_shot
    assert cfg.matrix[0] // 2 in s.shots[centre]
    assert [a.idx.segment for a in lines if a.idx.kspace_encode_step_1 == 32] == [centre]
    assert _user_long(acq.header, "kmotion.centre_shot") == centre
    assert {t.centre_shot for t in acq.truth} == {centre}
    assert [t.shot for t in acq.truth] == list(range(s.n_shots))
    enc = acq.header.encoding[0]
    assert enc.echoTrainLength == 8 and enc.encodingLimits.segment.maximum == s.n_shots - 1
    assert _user_long(acq.header, "kmotion.reference_repetition") is None  # no motion-free repetition


def test_flags_counts_and_order(small) -> None:  # noqa: ANN001
    acqs = small.acquisitions
    assert acqs[0].is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) is False  # snr None: no noise line
    n_rows = sum(len(r) for r in small.sampling.shots)
    assert n_rows == 38 and len(acqs) == 2 * 2 * n_rows  # repetitions x slices x rows
    noisy = simulate_intra_scan(replace(SMALL, snr=30.0, separate_calibration=True))
    assert noisy.acquisitions[0].is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    assert noisy.acquisitions[0].data.shape == (4, 128)
    assert len(noisy.acquisitions) == 1 + 2 * 12 + 2 * 2 * 32  # noise + calibration scan + imaging (no ACS)
    assert [a.scan_counter for a in acqs] == list(range(1, len(acqs) + 1))
    stamps = [a.acquisition_time_stamp for a in noisy.acquisitions]
    assert stamps == sorted(stamps)
    assert all(a.data.shape == (4, 128) and a.center_sample == 64 for a in acqs)  # 2x readout oversampling
    for r in range(2):
        rep = [a for a in acqs if a.idx.repetition == r]
        assert rep[0].is_flag_set(ismrmrd.ACQ_FIRST_IN_REPETITION)
        assert rep[-1].is_flag_set(ismrmrd.ACQ_LAST_IN_REPETITION)
        for sl in range(2):
            grp = [a for a in rep if a.idx.slice == sl]
            assert len(grp) == n_rows
            assert grp[0].is_flag_set(ismrmrd.ACQ_FIRST_IN_SLICE) and grp[0].idx.segment == 0
            assert grp[-1].is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE)
            assert sum(a.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE) for a in grp) == 1
            assert grp[-1].idx.segment == small.sampling.n_shots - 1
            cal = {
                a.idx.kspace_encode_step_1 for a in grp if a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
            }
            both = {
                a.idx.kspace_encode_step_1
                for a in grp
                if a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
            }
            assert cal == {27, 29, 31, 33, 35, 37} and both == {26, 28, 30, 32, 34, 36}
    assert acqs[-1].is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    # the slices' trains interleave in each TR: shot s of slice 1 starts TR / 2 after that of slice 0
    s0 = [a for a in acqs if a.idx.slice == 0 and a.idx.repetition == 1 and a.idx.segment == 2]
    s1 = [a for a in acqs if a.idx.slice == 1 and a.idx.repetition == 1 and a.idx.segment == 2]
    assert s1[0].acquisition_time_stamp - s0[0].acquisition_time_stamp == SMALL.tr_ms / 2 / TICK_MS
    assert {a.position[2] for a in acqs} == {-3.0, 3.0}


def test_gadget_buffer_groups_the_stream(small) -> None:  # noqa: ANN001
    out = list(buffer_slices(small.items, small.header))
    groups = [g for g in out if isinstance(g, SliceBuffer)]
    assert [(g.key.slice, g.key.repetition) for g in groups] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert all(g.complete for g in groups)
    passed = [a for a in out if not isinstance(a, SliceBuffer)]
    assert len(passed) + sum(len(g.acquisitions) for g in groups) == len(small.acquisitions)  # none lost
    for g in groups:
        assert {a.idx.segment for a in g.acquisitions} == set(range(small.sampling.n_shots))


def test_truth_round_trip_and_gauge(small, tmp_path: Path) -> None:  # noqa: ANN001
    path = write_intra_scan(small, tmp_path / "intra.h5")
    back = read_true_motion(path)
    assert back == small.truth
    assert true_motion_from_header(small.header) == small.truth
    with h5py.File(path, "r") as f:
        names = f[truth_path()].dtype.names
        assert names is not None and names[-2:] == ("shot", "centre_shot")
    n_shots = small.sampling.n_shots
    assert len(back) == 2 * 2 * n_shots
    assert centre_shots(back) == {(sl, r): small.centre_shot for sl in range(2) for r in range(2)}
    moved = np.array([[t.dx_px, t.dy_px, t.phi_deg] for t in back if t.repetition == 1 and t.slice == 0])
    np.testing.assert_array_equal(moved, small.motion[1])
    assert not small.motion[0].any()  # the reference repetition is motion-free
    assert _user_long(small.header, "kmotion.reference_repetition") == 0
    dy_mm, dx_mm = SMALL.pixel_spacing_mm
    for t in back:
        assert t.dx_mm == pytest.approx(t.dx_px * dx_mm, abs=1e-12)
        assert abs(t.dx_mm) <= 10 + 1e-9 and abs(t.dy_mm) <= 10 + 1e-9 and abs(t.phi_deg) <= 10 + 1e-9
    # per-repetition truth keeps the old layout, and old files read with shot = centre_shot = -1
    old = [TrueMotion(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0), TrueMotion(0, 1, 1.5, -2.0, 3.0, 2.6, -3.4)]
    write_true_motion(tmp_path / "old.h5", old)
    with h5py.File(tmp_path / "old.h5", "r") as f:
        assert "shot" not in (f[truth_path()].dtype.names or ())
    assert read_true_motion(tmp_path / "old.h5") == old and old[1].shot == -1
    assert centre_shots(old) == {}


@pytest.mark.parametrize("pattern", MOTION_PATTERNS)
def test_gauge_without_reference(pattern: str) -> None:
    cfg = replace(SMALL, n_slices=1, reference_repetitions=0, pattern=pattern, max_mm=6.0, max_deg=5.0)
    acq = simulate_intra_scan(cfg)
    m = acq.motion[0]
    assert acq.motion.shape == (1, acq.sampling.n_shots, 3)
    assert not m[acq.centre_shot].any()  # the scan's pose is that of the shot reading the centre
    dy_mm, dx_mm = cfg.pixel_spacing_mm
    assert np.abs(m[:, 0] * dx_mm).max() <= 6.0 + 1e-9 and np.abs(m[:, 1] * dy_mm).max() <= 6.0 + 1e-9
    assert np.abs(m[:, 2]).max() <= 5.0 + 1e-9
    assert (pattern == "none") == (not m.any())


def test_relative_motion_composes_rigid_motions() -> None:
    n, sp = 64, (2.0, 1.0)
    y, x = torch.meshgrid(torch.arange(n) - n // 2, torch.arange(n) - n // 2, indexing="ij")
    f = torch.exp(-((x * sp[1] - 8) ** 2 + (y * sp[0] - 5) ** 2) / 72.0) + 0.5 * torch.exp(
        -((x * sp[1] + 6) ** 2 + (y * sp[0] + 12) ** 2) / 50.0
    )
    f = f.to(torch.complex64)[None]
    ref, m = np.array([3.0, -2.0, 20.0]), np.array([-4.0, 1.5, -15.0])
    rel = relative_motion(m, ref, sp)
    np.testing.assert_allclose(relative_motion(ref, ref, sp), 0.0, atol=1e-12)
    via_ref = apply_motion_image(apply_motion_image(f, *ref, sp), *rel, sp)
    direct = apply_motion_image(f, *m, sp)
    # band-limited rotations on a 64 grid compose to ~2e-3 of the peak (the plain difference m - ref: ~0.3)
    torch.testing.assert_close(via_ref, direct, rtol=0, atol=1e-2 * float(direct.abs().max()))


def _kspace_of(lines: list[ismrmrd.Acquisition], n_coils: int, n_ky: int, n_ro: int) -> torch.Tensor:
    k = torch.zeros(n_coils, n_ky, n_ro, dtype=torch.complex64)
    for a in lines:
        k[:, a.idx.kspace_encode_step_1] = torch.from_numpy(a.data)
    return k


def _direct(acq: object, sl: int, pose: np.ndarray, os_: int) -> torch.Tensor:
    """``fft2c`` of the coil images of the object moved to ``pose`` (readout zero-padded by ``os_``)."""
    obj = torch.from_numpy(acq.objects[sl])  # type: ignore[attr-defined]
    maps = torch.from_numpy(acq.coil_maps[sl])  # type: ignore[attr-defined]
    spacing = acq.config.pixel_spacing_mm  # type: ignore[attr-defined]
    coil_img = maps * apply_motion_image(obj[None], *pose, spacing)[0][None]
    n_x = coil_img.shape[-1]
    x0 = (os_ * n_x) // 2 - n_x // 2
    padded = torch.zeros((*coil_img.shape[:-1], os_ * n_x), dtype=torch.complex64)
    padded[..., x0 : x0 + n_x] = coil_img
    return fft2c(padded)


def test_forward_model_of_each_shot_is_a_direct_simulation(small) -> None:  # noqa: ANN001
    lines = [a for a in _imaging(small) if a.idx.repetition == 1 and a.idx.slice == 1]
    k = _kspace_of(lines, 4, 64, 128)
    scale = float(k.abs().max())
    for shot, rows in enumerate(small.sampling.shots):
        pose = small.motion[1, shot]
        direct = _direct(small, 1, pose, 2)
        r = list(rows)
        # noise-free: float32 FFTs agree to ~1e-6 of the peak
        torch.testing.assert_close(k[:, r], direct[:, r], rtol=0, atol=1e-5 * scale)
        other = small.motion[1, (shot + 1) % small.sampling.n_shots]
        assert float((_direct(small, 1, other, 2)[:, r] - k[:, r]).abs().max()) > 1e-2 * scale
    ref = [a for a in _imaging(small) if a.idx.repetition == 0 and a.idx.slice == 1]
    acquired = sorted(a.idx.kspace_encode_step_1 for a in ref)
    torch.testing.assert_close(
        _kspace_of(ref, 4, 64, 128)[:, acquired],
        _direct(small, 1, np.zeros(3), 2)[:, acquired],
        rtol=0,
        atol=1e-5 * scale,
    )


def test_t2_decay_scales_each_echo() -> None:
    cfg = replace(SMALL, n_slices=1, reference_repetitions=0, readout_oversampling=1, pattern="steps")
    plain = simulate_intra_scan(cfg)
    decayed = simulate_intra_scan(replace(cfg, t2_ms=60.0))
    np.testing.assert_array_equal(plain.motion, decayed.motion)
    echo = plain.sampling.echo_of_row()
    for a, b in zip(_imaging(plain), _imaging(decayed), strict=True):
        assert a.idx.kspace_encode_step_1 == b.idx.kspace_encode_step_1
        j = echo[a.idx.kspace_encode_step_1]
        amp = np.exp(-(j + 1) * cfg.echo_spacing_ms / 60.0)
        np.testing.assert_allclose(b.data, a.data * amp, rtol=1e-5, atol=1e-6 * np.abs(a.data).max())
    assert decayed.config.t2_decay() is not None


def test_separate_calibration_scan_in_encoding_space_1() -> None:
    cfg = replace(SMALL, separate_calibration=True, calibration_lines=16)
    acq = simulate_intra_scan(cfg)
    acqs = acq.acquisitions
    cal = [a for a in acqs if a.encoding_space_ref == 1]
    assert len(cal) == 2 * 16
    first_imaging = next(i for i, a in enumerate(acqs) if a.encoding_space_ref == 0)
    assert all(acqs.index(a) < first_imaging for a in cal)  # the reference scan comes first
    for a in cal:
        assert a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
        assert not a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
        assert not a.is_flag_set(ismrmrd.ACQ_FIRST_IN_SLICE) and not a.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE)
        assert a.idx.repetition == 0 and a.idx.segment == 0 and a.data.shape == (4, 128)
    for sl in range(2):
        mine = [a for a in cal if a.idx.slice == sl]
        assert [a.idx.kspace_encode_step_1 for a in mine] == list(range(24, 40))
        assert {tuple(a.position) for a in mine} == {
            tuple(a.position) for a in _imaging(acq) if a.idx.slice == sl
        }
        direct = _direct(acq, sl, np.zeros(3), 2)  # motion-free
        got = _kspace_of(mine, 4, 64, 128)[:, 24:40]
        torch.testing.assert_close(got, direct[:, 24:40], rtol=0, atol=1e-5 * float(direct.abs().max()))
    imaging = _imaging(acq)
    assert not any(a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) for a in imaging)
    assert not any(a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING) for a in imaging)
    assert len(imaging) == 2 * 2 * 32
    h = acq.header
    assert len(h.encoding) == 2
    assert h.encoding[0].parallelImaging.calibrationMode.value == "separate"
    for part in ("encodedSpace", "reconSpace"):
        e0, e1 = getattr(h.encoding[0], part), getattr(h.encoding[1], part)
        assert (e0.matrixSize.x, e0.matrixSize.y) == (e1.matrixSize.x, e1.matrixSize.y)
        assert (e0.fieldOfView_mm.x, e0.fieldOfView_mm.y) == (e1.fieldOfView_mm.x, e1.fieldOfView_mm.y)
    assert h.encoding[1].encodingLimits.repetition.maximum == 0
    geo = SliceGeometry.from_header(h)
    other = geo.other(1)
    assert isinstance(other, SliceGeometry) and geometry_mismatch(other, geo) == ""


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(InputError, match="IntraScanConfig.ordering"):
        IntraScanConfig(ordering="spiral")
    with pytest.raises(InputError, match="IntraScanConfig.tr_ms"):
        replace(SMALL, tr_ms=100.0)
    with pytest.raises(InputError, match="IntraScanConfig.motion: expected 5"):
        replace(SMALL, motion=((0.0, 0.0, 0.0),))
    with pytest.raises(InputError, match="separate_calibration"):
        replace(SMALL, separate_calibration=True, calibration_lines=0)
    with pytest.raises(InputError, match="objects: expected shape"):
        from kmotion.simulation.intra_scan import simulate_intra_scan_from_objects

        simulate_intra_scan_from_objects(np.zeros((1, 8, 8)), np.zeros((1, 4, 8, 8)), SMALL)


def test_explicit_motion_is_used_as_given() -> None:
    poses = tuple((float(s), -0.5 * s, 2.0 * s) for s in range(5))
    acq = simulate_intra_scan(replace(SMALL, n_slices=1, reference_repetitions=0, motion=poses))
    np.testing.assert_array_equal(acq.motion[0], np.array(poses))


def test_simulate_raw_intra_scan_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "intra.h5"
    args = ["simulate-raw", str(out), "--intra-scan", "--matrix", "64", "64", "--coils", "4", "--slices", "1"]
    opts = ["--etl", "8", "--ordering", "checkered", "--pattern", "drift", "--t2-ms", "80"]
    assert main([*args, *opts, "--reference-repetitions", "1", "--max-mm", "5", "--max-deg", "4"]) == 0
    text = capsys.readouterr().out
    assert "repetition,shot,dx_px,dy_px,phi_deg,dx_mm,dy_mm" in text
    truth = read_true_motion(out)
    assert truth is not None
    moved = [t for t in truth if t.repetition == 1]
    assert [t.shot for t in moved] == list(range(6))  # 32 grid rows + 12 off-grid ACS rows in trains of 8
    for t in moved:
        assert f"1,{t.shot},{t.dx_px:.3f},{t.dy_px:.3f},{t.phi_deg:.3f}," in text
        assert abs(t.dx_mm) <= 5 + 1e-9 and abs(t.phi_deg) <= 4 + 1e-9
    with ismrmrd.File(str(out), "r") as f:  # the ecosystem's reader opens it
        header = f["dataset"].header
        assert header.encoding[0].echoTrainLength == 8
        assert header.encoding[0].encodingLimits.segment.maximum == 5
    assert main([*args, "--repetitions", "3"]) == 2
    assert "--repetitions is not an option of --intra-scan" in capsys.readouterr().err
    assert main([*args, "--separate-calibration", "--no-calibration"]) == 2
    assert "separate_calibration" in capsys.readouterr().err
