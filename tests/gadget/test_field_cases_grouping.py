"""The field cases of ``../shared/field_cases`` at the level of the gadget's first stages (issue 9 §1):
classification, grouping and keys, reversed readouts, 3D encodings and calibration from another encoding
space; and, end to end, the estimates of the cases whose motion is known.

Each test skips only when ``../shared`` is absent.  Nothing is written into it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import ismrmrd
import ismrmrd.xsd
import numpy as np
import pytest
import torch
from _helpers import SHARED_DIR

from kmotion.gadget import (
    AssembledSlice,
    GadgetParams,
    MotionCorrector,
    MotionReport,
    SliceBuffer,
    SliceGeometry,
    assemble,
    buffer_slices,
)
from kmotion.gadget.assemble import line_layout
from kmotion.gadget.calibration import CalibrationStore, coil_maps_for
from kmotion.gadget.classify import IMAGING, classify
from kmotion.io.ismrmrd_reader import open_ismrmrd

CASES = SHARED_DIR / "field_cases"
TOL_PX, TOL_DEG = 0.3, 0.5
"""Tolerance of the end-to-end estimates against ``truth.json`` (pixels, degrees)."""


def _case(name: str) -> Path:
    folder = next(iter(sorted(CASES.glob(f"{name}_*"))), None) if CASES.is_dir() else None
    if folder is None:
        pytest.skip(f"field case {name} not available (../shared/field_cases absent)")
    return folder


def _read(name: str) -> tuple[ismrmrd.xsd.ismrmrdHeader, list[object]]:
    src = open_ismrmrd(_case(name) / "input.h5")
    return src.header, list(src.items())


def _buffers(name: str) -> tuple[list[SliceBuffer], list[object]]:
    header, items = _read(name)
    out = list(buffer_slices(items, header))
    return [o for o in out if isinstance(o, SliceBuffer)], [o for o in out if not isinstance(o, SliceBuffer)]


def _keys(buffers: list[SliceBuffer]) -> list[tuple[int, ...]]:
    return [tuple(b.key) for b in buffers]


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(abs(np.vdot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_case01_lines_with_the_raw_data_correction_flag_are_imaging_lines() -> None:
    buffers, passed = _buffers("01")
    assert _keys(buffers) == [(0, 0, 0, r, 0) for r in range(3)]
    for b in buffers:
        assert len(b.acquisitions) == 64 and b.complete  # 52 lines + 12 calibration-and-imaging lines
        assert all(a.is_flag_set(ismrmrd.ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA) for a in b.acquisitions)
        a = assemble(b)
        assert a.correctable, a.reason
        assert (a.acceleration, int(a.mask.sum())) == (2, 64)  # every 2nd row; ACS rows between pass by
    assert sorted(classify(o) for o in passed) == ["noise measurement"] + ["parallel calibration"] * 36


def test_case02_the_reversed_echo_is_assembled_in_the_frame_of_the_first() -> None:
    """Echo 2 was read with the reversed gradient (samples in time order, ``ACQ_IS_REVERSE``): assembled,
    its k-space is that of echo 1 (the same object here), centre on the centre column; read without the
    reversal it would not be."""
    buffers, _ = _buffers("02")
    assert _keys(buffers) == [(0, c, 0, r, 0) for r in range(3) for c in range(2)]
    for rep in range(3):
        echo1, echo2 = buffers[2 * rep], buffers[2 * rep + 1]
        assert all(a.is_flag_set(ismrmrd.ACQ_IS_REVERSE) for a in echo2.acquisitions)
        assert all(ln.reverse for ln in line_layout(echo2)[2])
        k1, k2 = assemble(echo1), assemble(echo2)
        assert k1.correctable and k2.correctable
        rows = k1.mask & k2.mask
        assert _correlation(k1.kspace[:, rows], k2.kspace[:, rows]) > 0.999
        assert int(np.argmax(np.abs(k2.kspace).sum((0, 1)))) == k2.kspace.shape[-1] // 2
        as_stored = np.stack([a.data for a in echo2.acquisitions if a.idx.kspace_encode_step_1 == 64])
        assert _correlation(as_stored[0], k1.kspace[:, 64]) < 0.5  # the reversal matters


def test_case03_a_3d_slab_is_one_group_per_repetition_passed_through_with_its_reason() -> None:
    buffers, passed = _buffers("03")
    assert _keys(buffers) == [(0, 0, 0, r, 0) for r in range(3)]
    assert [classify(o) for o in passed] == ["noise measurement"]
    for b in buffers:
        assert b.complete and len(b.acquisitions) == 8 * 128
        a = assemble(b, quiet=True)
        assert not a.correctable and a.reason.startswith("3D encoding: 8 of 8 partitions")
        assert a.partitions is not None and a.partitions.shape == (4, 8, 128, 128)
        assert a.partition_mask is not None and a.partition_mask.all()


def test_case04_each_cardiac_phase_is_its_own_group() -> None:
    buffers, passed = _buffers("04")
    keys = _keys(buffers)
    assert sorted(keys) == [(0, 0, p, r, 0) for p in range(4) for r in range(3)]
    assert len(set(keys)) == len(keys)
    for b in buffers:
        assert b.complete and len(b.acquisitions) == 128
        assert {int(a.idx.phase) for a in b.acquisitions} == {b.key.phase}
        assert assemble(b).correctable
    assert [classify(o) for o in passed] == ["noise measurement"]


def _calibration_and_reference(
    header: ismrmrd.xsd.ismrmrdHeader, items: list[object]
) -> tuple[CalibrationStore, AssembledSlice]:
    """The calibration store fed with the pass-through items, and the first slice group assembled."""
    store = CalibrationStore(SliceGeometry.from_header(header))
    first = None
    for out in buffer_slices(items, header):
        if isinstance(out, SliceBuffer):
            first = first or out
        else:
            store.note(out)
    assert first is not None
    return store, assemble(first)


def test_case11_coil_maps_come_from_the_calibration_scan_in_encoding_space_1() -> None:
    header, items = _read("11")
    cal = [o for o in items if isinstance(o, ismrmrd.Acquisition) and o.encoding_space_ref == 1]
    assert len(cal) == 32 and all(classify(o) == "parallel calibration" for o in cal)
    store, ref = _calibration_and_reference(header, items)
    assert ref.correctable and ref.acceleration == 2
    got = store.kspace_for(ref)
    assert not isinstance(got, str), got
    _, (lo, hi) = got
    assert hi - lo == 32  # the block of the reference scan (the imaging lines alone hold none)
    maps = coil_maps_for(ref, store, torch.device("cpu"))
    assert isinstance(maps, torch.Tensor) and maps.shape == (8, 128, 128)


def test_case11_a_calibration_scan_of_another_geometry_is_named_not_used() -> None:
    header, items = _read("11")
    header.encoding[1].encodedSpace.fieldOfView_mm.x = 240.0
    store, ref = _calibration_and_reference(header, items)
    why = coil_maps_for(ref, store, torch.device("cpu"))
    assert isinstance(why, str)
    assert "no calibration data" in why and "encoding space 1" in why and "encoded FOV" in why


# --- end to end: the estimates of the cases with simulated motion ------------------------------------------


def _run(
    name: str, caplog: pytest.LogCaptureFixture
) -> tuple[list[object], list[object], list[MotionReport]]:
    header, items = _read(name)
    with caplog.at_level(logging.INFO, logger="kmotion.gadget"):
        out = list(MotionCorrector(header, GadgetParams(device="cpu"))(items))
    acqs_in = [o for o in items if isinstance(o, ismrmrd.Acquisition)]
    acqs_out = [o for o in out if isinstance(o, ismrmrd.Acquisition)]
    assert sorted(id(a) for a in acqs_out) == sorted(id(a) for a in acqs_in)  # every acquisition out, once
    return items, out, [o for o in out if isinstance(o, MotionReport)]


@pytest.mark.parametrize("name", ["01", "02", "04", "11"])
def test_field_case_estimates_match_the_truth(name: str, caplog: pytest.LogCaptureFixture) -> None:
    _, _, reports = _run(name, caplog)
    truth = json.loads((_case(name) / "truth.json").read_text())
    want = {(t["slice"], t["contrast"], t.get("phase", 0), t["repetition"], 0): t for t in truth}
    got = {tuple(r.key): r for r in reports}
    assert len(got) == len(reports) and set(got) == set(want)  # one report per key, every key
    for key, rep in got.items():
        t = want[key]
        if rep.reason == "reference":
            assert (t["dx"], t["dy"], t["phi"]) == (0.0, 0.0, 0.0)
            continue
        assert rep.corrected, rep.log_line()
        assert "translation only" not in rep.reason  # coil maps found (case 11: from encoding space 1)
        assert math.isclose(rep.dx_px, t["dx"], abs_tol=TOL_PX), rep.log_line()
        assert math.isclose(rep.dy_px, t["dy"], abs_tol=TOL_PX), rep.log_line()
        assert math.isclose(rep.rot_deg, t["phi"], abs_tol=TOL_DEG), rep.log_line()
    assert "no slice group was estimated" not in caplog.text


def test_field_case_03_is_passed_through_untouched_with_one_end_of_stream_warning(caplog) -> None:
    header, items = _read("03")
    before = [np.array(o.data) for o in items if isinstance(o, ismrmrd.Acquisition)]
    _, out, reports = _run("03", caplog)
    assert [tuple(r.key) for r in reports] == [(0, 0, 0, r, 0) for r in range(3)]
    assert all(r.reason.startswith("not correctable: 3D encoding:") and not r.corrected for r in reports)
    after = [o.data for o in out if isinstance(o, ismrmrd.Acquisition)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    ends = [r for r in caplog.records if "no slice group was estimated" in r.getMessage()]
    assert len(ends) == 1 and ends[0].levelno == logging.WARNING
    assert "3072 imaging lines in 3 slice group(s)" in ends[0].getMessage()


def test_end_of_stream_warning_only_when_nothing_was_estimated(stream_factory, caplog) -> None:
    """A stream of one repetition (references only): one WARNING at the end; with a moved repetition: none."""
    for motions, expected in (((0.0, 0.0, 0.0),), 1), (((0.0, 0.0, 0.0), (1.0, -1.0, 3.0)), 0):
        st = stream_factory(n_ky=64, n_kx=64, n_coils=4, motions=motions, n_acs=16)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kmotion.gadget"):
            out = list(MotionCorrector(st.header, GadgetParams(device="cpu"))(st.items))
        assert len(out) == len(st.items) + len(motions)  # every item and one report per slice group
        ends = [r for r in caplog.records if "no slice group was estimated" in r.getMessage()]
        assert len(ends) == expected
        if expected:
            assert (
                "1 x reference" in ends[0].getMessage() and "16 parallel calibration" in ends[0].getMessage()
            )
    assert classify(st.items[1]) == "parallel calibration" and classify(st.items[-1]) == IMAGING
