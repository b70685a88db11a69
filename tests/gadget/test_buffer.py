"""Tests of the first gadget stage: ``buffer_slices`` (``kmotion.gadget.buffer``)."""

from __future__ import annotations

import logging
import re

import ismrmrd
import ismrmrd.xsd
import numpy as np
import pytest
import torch
from _helpers import REPO_ROOT

from kmotion.gadget import SliceBuffer, assemble, buffer_slices
from kmotion.gadget.assemble import line_layout
from kmotion.gadget.classify import IMAGING, NON_IMAGING_FLAGS, classify
from kmotion.io.ismrmrd_h5 import SKIP_FLAGS
from kmotion.physics.fft import ifft1c

N_KY, N_KX, N_C = 28, 32, 2
C_KY = N_KY // 2


def _accounted(out: list[object]) -> list[int]:
    """ids of every item leaving the stage: pass-through items and acquisitions held in buffers."""
    ids: list[int] = []
    for o in out:
        if isinstance(o, SliceBuffer):
            ids.extend(id(a) for a in o.acquisitions)
        else:
            ids.append(id(o))
    return ids


def test_non_imaging_items_pass_through_in_order(ism, header) -> None:
    k = ism.known_kspace(N_C, N_KY, N_KX)
    lines = ism.slice_lines(k, ism.undersampled_rows(N_KY, 0), C_KY)
    line = k[:, 0, :]
    skipped = [
        ism.make_acq(line, 0, flags=(ismrmrd.ACQ_IS_NOISE_MEASUREMENT,)),
        ismrmrd.Waveform.from_array(np.zeros((1, 10), np.uint32)),
        "some other object",
        ism.make_acq(line, 0, flags=(ismrmrd.ACQ_IS_NAVIGATION_DATA,)),
        ism.make_acq(line, 0, flags=(ismrmrd.ACQ_IS_PHASECORR_DATA,)),
        ism.make_acq(line, 0, flags=(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION,)),
        ism.make_acq(line, 0, flags=(ismrmrd.ACQ_IS_RTFEEDBACK_DATA,)),
        ism.make_acq(line, 0, flags=(ismrmrd.ACQ_IS_HPFEEDBACK_DATA,)),
        ism.make_acq(line, 0, flags=(ismrmrd.ACQ_IS_DUMMYSCAN_DATA,)),
    ]
    other_space = ism.make_acq(line, 0)
    other_space.encoding_space_ref = 1
    skipped.append(other_space)
    # interleave: one skipped item before each of the first imaging lines
    stream: list[object] = []
    for i, acq in enumerate(lines):
        if i < len(skipped):
            stream.append(skipped[i])
        stream.append(acq)
    acs = ism.make_acq(k[:, C_KY + 1, :], C_KY + 1, flags=(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING,))
    stream.insert(1, acs)  # calibration-and-imaging line: an imaging line
    out = list(buffer_slices(stream, header))
    passed = [o for o in out if not isinstance(o, SliceBuffer)]
    assert [id(o) for o in passed] == [id(o) for o in skipped]
    buffers = [o for o in out if isinstance(o, SliceBuffer)]
    assert len(buffers) == 1 and buffers[0].complete
    assert buffers[0].acquisitions == [a for a in stream if a is acs or any(a is b for b in lines)]
    assert sorted(_accounted(out)) == sorted(id(o) for o in stream)


def test_grouping_by_slice_and_repetition_with_interleaved_arrival(ism, header) -> None:
    keys = [(s, r) for r in range(2) for s in range(2)]
    per_key = {
        (s, r): ism.slice_lines(
            ism.known_kspace(N_C, N_KY, N_KX, seed=10 * s + r), ism.undersampled_rows(N_KY, 0), C_KY, s, r
        )
        for s, r in keys
    }
    stream: list[object] = []
    n = len(per_key[(0, 0)])
    for i in range(n):  # slice-interleaved: line i of every (slice, rep) in turn
        for key in keys:
            stream.append(per_key[key][i])
    out = list(buffer_slices(stream, header))
    assert all(isinstance(o, SliceBuffer) for o in out)
    got = {(b.key.slice, b.key.repetition): b for b in out if isinstance(b, SliceBuffer)}
    assert set(got) == set(keys)
    for key, b in got.items():
        assert b.complete
        assert b.acquisitions == per_key[key]  # arrival order kept
        assert [a.idx.segment for a in b.acquisitions] == [i // 4 for i in range(n)]
        assert b.key.contrast == 0 and b.key.set == 0
    assert sorted(_accounted(out)) == sorted(id(o) for o in stream)


@pytest.mark.parametrize("parity", [0, 1])
def test_completion_by_count_without_flags(ism, header, parity: int) -> None:
    k = ism.known_kspace(N_C, N_KY, N_KX)
    lines = ism.slice_lines(k, ism.undersampled_rows(N_KY, parity), C_KY, last_flag=False)
    marker = "after"
    it = buffer_slices([*lines, marker, ism.make_acq(k[:, 0, :], 0, slice_=1)], header)
    first = next(it)
    assert isinstance(first, SliceBuffer) and first.complete  # yielded as soon as the last line arrived
    assert first.acquisitions == lines
    assert next(it) == marker
    rest = list(it)
    assert len(rest) == 1 and isinstance(rest[0], SliceBuffer) and not rest[0].complete


def test_flag_seen_turns_count_completion_off(ism, header) -> None:
    k = ism.known_kspace(N_C, N_KY, N_KX)
    rows = ism.undersampled_rows(N_KY, 0)
    first = ism.slice_lines(k, rows, C_KY, slice_=0)
    second = ism.slice_lines(k, rows, C_KY, slice_=1, last_flag=False)
    late_acs = ism.make_acq(
        k[:, C_KY + 1, :], 1, slice_=1, flags=(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING,)
    )
    late_acs.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    out = list(buffer_slices([*first, *second, late_acs], header))
    assert [len(b.acquisitions) for b in out if isinstance(b, SliceBuffer)] == [len(rows), len(rows) + 1]
    assert all(b.complete for b in out if isinstance(b, SliceBuffer))


def test_incomplete_group_flushed_at_end(ism, header, caplog: pytest.LogCaptureFixture) -> None:
    k = ism.known_kspace(N_C, N_KY, N_KX)
    lines = ism.slice_lines(k, ism.undersampled_rows(N_KY, 0)[:5], C_KY, last_flag=False)
    with caplog.at_level(logging.WARNING, logger="kmotion.gadget"):
        out = list(buffer_slices(lines, header))
    assert len(out) == 1 and isinstance(out[0], SliceBuffer)
    assert not out[0].complete and out[0].acquisitions == lines
    assert "incomplete" in caplog.text
    a = assemble(out[0])
    assert not a.correctable and "incomplete" in a.reason


# --- classification of every acquisition flag and grouping by every counter (docs/gadget.md table) -------

ALL_FLAGS = sorted(n for n in dir(ismrmrd) if n.startswith("ACQ_") and isinstance(getattr(ismrmrd, n), int))
# what the gadget must do with a line carrying each flag: stated here, independently of the code's table
PASSED_THROUGH = {
    "ACQ_IS_NOISE_MEASUREMENT": "noise measurement",
    "ACQ_IS_NAVIGATION_DATA": "navigator",
    "ACQ_IS_PHASECORR_DATA": "phase correction",
    "ACQ_IS_DUMMYSCAN_DATA": "dummy scan",
    "ACQ_IS_RTFEEDBACK_DATA": "real-time feedback",
    "ACQ_IS_HPFEEDBACK_DATA": "high-performance feedback",
    "ACQ_IS_PHASE_STABILIZATION": "phase stabilisation",
    "ACQ_IS_PHASE_STABILIZATION_REFERENCE": "phase stabilisation reference",
    "ACQ_IS_PARALLEL_CALIBRATION": "parallel calibration",
}


def test_the_flag_lists_cover_every_flag_of_the_ismrmrd_package() -> None:
    assert len(ALL_FLAGS) == 43  # ISMRMRD 1.x: bits 1-31, 4 compression bits, 8 user bits
    assert {getattr(ismrmrd, n) for n in PASSED_THROUGH} - {ismrmrd.ACQ_IS_PARALLEL_CALIBRATION} == set(
        NON_IMAGING_FLAGS
    )
    assert set(NON_IMAGING_FLAGS) == set(SKIP_FLAGS)  # the loader skips what the gadget passes through


@pytest.mark.parametrize("name", ALL_FLAGS)
def test_every_acquisition_flag_is_classified(ism, header, name: str) -> None:
    """A complete slice with ``name`` set on its 4th line: a non-imaging flag takes that line out of the
    slice (passed through on its own), ``ACQ_LAST_IN_SLICE`` completes the slice there, any other flag
    leaves it an imaging line of the slice."""
    k = ism.known_kspace(N_C, N_KY, N_KX)
    lines = ism.slice_lines(k, ism.undersampled_rows(N_KY, 0), C_KY)
    flagged = lines[3]
    flagged.set_flag(getattr(ismrmrd, name))
    out = list(buffer_slices(lines, header))
    buffers = [o for o in out if isinstance(o, SliceBuffer)]
    passed = [o for o in out if not isinstance(o, SliceBuffer)]
    assert sorted(_accounted(out)) == sorted(id(a) for a in lines)
    if name in PASSED_THROUGH:
        assert classify(flagged) == PASSED_THROUGH[name]
        assert passed == [flagged]
        assert len(buffers) == 1 and buffers[0].acquisitions == [a for a in lines if a is not flagged]
    elif name == "ACQ_LAST_IN_SLICE":
        assert classify(flagged) == IMAGING and not passed
        assert [b.acquisitions for b in buffers] == [lines[:4], lines[4:]]
    else:
        assert classify(flagged) == IMAGING and not passed
        assert len(buffers) == 1 and buffers[0].acquisitions == lines and buffers[0].complete


def test_calibration_and_imaging_lines_and_other_encoding_spaces(ism, header, caplog) -> None:
    k = ism.known_kspace(N_C, N_KY, N_KX)
    lines = ism.slice_lines(k, ism.undersampled_rows(N_KY, 0), C_KY)
    lines[2].set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
    lines[2].set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)  # both: an imaging line
    other = ism.make_acq(k[:, 0, :], 0)
    other.encoding_space_ref = 1  # an imaging line of encoding space 1: passed through, with a WARNING
    cal1 = ism.make_acq(k[:, 1, :], 1, flags=(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION,))
    cal1.encoding_space_ref = 1  # a separate reference scan's line: calibration (CalibrationStore)
    with caplog.at_level(logging.WARNING, logger="kmotion.gadget"):
        out = list(buffer_slices([other, cal1, *lines], header))
    assert (classify(lines[2]), classify(other), classify(cal1)) == (
        IMAGING,
        "encoding space 1",
        "parallel calibration",
    )
    assert out[:2] == [other, cal1] and isinstance(out[2], SliceBuffer) and out[2].acquisitions == lines
    assert "1 line(s) of encoding space 1 passed through untouched" in caplog.text


@pytest.mark.parametrize("counter", ["slice", "contrast", "phase", "repetition", "set"])
def test_every_image_counter_separates_groups(ism, header, counter: str) -> None:
    """Two values of one counter, lines interleaved: two groups whose keys differ in that counter."""
    rows = ism.undersampled_rows(N_KY, 0)
    per_value = {}
    for v in (0, 1):
        lines = ism.slice_lines(ism.known_kspace(N_C, N_KY, N_KX, seed=v), rows, C_KY)
        for a in lines:
            setattr(a.idx, counter, v)
        per_value[v] = lines
    stream = [a for pair in zip(per_value[0], per_value[1], strict=True) for a in pair]
    out = [o for o in buffer_slices(stream, header) if isinstance(o, SliceBuffer)]
    assert [getattr(b.key, counter) for b in out] == [0, 1]
    assert [b.acquisitions for b in out] == [per_value[0], per_value[1]]
    assert all(b.complete for b in out)
    assert all(sum(x != 0 for x in b.key) == (getattr(b.key, counter) != 0) for b in out)
    assert out[1].key._fields == ("slice", "contrast", "phase", "repetition", "set")


def test_user_counters_do_not_separate_groups(ism, header) -> None:
    k = ism.known_kspace(N_C, N_KY, N_KX)
    lines = ism.slice_lines(k, ism.undersampled_rows(N_KY, 0), C_KY, last_flag=False)
    for i, a in enumerate(lines):
        a.idx.user[:] = [i % 3, i, 7, 0, 0, 0, 0, i % 2]  # vendor counters (e.g. siemens_to_ismrmrd's)
    out = list(buffer_slices(lines, header))
    assert len(out) == 1 and isinstance(out[0], SliceBuffer) and out[0].acquisitions == lines
    assert out[0].complete


def test_averages_with_a_last_in_slice_flag_each_stay_one_group(ism) -> None:
    """Averages acquired one after another, each ending with ACQ_LAST_IN_SLICE: one group (the flag of an
    average before the last does not complete it), averaged row by row in assembly."""
    hdr = ism.make_header(n_averages=2)
    rows = ism.undersampled_rows(N_KY, 0)
    k1, k2 = ism.known_kspace(N_C, N_KY, N_KX, seed=1), ism.known_kspace(N_C, N_KY, N_KX, seed=2)
    first, second = ism.slice_lines(k1, rows, C_KY), ism.slice_lines(k2, rows, C_KY)
    for a in second:
        a.idx.average = 1
    out = list(buffer_slices([*first, *second], hdr))
    assert len(out) == 1 and isinstance(out[0], SliceBuffer) and out[0].complete
    assert out[0].acquisitions == [*first, *second]
    a = assemble(out[0])
    np.testing.assert_allclose(a.kspace[:, rows], (k1[:, rows] + k2[:, rows]) / 2, rtol=1e-5, atol=1e-6)


def test_a_late_line_of_a_completed_group_is_named(ism, header, caplog) -> None:
    k = ism.known_kspace(N_C, N_KY, N_KX)
    lines = ism.slice_lines(k, ism.undersampled_rows(N_KY, 0), C_KY)
    late = ism.make_acq(k[:, 1, :], 1 - N_KY // 2 + C_KY)
    with caplog.at_level(logging.WARNING, logger="kmotion.gadget"):
        out = list(buffer_slices([*lines, late], header))
    assert [len(b.acquisitions) for b in out if isinstance(b, SliceBuffer)] == [len(lines), 1]
    assert "arrived after this group completed" in caplog.text


# --- 3D encodings (kspace_encode_step_2) --------------------------------------------------------------


def header_3d(ism, n_z: int, step2: tuple[int, int, int] | None, **kw: object) -> ismrmrd.xsd.ismrmrdHeader:
    """``make_header`` with encoded z = ``n_z`` and, if given, ``kspace_encoding_step_2`` limits."""
    hdr = ism.make_header(**kw)
    enc = hdr.encoding[0]
    enc.encodedSpace.matrixSize.z = n_z
    enc.reconSpace.matrixSize.z = n_z
    if step2 is not None:
        enc.encodingLimits.kspace_encoding_step_2 = ismrmrd.xsd.limitType(
            minimum=step2[0], maximum=step2[1], center=step2[2]
        )
    return hdr


def volume_lines(
    ism, k: np.ndarray, rows: list[int], kz_outer: bool, rep: int = 0
) -> list[ismrmrd.Acquisition]:
    """Lines of a 3D volume ``k`` ``(n_coils, n_z, n_ky, n_kx)`` (kz = plane index), no flags."""
    n_z = k.shape[1]
    order = (
        [(z, r) for z in range(n_z) for r in rows] if kz_outer else [(z, r) for r in rows for z in range(n_z)]
    )
    out = []
    for z, r in order:
        a = ism.make_acq(k[:, z, r, :], r - N_KY // 2 + C_KY, rep=rep)
        a.idx.kspace_encode_step_2 = z
        out.append(a)
    return out


@pytest.mark.parametrize(("kz_outer", "limits"), [(False, True), (True, True), (False, False)])
def test_3d_volume_is_one_group_per_repetition(ism, kz_outer: bool, limits: bool) -> None:
    """Without ACQ_LAST_IN_SLICE: count completion waits for every partition of the header's
    ``kspace_encoding_step_2`` range (else ``0 .. z-1`` once a partition != 0 arrived), whichever loop is
    outer (before: the first full set of ky lines completed a group and the rest started bogus ones)."""
    n_z = 4
    hdr = header_3d(ism, n_z, (0, n_z - 1, n_z // 2) if limits else None, acceleration=1)
    rows = list(range(N_KY))
    vols = [
        np.stack([ism.known_kspace(N_C, N_KY, N_KX, seed=10 * r + z) for z in range(n_z)], 1) for r in (0, 1)
    ]
    stream = [*volume_lines(ism, vols[0], rows, kz_outer, 0), *volume_lines(ism, vols[1], rows, kz_outer, 1)]
    out = [o for o in buffer_slices(stream, hdr) if isinstance(o, SliceBuffer)]
    assert [b.key.repetition for b in out] == [0, 1]
    assert all(b.complete and len(b.acquisitions) == n_z * N_KY for b in out)
    a = assemble(out[1])
    assert not a.correctable and a.reason.startswith("3D encoding: 4 of 4 partitions")
    assert a.partitions is not None and a.partitions.shape == (N_C, n_z, N_KY, N_KX)
    assert a.partition_mask is not None and a.partition_mask.all()
    expected = ifft1c(torch.from_numpy(vols[1]), dim=1).numpy()  # hybrid space: z in the image domain
    np.testing.assert_allclose(a.partitions, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.kspace, expected[:, n_z // 2], rtol=1e-5, atol=1e-5)
    for ln in line_layout(out[1])[2]:  # write-back places each line on the (kz, ky) grid it came from
        np.testing.assert_array_equal(
            ln.acq.data[:, ln.samples], vols[1][:, ln.plane, ln.row, ln.col : ln.col + ln.n]
        )


@pytest.mark.parametrize("step2", [None, (0, 0, 0)])
def test_pulseq_style_2d_with_encoded_z_2_stays_2d(ism, step2) -> None:
    """siemens_to_ismrmrd conversions of 2D Pulseq scans have encoded z = 2 and every
    ``kspace_encode_step_2 = 0``: a 2D slice, complete by count, assembled as without the z."""
    rows = ism.undersampled_rows(N_KY, 0)
    k = ism.known_kspace(N_C, N_KY, N_KX)
    lines = ism.slice_lines(k, rows, C_KY, last_flag=False)
    hdr = header_3d(ism, 2, step2)
    out = list(buffer_slices(lines, hdr))
    assert len(out) == 1 and isinstance(out[0], SliceBuffer) and out[0].complete
    a = assemble(out[0])
    assert a.correctable, a.reason
    assert a.partitions is None and a.partition_mask is None
    np.testing.assert_allclose(a.kspace[:, rows], k[:, rows], rtol=1e-6, atol=1e-6)


def test_docs_table_names_every_flag_and_counter() -> None:
    """docs/gadget.md, "Acquisition flags and counters": a row for every ``ACQ_*`` flag of the installed
    package and every ``idx`` counter, and every test a row names exists in ``tests/``."""
    text = (REPO_ROOT / "docs" / "gadget.md").read_text()
    section = text.split("## Acquisition flags and counters", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ")]
    flag_rows = " ".join(r.split(" | ")[0] for r in rows)
    missing = [n for n in ALL_FLAGS if f"`{n}`" not in flag_rows]
    assert missing == []
    counters = [c for c in dir(ismrmrd.Acquisition().idx) if not c.startswith("_")]
    assert sorted(counters) == sorted(
        ["average", "contrast", "kspace_encode_step_1", "kspace_encode_step_2", "phase", "repetition"]
        + ["segment", "set", "slice", "user"]
    )
    assert [c for c in counters if not any(r.startswith(f"| `{c}`") for r in rows)] == []
    sources = "\n".join(p.read_text() for p in (REPO_ROOT / "tests").rglob("test_*.py"))
    named = set(re.findall(r"`(test_\w+)", section))
    assert len(named) > 20
    assert sorted(t for t in named if f"def {t}(" not in sources) == []
