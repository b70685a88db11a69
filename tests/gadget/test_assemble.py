"""Tests of the second gadget stage: ``assemble`` (``kmotion.gadget.assemble``)."""

from __future__ import annotations

import ismrmrd
import numpy as np
import pytest
import torch

from kmotion.gadget import AssembledSlice, SliceBuffer, assemble, buffer_slices
from kmotion.gadget.assemble import EDGE_MARGIN, line_layout
from kmotion.gadget.correct import add_delta, ramp_lines
from kmotion.physics.fft import fft1c, ifft1c

N_KY, N_KX, N_C = 28, 32, 2
C_KY = N_KY // 2


def _assembled(stream: list[object], header) -> AssembledSlice:
    out = [o for o in buffer_slices(stream, header) if isinstance(o, SliceBuffer)]
    assert len(out) == 1
    return assemble(out[0])


@pytest.mark.parametrize("n_ky", [28, 27])
@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("centre_offset", [0, 3])
def test_assemble_places_lines(ism, n_ky: int, parity: int, centre_offset: int) -> None:
    c = n_ky // 2 + centre_offset  # header centre line need not be n_ky // 2
    hdr = ism.make_header(n_ky=n_ky, step1=(centre_offset, n_ky - 1 + centre_offset, c))
    k = ism.known_kspace(3, n_ky, N_KX, seed=n_ky + parity)
    rows = ism.undersampled_rows(n_ky, parity)
    a = _assembled(ism.slice_lines(k, rows, c), hdr)
    assert a.correctable, a.reason
    assert a.kspace.shape == (3, n_ky, N_KX) and a.kspace.dtype == np.complex64
    assert np.flatnonzero(a.mask).tolist() == rows
    np.testing.assert_allclose(a.kspace[:, rows], k[:, rows], rtol=1e-6, atol=1e-6)
    assert not np.any(a.kspace[:, ~a.mask])
    assert (a.acceleration, a.parity) == (2, parity)
    assert a.segment[rows].tolist() == [i // 4 for i in range(len(rows))]
    assert a.matrix == (n_ky, N_KX)
    assert a.fov_mm == (224.0, 256.0)
    assert a.pixel_spacing_mm == pytest.approx((224.0 / n_ky, 256.0 / N_KX))
    assert a.read_dir == (1.0, 0.0, 0.0) and a.slice_dir == (0.0, 0.0, 1.0)


@pytest.mark.parametrize("encoded_includes_os", [False, True])
def test_assemble_removes_readout_oversampling(ism, encoded_includes_os: bool) -> None:
    if encoded_includes_os:  # siemens_to_ismrmrd style: encoded x and FOV include the 2x oversampling
        hdr = ism.make_header(n_kx=N_KX, enc_x=2 * N_KX, fov_mm=(224.0, 512.0), recon_fov_x=256.0)
    else:
        hdr = ism.make_header()
    k_os = ism.known_kspace(N_C, N_KY, 2 * N_KX, seed=3)
    rows = ism.undersampled_rows(N_KY, 0)
    a = _assembled(ism.slice_lines(k_os, rows, C_KY), hdr)
    assert a.correctable, a.reason
    img = ifft1c(torch.from_numpy(k_os), dim=-1)
    expected = fft1c(img[..., N_KX - N_KX // 2 : N_KX + N_KX // 2], dim=-1).numpy()
    assert a.kspace.shape == (N_C, N_KY, N_KX)
    np.testing.assert_allclose(a.kspace[:, rows], expected[:, rows], rtol=1e-5, atol=1e-5)
    assert a.matrix == (N_KY, N_KX) and a.fov_mm == (224.0, 256.0)
    assert a.pixel_spacing_mm == pytest.approx((8.0, 8.0))


def test_assemble_averages_repeated_lines(ism) -> None:
    hdr = ism.make_header(n_averages=2)  # count completion waits for both averages
    k1, k2 = ism.known_kspace(N_C, N_KY, N_KX, seed=1), ism.known_kspace(N_C, N_KY, N_KX, seed=2)
    rows = ism.undersampled_rows(N_KY, 1)
    stream = [*ism.slice_lines(k1, rows, C_KY, last_flag=False)]
    stream += ism.slice_lines(k2, rows, C_KY, last_flag=False)
    for acq in stream[len(rows) :]:
        acq.idx.average = 1
    out = list(buffer_slices(stream, hdr))
    assert len(out) == 1 and isinstance(out[0], SliceBuffer) and out[0].complete
    assert out[0].acquisitions == stream
    a = assemble(out[0])
    assert a.correctable, a.reason
    np.testing.assert_allclose(a.kspace[:, rows], (k1[:, rows] + k2[:, rows]) / 2, rtol=1e-6, atol=1e-6)


def test_assemble_flags_asymmetric_echo(ism, header) -> None:
    k = ism.known_kspace(N_C, N_KY, N_KX)
    rows = ism.undersampled_rows(N_KY, 0)
    stream = []
    for i, r in enumerate(rows):  # 24 samples, echo at sample 8: columns 8..31 of the centred row
        stream.append(ism.make_acq(k[:, r, 8:], r, segment=i // 4, center_sample=8))
    stream[-1].set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    a = _assembled(stream, header)
    # issue 9: asymmetric echo is a supported protocol: correctable, named in the notes, and the sample
    # mask holds exactly the acquired columns (no readout oversampling here, so no edge margin is needed
    # beyond EDGE_MARGIN at the zero-filled edge)
    assert a.correctable and "asymmetric echo" in a.notes
    np.testing.assert_allclose(a.kspace[:, rows, 8:], k[:, rows, 8:], rtol=1e-6, atol=1e-6)
    assert not np.any(a.kspace[:, :, :8])
    m = a.samples()
    assert m.shape == a.kspace.shape[1:]
    assert m[rows].sum(1).tolist() == [N_KX - 8 - EDGE_MARGIN] * len(rows)
    assert not m[rows, : 8 + EDGE_MARGIN].any() and m[rows, 8 + EDGE_MARGIN :].all()
    assert not m[[r for r in range(N_KY) if r not in rows]].any()


def test_assemble_flags_partial_fourier_in_y(ism, header) -> None:
    k = ism.known_kspace(N_C, N_KY, N_KX)
    rows = [r for r in ism.undersampled_rows(N_KY, 0) if r >= 8]
    a = _assembled(ism.slice_lines(k, rows, C_KY), header)
    assert a.correctable and "partial Fourier along y" in a.notes  # issue 9: a supported protocol
    assert a.samples()[rows].all() and not a.samples()[:8].any()


def test_assemble_flags_nan(ism, header) -> None:
    k = ism.known_kspace(N_C, N_KY, N_KX)
    rows = ism.undersampled_rows(N_KY, 0)
    k[1, rows[3], 5] = np.nan
    a = _assembled(ism.slice_lines(k, rows, C_KY), header)
    assert not a.correctable and "NaN" in a.reason
    assert np.isfinite(a.kspace).all()


# --- reversed readouts (ACQ_IS_REVERSE): flipped in assembly, flipped back on write-back ----------------


def _reversed_stream(ism, k: np.ndarray, rows: list[int], pre: int, post: int, asym: int) -> list[object]:
    """Every second line read with the reversed gradient: samples stored in time order, i.e. the k-space
    row reversed, with ``pre``/``post`` extra samples discarded at the start/end *in time*; the first
    ``asym`` k-space columns not acquired (asymmetric echo).  ``center_sample`` in k-space order."""
    n_c, _, n_kx = k.shape
    rng = np.random.default_rng(5)
    stream = []
    for i, r in enumerate(rows):
        kept = k[:, r, asym:]  # k-space order
        junk_pre = (rng.standard_normal((n_c, pre)) * 100).astype(np.complex64)
        junk_post = (rng.standard_normal((n_c, post)) * 100).astype(np.complex64)
        if i % 2:
            raw = np.concatenate([junk_pre, kept[:, ::-1], junk_post], axis=1)  # time order
            centre = post + n_kx // 2 - asym  # in k-space order: junk_post first after the reversal
        else:
            raw = np.concatenate([junk_pre, kept, junk_post], axis=1)
            centre = pre + n_kx // 2 - asym
        acq = ism.make_acq(raw, r, segment=i // 4, center_sample=centre)
        acq.discard_pre, acq.discard_post = pre, post
        if i % 2:
            acq.set_flag(ismrmrd.ACQ_IS_REVERSE)
        stream.append(acq)
    stream[-1].set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
    return stream


@pytest.mark.parametrize(("pre", "post", "asym"), [(0, 0, 0), (3, 5, 0), (2, 4, 6)])
def test_reversed_lines_assemble_as_the_unreversed(ism, header, pre: int, post: int, asym: int) -> None:
    k = ism.known_kspace(N_C, N_KY, N_KX, seed=4)
    rows = ism.undersampled_rows(N_KY, 0)
    a = _assembled(_reversed_stream(ism, k, rows, pre, post, asym), header)
    assert a.correctable, a.reason
    np.testing.assert_allclose(a.kspace[:, rows, asym:], k[:, rows, asym:], rtol=1e-6, atol=1e-6)
    assert not np.any(a.kspace[:, :, :asym])
    assert ("asymmetric echo" in a.notes) == (asym > 0)


@pytest.mark.parametrize(("pre", "post", "asym"), [(0, 0, 0), (2, 4, 6)])
def test_write_back_of_reversed_lines_round_trips(ism, header, pre: int, post: int, asym: int) -> None:
    """``add_delta`` writes a grid change into each raw line in that line's own (time) order: assembling
    the new lines gives the old grid plus the change; the discarded samples are untouched.  ``ramp_lines``
    gives each raw sample the kx of its k-space position."""
    k = ism.known_kspace(N_C, N_KY, N_KX, seed=6)
    rows = ism.undersampled_rows(N_KY, 0)
    stream = _reversed_stream(ism, k, rows, pre, post, asym)
    buf = [o for o in buffer_slices(stream, header) if isinstance(o, SliceBuffer)][0]
    before = assemble(buf)
    delta = ism.known_kspace(N_C, N_KY, N_KX, seed=7) * before.samples()[None]
    new = add_delta(buf, delta)
    old_raw = [np.array(a.data) for a in buf.acquisitions]
    for acq, data in new:
        acq.data[:] = data
    after = assemble(buf)
    np.testing.assert_allclose(after.kspace, before.kspace + delta, rtol=1e-5, atol=1e-5)
    for acq, raw in zip(buf.acquisitions, old_raw, strict=True):  # discarded samples (in time) untouched
        np.testing.assert_array_equal(acq.data[:, :pre], raw[:, :pre])
        np.testing.assert_array_equal(
            acq.data[:, acq.number_of_samples - post :], raw[:, raw.shape[1] - post :]
        )
    # the ramp: sample kx in grid samples from the centre, per raw sample, in the line's stored order
    for (acq, _data, kx, _ky), ln in zip(ramp_lines(buf, N_KY, 0.0, 0.0), line_layout(buf)[2], strict=True):
        kept_kx = kx[ln.samples]  # the kept samples in k-space order: increasing kx, centre at column n_kx//2
        np.testing.assert_array_equal(kept_kx, np.arange(ln.n) + ln.col - N_KX // 2)
        assert ln.reverse == acq.is_flag_set(ismrmrd.ACQ_IS_REVERSE)
