"""Tests of the first gadget stage: ``buffer_slices`` (``kmotion.gadget.buffer``)."""

from __future__ import annotations

import logging

import ismrmrd
import numpy as np
import pytest

from kmotion.gadget import SliceBuffer, assemble, buffer_slices

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
