"""The gadget's shot (echo-train) motion model (issue 10): ``gadgets/kmotion/gadget/shots.py`` and the
per-shot path through :class:`~kmotion.gadget.MotionCorrector` (``docs/intra_scan.md``).

Shot identity rules (``idx.segment``; ``echoTrainLength`` and arrival order; time-stamp breaks; one train),
per-shot estimation against a motion-free reference repetition on a small noise-free multi-shot slice, the
output contract (every acquisition out once, the summary and one report per shot right before the slice's
lines), report and CSV keys, do no harm per shot, the correction against the motion-free image,
``motion_model = auto``, the separate calibration scan as the reference, and a stream without any reference.

Streams are :func:`kmotion.simulation.intra_scan.simulate_intra_scan` (64^2-96^2, 4-8 coils, ETL 8).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import ismrmrd
import numpy as np
import pytest

from kmotion.demo import nrmse
from kmotion.gadget import (
    GadgetParams,
    MotionCorrector,
    MotionReport,
    SliceBuffer,
    buffer_slices,
    reconstruct_images,
)
from kmotion.gadget.fit import ShotEstimate
from kmotion.gadget.shots import shot_identity, use_shot_model
from kmotion.io.estimates import CSV_COLUMNS, read_motion_csv, row_from_report, write_motion_csv
from kmotion.simulation.intra_scan import IntraScanAcquisition, IntraScanConfig, simulate_intra_scan

SHOT = GadgetParams(device="cpu", motion_model="shot")
AUTO = GadgetParams(device="cpu", motion_model="auto")

IDENTITY = IntraScanConfig(
    matrix=(64, 64),
    n_coils=4,
    echo_train_length=8,
    ordering="interleaved",
    separate_calibration=True,  # 32 imaging rows in 4 full echo trains
    snr=None,
    pattern="random",
)

POSES = (  # (dx_px, dy_px, phi_deg) per echo train: two still shots, then steps
    (0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0),
    (-2.5, 1.5, 3.0),
    (-2.5, 1.5, 3.0),
    (-2.5, 1.5, 3.0),
    (1.5, -2.0, -4.0),
    (1.5, -2.0, -4.0),
    (3.0, 0.5, 1.5),
)
MOVED = IntraScanConfig(
    matrix=(96, 96),
    n_coils=8,
    echo_train_length=8,
    ordering="checkered",
    snr=None,
    reference_repetitions=1,
    motion=POSES,
)
"""96^2, 8 coils, R = 2 + 24 ACS rows in 8 echo trains, noise-free, a motion-free repetition first."""

TOL_PX, TOL_DEG = 0.1, 0.35
"""Noise-free per-shot tolerance with a reference repetition.  The fit is not exact on noise-free data: the
reference image is a regularised SENSE reconstruction with coil maps from 24 calibration rows, and a shot
holds 7-8 rows.  Measured on this setting for phantom seeds 0-3: max error 0.01-0.09 px, 0.03-0.44 deg
(seed 0, used here: 0.04 px, 0.25 deg)."""


def _buffers(acq: IntraScanAcquisition) -> list[SliceBuffer]:
    return [b for b in buffer_slices(acq.items, acq.header) if isinstance(b, SliceBuffer)]


def _copy(items: list[object]) -> list[object]:
    return [copy.deepcopy(i) if isinstance(i, ismrmrd.Acquisition) else i for i in items]


def _image(items: list[object], header: object, repetition: int) -> np.ndarray:
    for im in reconstruct_images(iter(items), header):  # type: ignore[arg-type]
        if isinstance(im, ismrmrd.Image) and int(im.repetition) == repetition:
            return np.abs(np.asarray(im.data)).reshape(im.data.shape[-2:])
    raise AssertionError(f"no image of repetition {repetition}")


def _shot_reports(out: list[object], repetition: int) -> list[MotionReport]:
    return [o for o in out if isinstance(o, MotionReport) and o.key.repetition == repetition and o.shot >= 0]


def _summary(out: list[object], repetition: int) -> MotionReport:
    (s,) = [o for o in out if isinstance(o, MotionReport) and o.key.repetition == repetition and o.shot < 0]
    return s


# ------------------------------------------------------------------------------------------ shot identity


def test_shot_identity_from_segment() -> None:
    acq = simulate_intra_scan(IDENTITY)
    (buf,) = _buffers(acq)
    rows, rule = shot_identity(buf)
    assert rule == "idx.segment"
    np.testing.assert_array_equal(rows, acq.sampling.shot_of_row())
    assert acq.sampling.n_shots == 4 and set(rows[rows >= 0].tolist()) == {0, 1, 2, 3}


def test_shot_identity_from_echo_train_length_and_arrival_order() -> None:
    """``idx.segment`` constant and evenly spaced time stamps: consecutive runs of ``echoTrainLength`` lines
    in arrival order."""
    acq = simulate_intra_scan(IDENTITY)
    imaging = [a for a in acq.acquisitions if a.encoding_space_ref == 0]
    for i, a in enumerate(imaging):
        a.idx.segment = 0
        a.acquisition_time_stamp = 1000 + 4 * i  # no pause between trains to see
    (buf,) = _buffers(acq)
    rows, rule = shot_identity(buf)
    assert rule == "echoTrainLength 8 and arrival order"
    np.testing.assert_array_equal(rows, acq.sampling.shot_of_row())


def test_shot_identity_from_time_stamps() -> None:
    """No segment, no ``echoTrainLength``: a break in the time stamps (TR 3000 ms vs echo spacing 10 ms)."""
    acq = simulate_intra_scan(IDENTITY)
    for a in acq.acquisitions:
        a.idx.segment = 0
    acq.header.encoding[0].echoTrainLength = None
    (buf,) = _buffers(acq)
    assert buf.geometry.echo_train_length is None
    rows, rule = shot_identity(buf)
    assert rule == "time stamps"
    np.testing.assert_array_equal(rows, acq.sampling.shot_of_row())


def test_shot_identity_one_train_without_any_clue() -> None:
    acq = simulate_intra_scan(IDENTITY)
    imaging = [a for a in acq.acquisitions if a.encoding_space_ref == 0]
    for i, a in enumerate(imaging):
        a.idx.segment = 0
        a.acquisition_time_stamp = 1000 + 4 * i  # evenly spaced
    acq.header.encoding[0].echoTrainLength = None
    (buf,) = _buffers(acq)
    rows, rule = shot_identity(buf)
    assert rule == "one echo train"
    acquired = acq.sampling.shot_of_row() >= 0
    np.testing.assert_array_equal(rows >= 0, acquired)
    assert set(rows[acquired].tolist()) == {0}


def test_shot_identity_with_calibration_lines_in_the_trains_from_time_stamps() -> None:
    """Calibration-only ACS lines read inside the echo trains are not in the slice buffer, so runs of
    ``echoTrainLength`` buffered lines would mislabel the trains; the pause between trains in the time stamps
    (a skipped calibration line is one echo spacing, not a TR) gives them right (the rule the gadget prefers
    to the train length)."""
    cfg = replace(IDENTITY, separate_calibration=False, calibration_lines=16)  # 40 rows: 5 full trains
    acq = simulate_intra_scan(cfg)
    assert [len(s) for s in acq.sampling.shots] == [8] * 5
    for a in acq.acquisitions:
        a.idx.segment = 0
    (buf,) = _buffers(acq)
    assert len(buf.acquisitions) < 40  # some ACS lines are calibration-only: not in the slice
    rows, rule = shot_identity(buf)
    assert rule == "time stamps"
    in_buffer = rows >= 0
    np.testing.assert_array_equal(rows[in_buffer], acq.sampling.shot_of_row()[in_buffer])


def test_use_shot_model() -> None:
    for model, single, n_shots, want in (
        ("shot", False, 1, True),
        ("shot", True, 8, True),
        ("repetition", True, 8, False),
        ("auto", True, 8, True),
        ("auto", True, 1, False),  # one echo train: nothing to tell apart
        ("auto", False, 8, False),  # a reference repetition may come: the repetition model
    ):
        assert use_shot_model(GadgetParams(device="cpu", motion_model=model), single, n_shots) is want


# ------------------------------------------------------------------ per-shot estimation with a reference


@pytest.fixture(scope="module")
def moved() -> SimpleNamespace:
    """:data:`MOVED` through the gadget with ``motion_model = shot`` (inputs copied first)."""
    acq = simulate_intra_scan(MOVED)
    items = list(acq.items)
    before = _copy(items)
    out = list(MotionCorrector(acq.header, SHOT)(items))
    return SimpleNamespace(acq=acq, items=items, before=before, out=out)


def test_per_shot_estimates_noise_free(moved: SimpleNamespace) -> None:
    """One pose per shot against the reference repetition, within :data:`TOL_PX` / :data:`TOL_DEG`."""
    reports = _shot_reports(moved.out, 1)
    truth = moved.acq.motion[1]
    assert [r.shot for r in reports] == list(range(len(POSES)))
    est = np.array([(r.dx_px, r.dy_px, r.rot_deg) for r in reports])
    np.testing.assert_allclose(est[:, :2], truth[:, :2], rtol=0, atol=TOL_PX)
    np.testing.assert_allclose(est[:, 2], truth[:, 2], rtol=0, atol=TOL_DEG)
    for r, t in zip(reports, truth, strict=True):
        assert r.reference_repetition == 0
        assert r.corrected == bool(np.any(t != 0)), (r.shot, r.reason)
        assert all(math.isfinite(v) and v > 0 for v in (r.dx_std_px, r.dy_std_px, r.rot_std_deg))
        assert r.dx_mm == pytest.approx(r.dx_px * MOVED.pixel_spacing_mm[1])
        if not r.corrected:  # a still shot: not significant or below min_correction, never flagged
            assert r.reason.startswith(("no significant motion", "below min_correction")) and not r.flagged
    summary = _summary(moved.out, 1)
    assert summary.corrected and math.isnan(summary.dx_px)
    assert summary.reason == "per-shot motion: 6 of 8 shots corrected (shots by idx.segment)"
    ref = _summary(moved.out, 0)  # the reference repetition itself
    assert ref.reason.startswith("reference") and not ref.corrected and not _shot_reports(moved.out, 0)


def test_every_item_out_once_reports_before_the_slice(moved: SimpleNamespace) -> None:
    """Every input item leaves exactly once; the summary, then shots 0..7, then the slice's lines in arrival
    order (calibration-only lines are not part of the slice group and pass through on arrival)."""
    ids_in = [id(i) for i in moved.items]
    ids_out = [id(o) for o in moved.out if not isinstance(o, MotionReport)]
    assert sorted(ids_out) == sorted(ids_in) and len(set(ids_out)) == len(ids_out)
    out = moved.out
    start = out.index(_summary(out, 1))
    shots = out[start + 1 : start + 1 + len(POSES)]
    assert [(type(r), r.shot) for r in shots] == [(MotionReport, s) for s in range(len(POSES))]
    rest = out[start + 1 + len(POSES) :]
    assert not any(isinstance(o, MotionReport) for o in rest)
    slice_lines = [
        a
        for a in moved.items
        if isinstance(a, ismrmrd.Acquisition)
        and a.idx.repetition == 1
        and not (
            a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
            and not a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
        )
    ]
    assert [id(o) for o in rest] == [id(a) for a in slice_lines]
    # the reference repetition of a scan with several stays "reference" (not "... no reference repetition")
    assert _summary(out, 0).reason == "reference"


def test_reports_csv_keys(moved: SimpleNamespace, tmp_path: Path) -> None:
    """One CSV row per shot plus the summary (shot -1): the same columns as per repetition, with
    ``shot`` and the uncertainties."""
    reports = [o for o in moved.out if isinstance(o, MotionReport) and o.key.repetition == 1]
    assert set(reports[0].as_dict()) <= set(CSV_COLUMNS)
    path = write_motion_csv([row_from_report(r.as_dict()) for r in reports], tmp_path / "motion.csv")
    rows = read_motion_csv(path)
    header = path.read_text().splitlines()[0].split(",")
    assert header == CSV_COLUMNS
    assert [r["shot"] for r in rows] == [-1, *range(len(POSES))]
    for r in rows[1:]:
        assert all(math.isfinite(r[k]) for k in ("dx_std_px", "dy_std_px", "rot_std_deg", "chi2", "p_value"))
        assert r["repetition"] == 1 and r["reference_repetition"] == 0
    assert math.isnan(rows[0]["dx_px"]) and rows[0]["corrected"]
    assert sum(r["corrected"] for r in rows[1:]) == 6


def test_correction_brings_the_image_to_the_motion_free_one(moved: SimpleNamespace) -> None:
    """Noise-free: the reference repetition's image is the motion-free image; the corrected moved
    repetition comes within 0.25 x its uncorrected NRMSE of it (measured: 0.41 -> 0.04)."""
    free = _image(moved.before, moved.acq.header, 0)
    unc = nrmse(_image(moved.before, moved.acq.header, 1), free)
    cor = nrmse(_image(moved.out, moved.acq.header, 1), free)
    assert unc > 0.2 and cor < 0.25 * unc, (unc, cor)


def test_lines_of_shots_left_alone_are_unchanged(moved: SimpleNamespace) -> None:
    still = {s for s, p in enumerate(POSES) if not any(p)}
    before = {a.scan_counter: a for a in moved.before if isinstance(a, ismrmrd.Acquisition)}
    lines = [a for a in moved.items if isinstance(a, ismrmrd.Acquisition) and a.idx.repetition == 1]
    lines = [a for a in lines if a.idx.segment in still]
    assert lines
    for a in lines:
        np.testing.assert_array_equal(a.data, before[a.scan_counter].data)


def test_motion_free_scan_is_left_alone() -> None:
    """SNR 30, no motion: no shot corrected, no shot flagged, every line bit for bit unchanged."""
    cfg = replace(MOVED, matrix=(64, 64), n_coils=4, motion=None, pattern="none", snr=30.0)
    acq = simulate_intra_scan(cfg)
    items = list(acq.items)
    before = _copy(items)
    out = list(MotionCorrector(acq.header, SHOT)(items))
    reports = _shot_reports(out, 1)
    assert len(reports) == acq.sampling.n_shots > 1
    assert not any(r.corrected or r.flagged for r in reports), [r.reason for r in reports]
    assert not _summary(out, 1).corrected
    for a, b in zip(items, before, strict=True):
        if isinstance(a, ismrmrd.Acquisition):
            np.testing.assert_array_equal(a.data, b.data)  # type: ignore[attr-defined]


def test_auto_with_a_reference_repetition_uses_the_repetition_model() -> None:
    """Two repetitions: ``auto`` registers the whole slice group (one pose, no shot rows)."""
    cfg = replace(MOVED, matrix=(64, 64), n_coils=4, motion=None, pattern="steps", snr=30.0)
    acq = simulate_intra_scan(cfg)
    out = list(MotionCorrector(acq.header, AUTO)(acq.items))
    reports = [o for o in out if isinstance(o, MotionReport)]
    assert [r.shot for r in reports] == [-1, -1]
    moved_rep = reports[1]
    assert moved_rep.key.repetition == 1 and math.isfinite(moved_rep.dx_px)
    assert "per-shot" not in moved_rep.reason


# ------------------------------------------------------- the separate calibration scan, or no reference


def _calibration_scan_slice() -> tuple[
    list[tuple[float, float, float]], IntraScanConfig, IntraScanAcquisition
]:
    """One repetition of 6 interleaved trains of 8 imaging rows (no ACS rows in the imaging), 4 coils, and a
    separate calibration scan (encoding space 1): the poses, the config and the acquisition."""
    poses = POSES[1:4] + POSES[5:8]
    cfg = replace(
        MOVED,
        n_coils=4,
        ordering="interleaved",
        separate_calibration=True,
        reference_repetitions=0,
        motion=poses,
    )
    return poses, cfg, simulate_intra_scan(cfg)


def test_auto_uses_the_separate_calibration_scan_as_reference(caplog: pytest.LogCaptureFixture) -> None:
    """One repetition, several echo trains, a separate calibration scan (encoding space 1): ``auto`` picks the
    shot model with the calibration scan as a low-resolution reference; the rule is logged.  Noise-free,
    96^2, 4 coils: corrected shots within 0.3 px / 1 deg (measured 0.1 px / 0.6 deg: a 24-row reference),
    the image within 0.25 x its uncorrected NRMSE of the motion-free one (measured 0.41 -> 0.05)."""
    poses, cfg, acq = _calibration_scan_slice()
    items = list(acq.items)
    before = _copy(items)
    caplog.set_level(logging.INFO, logger="kmotion.gadget")
    out = list(MotionCorrector(acq.header, AUTO)(items))
    rule = "idx.segment; reference: the separate calibration scan"
    assert any(f"echo trains identified by {rule}" in r.message for r in caplog.records)
    summary = _summary(out, 0)
    assert summary.reason.endswith(f"(shots by {rule})") and summary.corrected
    reports = _shot_reports(out, 0)
    assert [r.shot for r in reports] == list(range(len(poses)))
    for r, t in zip(reports, poses, strict=True):
        assert r.corrected == any(t), (r.shot, r.reason)
        if r.corrected:
            assert abs(r.dx_px - t[0]) < 0.3 and abs(r.dy_px - t[1]) < 0.3 and abs(r.rot_deg - t[2]) < 1.0
    free_acq = simulate_intra_scan(replace(cfg, motion=None, pattern="none"))
    free = _image(free_acq.items, free_acq.header, 0)
    unc = nrmse(_image(before, acq.header, 0), free)
    cor = nrmse(_image(out, acq.header, 0), free)
    assert unc > 0.2 and cor < 0.25 * unc, (unc, cor)


def test_no_reference_at_all_passes_through(caplog: pytest.LogCaptureFixture) -> None:
    """One repetition with its ACS rows in the moving echo trains and no calibration scan: per-shot motion is
    not estimated (the joint mode is not run), the reason says so, every line is unchanged."""
    cfg = replace(MOVED, matrix=(64, 64), n_coils=4, reference_repetitions=0, motion=None, pattern="steps")
    acq = simulate_intra_scan(cfg)
    items = list(acq.items)
    before = _copy(items)
    caplog.set_level(logging.INFO, logger="kmotion.gadget")
    out = list(MotionCorrector(acq.header, SHOT)(items))
    summary = _summary(out, 0)
    assert summary.reason == (
        "reference; per-shot motion not estimated: no separate calibration scan and no reference repetition"
    )
    assert not summary.corrected and not _shot_reports(out, 0)
    for a, b in zip(items, before, strict=True):
        if isinstance(a, ismrmrd.Acquisition):
            np.testing.assert_array_equal(a.data, b.data)  # type: ignore[attr-defined]
    assert any("no slice group was estimated" in r.message for r in caplog.records)


def test_calibration_scan_reference_wrong_poses_are_not_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    """Do no harm with a low-resolution reference: per-shot poses that fit the calibration scan better than
    zero but are wrong (here the fit's poses with their signs flipped) make the corrected slice agree less
    with the calibration scan than the uncorrected one, so no shot is corrected, every line keeps its data
    and the reasons say why.  (The same slice with the fit's own poses is corrected:
    ``test_auto_uses_the_separate_calibration_scan_as_reference``.)"""
    import kmotion.gadget.shots as shots_module

    fit = shots_module.fit_slices

    def flipped(*args: object, **kwargs: object) -> list[list[ShotEstimate]]:
        out = fit(*args, **kwargs)  # type: ignore[arg-type]
        return [[replace(e, motion=tuple(-v for v in e.motion)) for e in ests] for ests in out]

    monkeypatch.setattr(shots_module, "fit_slices", flipped)
    poses, _, acq = _calibration_scan_slice()
    items = list(acq.items)
    before = _copy(items)
    out = list(MotionCorrector(acq.header, AUTO)(items))
    summary = _summary(out, 0)
    assert not summary.corrected and "agrees less with the calibration scan" in summary.reason, summary.reason
    reports = _shot_reports(out, 0)
    assert [r.shot for r in reports] == list(range(len(poses)))
    for r, t in zip(reports, poses, strict=True):
        assert not r.corrected
        if any(t):  # the wrong (flipped) estimate stays in the report, with the reason
            assert "agrees less with the calibration scan" in r.reason, r.reason
    for a, b in zip(items, before, strict=True):
        if isinstance(a, ismrmrd.Acquisition):
            assert isinstance(b, ismrmrd.Acquisition) and np.array_equal(a.data, b.data)


@pytest.mark.parametrize(
    ("ordering", "broad"),
    [("interleaved", True), ("checkered", True), ("linear", False), ("centric", False)],
)
def test_broad_shots_of_each_ordering(ordering: str, broad: bool) -> None:
    """The per-shot fit frees the nuisance phase (constant + linear) only when every train is broad: rows on
    both sides of the centre over a quarter of the grid in |ky| (interleaved, checkered); never for the bands
    of linear and centric orderings, where a phase looks like a shift along y."""
    from kmotion.gadget.fit import broad_shot
    from kmotion.simulation.multishot import shot_sampling

    sampling = shot_sampling(256, 16, ordering, 2, 24)
    assert [broad_shot(np.asarray(rows), 256) for rows in sampling.shots] == [broad] * len(sampling.shots)
    assert not broad_shot(np.array([], dtype=int), 256)
