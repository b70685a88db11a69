"""Images from acquisition streams (``kmotion.gadget.recon``)."""

from __future__ import annotations

import math

import ismrmrd
import numpy as np
import pytest
import torch

from kmotion.gadget import MotionReport, SliceKey, reconstruct_images, reconstruct_slice
from kmotion.physics import fft2c


def _report(s: int, r: int) -> MotionReport:
    return MotionReport(
        SliceKey(slice=s, contrast=0, phase=0, repetition=r, set=0),
        0,
        1.5,
        -0.5,
        3.0,
        2.58,
        -0.86,
        (2.58, -0.86, 0.0),
        False,
        True,
        "",
    )


def test_image_headers_meta_and_pass_through(stream_factory) -> None:
    st = stream_factory(n_ky=32, n_kx=40, fov_mm=(200.0, 250.0), n_coils=3, n_slices=2, n_acs=12)
    marker = object()
    report = _report(1, 1)
    items = list(st.items)
    first_rep1 = next(
        i
        for i, a in enumerate(items)
        if isinstance(a, ismrmrd.Acquisition) and a.idx.repetition == 1 and a.idx.slice == 1
    )
    items.insert(first_rep1, report)
    items.insert(3, marker)
    out = list(reconstruct_images(items, st.header, series_index=7))
    assert not any(isinstance(o, ismrmrd.Acquisition | ismrmrd.Waveform) for o in out)
    assert report in out and marker in out
    images = [o for o in out if isinstance(o, ismrmrd.Image)]
    assert [(i.slice, i.repetition) for i in images] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [i.image_index for i in images] == [1, 2, 3, 4]
    for img in images:
        src = next(
            a
            for a in st.items
            if isinstance(a, ismrmrd.Acquisition)
            and not a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
            and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
            and (a.idx.slice, a.idx.repetition) == (img.slice, img.repetition)
        )
        assert img.image_series_index == 7
        assert img.image_type == ismrmrd.IMTYPE_MAGNITUDE
        assert img.data.dtype == np.float32 and img.data.shape == (1, 1, 32, 40)
        assert tuple(img.matrix_size) == (40, 32, 1)
        assert tuple(img.field_of_view) == pytest.approx((250.0, 200.0, 5.0))
        for f in ("position", "read_dir", "phase_dir", "slice_dir", "patient_table_position"):
            assert tuple(getattr(img, f)) == pytest.approx(tuple(getattr(src, f))), f
        assert img.acquisition_time_stamp == src.acquisition_time_stamp
        assert (img.contrast, img.set) == (0, 0)
    meta = images[3].meta
    assert float(meta["kmotion_dx_px"]) == 1.5 and float(meta["kmotion_rot_deg"]) == 3.0
    assert float(meta["kmotion_dy_mm"]) == pytest.approx(-0.86) and meta["kmotion_corrected"] in (1, "1")
    assert "kmotion_dx_px" not in images[2].meta
    # the meta survives serialisation
    again = ismrmrd.Image.from_bytes(images[3].to_bytes())
    assert float(again.meta["kmotion_dx_px"]) == 1.5


def test_sense_recon_matches_the_fully_sampled_rss_and_rss_fallback(stream_factory) -> None:
    """With ACS: SENSE of R = 2 data ~ RSS of the fully sampled coil images; without: zero-filled RSS."""
    st = stream_factory(n_ky=48, n_kx=48, n_coils=6, motions=((0.0, 0.0, 0.0),), n_acs=16, extras=False)
    full = torch.from_numpy(st.full[(0, 0)])
    rss_full = (st.maps[0] * st.objects[0]).abs().square().sum(0).sqrt().numpy()
    img = next(o for o in reconstruct_images(st.items, st.header) if isinstance(o, ismrmrd.Image))
    got = img.data[0, 0]
    assert np.linalg.norm(got - rss_full) / np.linalg.norm(rss_full) < 0.1
    st2 = stream_factory(n_ky=48, n_kx=48, n_coils=6, motions=((0.0, 0.0, 0.0),), n_acs=0, extras=False)
    img2 = next(o for o in reconstruct_images(st2.items, st2.header) if isinstance(o, ismrmrd.Image))
    mask = np.zeros(48, bool)
    mask[st2.rows] = True
    want = reconstruct_slice(full.numpy(), mask, None).numpy()
    np.testing.assert_allclose(img2.data[0, 0], want, rtol=1e-5, atol=1e-6)
    assert not math.isclose(float(np.abs(img2.data - got).max()), 0.0)  # aliased vs unaliased
    # the pure helper: full sampling, no maps -> RSS of the coil images
    ones = np.ones(48, bool)
    rss = reconstruct_slice(fft2c(st.maps[0] * st.objects[0]), ones, None).numpy()
    np.testing.assert_allclose(rss, rss_full, rtol=1e-4, atol=1e-5)
