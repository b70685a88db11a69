"""Tests for kmotion.io: BaseImages, resize_matrix, the ISMRMRD / fastMRI / twix loaders and dispatch.

ISMRMRD and fastMRI files are written here from known complex coil images; their k-space is made with
an independent numpy implementation of the centred orthonormal FFT.  float32 round trips of O(1)
images: compared with rtol=0, atol=2e-5.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import pytest
import torch

from kmotion.io import (
    BaseImages,
    load_base_images,
    load_fastmri_h5,
    load_ismrmrd_h5,
    load_twix,
    resize_matrix,
)
from kmotion.io.ismrmrd_h5 import parse_encoding
from kmotion.physics.validate import InputError

ATOL = 2e-5
TWIX = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "siemens_twix_gre_phantom.dat"


# ----------------------------------------------------------------------------- helpers
def fft_c(x: np.ndarray, axes: tuple[int, ...] = (-2, -1)) -> np.ndarray:
    return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho"), axes=axes)


def ifft_c(x: np.ndarray, axes: tuple[int, ...] = (-2, -1)) -> np.ndarray:
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho"), axes=axes)


def make_object(n_coils: int, n_y: int, n_x: int, seed: int = 0) -> np.ndarray:
    """Coil images ``(n_coils, n_y, n_x)``: an off-centre ellipse with smooth complex coil weights."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n_y) - n_y // 2)[:, None] / n_y
    x = (np.arange(n_x) - n_x // 2)[None, :] / n_x
    obj = ((((y - 0.08) / 0.35) ** 2 + ((x + 0.05) / 0.4) ** 2) < 1).astype(float) * (1 + x + 0.5 * y)
    coils = []
    for _ in range(n_coils):
        a, b, c = rng.normal(size=3)
        coils.append(np.exp(a * x + b * y) * np.exp(1j * (c + 2 * x - y)))
    return (np.stack(coils) * obj).astype(np.complex64)


def pad_x(img: np.ndarray, n_ro: int) -> np.ndarray:
    """Zero pad the image along x (centred): the image an ``n_ro / n_x`` oversampled readout sees."""
    n_x = img.shape[-1]
    out = np.zeros((*img.shape[:-1], n_ro), dtype=img.dtype)
    start = n_ro // 2 - n_x // 2
    out[..., start : start + n_x] = img
    return out


def header_xml(
    enc_matrix: tuple[int, int],
    enc_fov: tuple[float, float],
    recon_matrix: tuple[int, int],
    recon_fov: tuple[float, float],
    limits: tuple[int, int, int],
) -> str:
    """ISMRMRD XML header; matrix / FOV tuples are (x, y)."""

    def space(m: tuple[int, int], f: tuple[float, float]) -> xsd.encodingSpaceType:
        return xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=m[0], y=m[1], z=1),
            fieldOfView_mm=xsd.fieldOfViewMm(x=f[0], y=f[1], z=5.0),
        )

    enc = xsd.encodingType(
        encodedSpace=space(enc_matrix, enc_fov),
        reconSpace=space(recon_matrix, recon_fov),
        encodingLimits=xsd.encodingLimitsType(
            kspace_encoding_step_1=xsd.limitType(minimum=limits[0], maximum=limits[1], center=limits[2])
        ),
        trajectory=xsd.trajectoryType.CARTESIAN,
    )
    hdr = xsd.ismrmrdHeader(
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=123_000_000),
        encoding=[enc],
    )
    return hdr.toXML("utf-8")


def acquisition(
    data: np.ndarray, ky: int, centre: int, flags: tuple[int, ...] = (), **idx: int
) -> ismrmrd.Acquisition:
    acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, dtype=np.complex64))
    acq.center_sample = centre
    acq.idx.kspace_encode_step_1 = ky
    for name, value in idx.items():
        setattr(acq.idx, name, value)
    for flag in flags:
        acq.set_flag(flag)
    return acq


def write_ismrmrd(path: Path, xml: str | None, acqs: list[ismrmrd.Acquisition]) -> None:
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=True) as ds:
        if xml is not None:
            ds.write_xml_header(xml)
        for acq in acqs:
            ds.append_acquisition(acq)


def image_lines(kspace: np.ndarray, ky_of_row: np.ndarray, centre: int, rng: np.random.Generator, **idx: int):
    """One acquisition per k-space row (rows in random order); ``ky_of_row[r]`` is the stored ky."""
    return [
        acquisition(kspace[:, r], int(ky_of_row[r]), centre, **idx) for r in rng.permutation(kspace.shape[1])
    ]


# ----------------------------------------------------------------------------- BaseImages / resize
def test_base_images_properties() -> None:
    imgs = make_object(2, 12, 10)[None]
    b = BaseImages(imgs, (240.0, 150.0), "test", ["slice 0"])
    assert b.pixel_spacing_mm == (20.0, 15.0)
    t = b.as_tensor("cpu")
    assert t.dtype == torch.complex64 and tuple(t.shape) == (1, 2, 12, 10)
    torch.testing.assert_close(t, torch.from_numpy(imgs), rtol=0, atol=0)
    assert BaseImages(imgs, (1.0, 1.0), "t").labels == ["image 0"]


@pytest.mark.parametrize(
    ("images", "fov", "labels", "match"),
    [
        (np.zeros((2, 8, 8), np.complex64), (1.0, 1.0), None, "n_images, n_coils"),
        (np.zeros((1, 1, 8, 8), np.complex64), (0.0, 1.0), None, "fov_mm"),
        (np.zeros((1, 1, 8, 8), np.complex64), (1.0, 1.0), ["a", "b"], "labels"),
        (np.zeros((1, 1, 8, 8), np.int32), (1.0, 1.0), None, "complex"),
    ],
)
def test_base_images_validation(images: np.ndarray, fov: tuple[float, float], labels, match: str) -> None:
    with pytest.raises(InputError, match=match):
        BaseImages(images, fov, "test", labels or [])


@pytest.mark.parametrize(("old", "new"), [((21, 17), (32, 30)), ((16, 15), (9, 24)), ((20, 20), (13, 13))])
def test_resize_matrix_centred_kspace(old: tuple[int, int], new: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    # k-space with energy only within +-4 of the centre survives any of these crops unchanged
    k = np.zeros((2, *old), np.complex64)
    cy, cx = old[0] // 2, old[1] // 2
    k[:, cy - 4 : cy + 5, cx - 4 : cx + 5] = rng.normal(size=(2, 9, 9)) + 1j * rng.normal(size=(2, 9, 9))
    out = resize_matrix(ifft_c(k), new)
    assert out.shape == (2, *new) and out.dtype == np.complex64
    k_out = fft_c(out) / np.sqrt(np.prod(new) / np.prod(old))
    ny, nx = new[0] // 2, new[1] // 2
    np.testing.assert_allclose(
        k_out[:, ny - 4 : ny + 5, nx - 4 : nx + 5], k[:, cy - 4 : cy + 5, cx - 4 : cx + 5], rtol=0, atol=1e-4
    )
    # constant images stay constant; pad then crop back is the identity
    np.testing.assert_allclose(
        resize_matrix(np.full(old, 3.0 + 1j), new), np.full(new, 3.0 + 1j), rtol=0, atol=1e-5
    )
    img = make_object(1, *old)
    big = (old[0] + 7, old[1] + 4)
    np.testing.assert_allclose(resize_matrix(resize_matrix(img, big), old), img, rtol=0, atol=ATOL)


def test_resize_matrix_bad_input() -> None:
    with pytest.raises(InputError, match="new_shape"):
        resize_matrix(np.zeros((4, 4), np.complex64), (0, 4))
    with pytest.raises(InputError, match="at least 2"):
        resize_matrix(np.zeros(4, np.complex64), (4, 4))


# ----------------------------------------------------------------------------- ISMRMRD
@pytest.mark.parametrize("convention", ["samples_gt_encoded", "encoded_includes_os"])
def test_ismrmrd_oversampled_noise_calibration_slices_reps(tmp_path: Path, convention: str) -> None:
    n_c, n_y, n_x, n_ro = 3, 32, 24, 48
    fov_y, fov_x = 240.0, 180.0
    rng = np.random.default_rng(2)
    keys = [(0, 0), (0, 1), (1, 0)]  # (slice, repetition)
    objs = {k: make_object(n_c, n_y, n_x, seed=i) for i, k in enumerate(keys)}
    if convention == "samples_gt_encoded":  # encoded matrix x = n_x, readouts of 2 n_x samples
        xml = header_xml((n_x, n_y), (fov_x, fov_y), (n_x, n_y), (fov_x, fov_y), (0, n_y - 1, n_y // 2))
    else:  # siemens_to_ismrmrd / fastMRI: encoded space includes the oversampling, recon space does not
        xml = header_xml((n_ro, n_y), (2 * fov_x, fov_y), (n_x, n_y), (fov_x, fov_y), (0, n_y - 1, n_y // 2))
    noise = rng.normal(size=(n_c, n_ro)) * 100 + 0j
    acqs = [acquisition(noise, 0, n_ro // 2, (ismrmrd.ACQ_IS_NOISE_MEASUREMENT,))]
    # calibration-only line with garbage (must be skipped) and a navigator
    acqs.append(acquisition(noise, n_y // 2, n_ro // 2, (ismrmrd.ACQ_IS_PARALLEL_CALIBRATION,)))
    acqs.append(acquisition(noise, 0, n_ro // 2, (ismrmrd.ACQ_IS_NAVIGATION_DATA,)))
    for slc, rep in keys:
        k = fft_c(pad_x(objs[(slc, rep)], n_ro))
        acqs += image_lines(k, np.arange(n_y), n_ro // 2, rng, slice=slc, repetition=rep)
        # a line that is calibration and imaging, acquired twice (average 1): used and averaged
        acqs.append(
            acquisition(
                k[:, 5],
                5,
                n_ro // 2,
                (ismrmrd.ACQ_IS_PARALLEL_CALIBRATION, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING),
                slice=slc,
                repetition=rep,
                average=1,
            )
        )
    path = tmp_path / "os.h5"
    write_ismrmrd(path, xml, acqs)

    b = load_ismrmrd_h5(path)
    assert b.images.shape == (3, n_c, n_y, n_x) and b.images.dtype == np.complex64
    assert b.fov_mm == pytest.approx((fov_y, fov_x))
    assert b.pixel_spacing_mm == pytest.approx((7.5, 7.5))
    assert b.labels == ["slice 0 rep 0", "slice 0 rep 1", "slice 1 rep 0"]
    for i, key in enumerate(keys):
        np.testing.assert_allclose(b.images[i], objs[key], rtol=0, atol=ATOL)
    b2 = load_base_images(path)
    np.testing.assert_array_equal(b2.images, b.images)


def test_ismrmrd_odd_sizes_offcentre_centre_line_and_discard(tmp_path: Path) -> None:
    n_c, n_y, n_x = 2, 27, 21
    centre_ky = 16  # stored index of the k-space centre line (our row n_y // 2 = 13)
    obj = make_object(n_c, n_y, n_x, seed=5)
    k = fft_c(obj)
    rng = np.random.default_rng(3)
    xml = header_xml(
        (n_x, n_y),
        (105.0, 189.0),
        (n_x, n_y),
        (105.0, 189.0),
        (centre_ky - n_y // 2, centre_ky - n_y // 2 + n_y - 1, centre_ky),
    )
    acqs = []
    for r in rng.permutation(n_y):
        # 2 junk samples before and 1 after the readout, flagged by discard_pre / discard_post
        data = np.concatenate([np.full((n_c, 2), 1e3), k[:, r], np.full((n_c, 1), -1e3)], axis=1)
        acq = acquisition(data, r - n_y // 2 + centre_ky, n_x // 2 + 2)
        acq.discard_pre, acq.discard_post = 2, 1
        acqs.append(acq)
    path = tmp_path / "odd.h5"
    write_ismrmrd(path, xml, acqs)
    b = load_ismrmrd_h5(path)
    assert b.images.shape == (1, n_c, n_y, n_x)
    assert b.fov_mm == pytest.approx((189.0, 105.0))
    assert b.labels == ["slice 0"]
    np.testing.assert_allclose(b.images[0], obj, rtol=0, atol=ATOL)


def _simple_file(
    path: Path, *, xml: str | None = "default", n_lines: int = 8, nan: bool = False, only_noise: bool = False
) -> Path:
    n = 8
    k = fft_c(make_object(1, n, n))
    if nan:
        k[0, 3, 2] = np.nan
    if xml == "default":
        xml = header_xml((n, n), (80.0, 80.0), (n, n), (80.0, 80.0), (0, n - 1, n // 2))
    flags = (ismrmrd.ACQ_IS_NOISE_MEASUREMENT,) if only_noise else ()
    write_ismrmrd(path, xml, [acquisition(k[:, r], r, n // 2, flags) for r in range(n_lines)])
    return path


def test_ismrmrd_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no_xml.h5: 'dataset/xml': expected the ISMRMRD XML header"):
        load_ismrmrd_h5(_simple_file(tmp_path / "no_xml.h5", xml=None))
    no_enc = xsd.ismrmrdHeader(
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=1)
    )
    with pytest.raises(InputError, match="expected at least one <encoding>, got none"):
        load_ismrmrd_h5(_simple_file(tmp_path / "no_enc.h5", xml=no_enc.toXML("utf-8")))
    with pytest.raises(InputError, match="expected imaging acquisitions, got none"):
        load_ismrmrd_h5(_simple_file(tmp_path / "noise.h5", only_noise=True))
    with pytest.raises(InputError, match="got 1 NaN/Inf samples"):
        load_ismrmrd_h5(_simple_file(tmp_path / "nan.h5", nan=True))
    with pytest.raises(InputError, match="expected fully sampled k-space.*got 2 missing lines"):
        load_ismrmrd_h5(_simple_file(tmp_path / "missing.h5", n_lines=6))
    path = _simple_file(tmp_path / "ok.h5")
    with pytest.raises(InputError, match=r"group 'other'.*got top-level entries \['dataset'\]"):
        load_ismrmrd_h5(path, dataset="other")
    assert load_ismrmrd_h5(path).images.shape == (1, 1, 8, 8)
    no_data = tmp_path / "no_data.h5"
    write_ismrmrd(no_data, header_xml((8, 8), (80.0, 80.0), (8, 8), (80.0, 80.0), (0, 7, 4)), [])
    with pytest.raises(InputError, match="'dataset/data': expected acquisitions"):
        load_ismrmrd_h5(no_data)


def test_parse_encoding_fallback_and_bad_xml() -> None:
    xml = header_xml((16, 12), (320.0, 120.0), (8, 12), (160.0, 120.0), (1, 10, 6))
    ref = parse_encoding(xml, "ref")
    assert (
        ref.encoded_matrix == (16, 12, 1) and ref.recon_fov_mm[0] == 160.0 and ref.step1_limits == (1, 10, 6)
    )
    # an element the strict schema parser refuses: read by the ElementTree fallback, same result
    odd = xml.replace("<encoding>", "<vendorThing>1</vendorThing><encoding>", 1)
    assert odd != xml and parse_encoding(odd, "odd") == ref
    with pytest.raises(InputError, match="bad.h5: ISMRMRD XML header: expected valid XML"):
        parse_encoding("<ismrmrdHeader><encoding>", "bad.h5")


# ----------------------------------------------------------------------------- fastMRI
def write_fastmri(path: Path, kspace: np.ndarray | None, xml: str | None) -> None:
    with h5py.File(path, "w") as f:
        if kspace is not None:
            f.create_dataset("kspace", data=kspace)
        if xml is not None:
            f.create_dataset("ismrmrd_header", data=xml.encode())


def fastmri_case(n_coils: int | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(file kspace in fastMRI layout, expected images (S, C, n_y, n_x), header) with zero-padded PE."""
    n_s, n_y, n_x = 2, 30, 20
    n_ro = 2 * n_x
    lo, hi, centre = 0, 23, 12  # acquired lines; fastMRI puts line l at column n_y // 2 - centre + l
    first = n_y // 2 - centre
    objs = np.stack([make_object(n_coils or 1, n_y, n_x, seed=10 + s) for s in range(n_s)])
    ky_mask = np.zeros(n_y, bool)
    ky_mask[first + lo : first + hi + 1] = True
    # band-limit the object to the acquired phase-encoding lines: then it is exactly representable
    objs = ifft_c(fft_c(objs, axes=(-2,)) * ky_mask[:, None], axes=(-2,)).astype(np.complex64)
    k = fft_c(pad_x(objs, n_ro)).astype(np.complex64)  # (S, C, ky, kx) in our order
    assert np.abs(k[..., ~ky_mask, :]).max() < 1e-4  # zero-padded PE columns as in fastMRI files
    k_file = k.transpose(0, 1, 3, 2)  # fastMRI: [slices, coils, readout, phase-encode]
    if n_coils is None:
        k_file = k_file[:, 0]  # single-coil: [slices, readout, phase-encode]
    xml = header_xml((n_ro, n_y), (2 * 160.0, 240.0), (n_x, n_x), (160.0, 160.0), (lo, hi, centre))
    return k_file, objs, xml


@pytest.mark.parametrize("n_coils", [4, None])
def test_fastmri_multi_and_single_coil(tmp_path: Path, n_coils: int | None) -> None:
    k_file, objs, xml = fastmri_case(n_coils)
    path = tmp_path / "fastmri.h5"
    write_fastmri(path, k_file, xml)
    b = load_fastmri_h5(path)
    assert b.images.shape == (2, n_coils or 1, 30, 20)
    assert b.fov_mm == pytest.approx((240.0, 160.0))
    assert b.pixel_spacing_mm == pytest.approx((8.0, 8.0))
    assert b.labels == ["slice 0", "slice 1"]
    np.testing.assert_allclose(b.images, objs, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(load_base_images(path).images, b.images)
    one = load_fastmri_h5(path, slices=[1])
    assert one.labels == ["slice 1"]
    np.testing.assert_array_equal(one.images, b.images[1:])
    with pytest.raises(InputError, match=r"slices: expected indices in 0..1, got \[2\]"):
        load_fastmri_h5(path, slices=[2])


def test_fastmri_errors(tmp_path: Path) -> None:
    k_file, _, xml = fastmri_case(2)
    cases = {
        "no_kspace": (None, xml, "'kspace': expected a k-space dataset"),
        "bad_ndim": (k_file[0, 0], xml, r"got shape \(40, 30\)"),
        "no_header": (k_file, None, "'ismrmrd_header': expected the ISMRMRD XML header"),
        "bad_pe": (k_file[..., :28], xml, "expected encodedSpace matrixSize.y = 30 columns, got 28"),
    }
    for name, (k, x, match) in cases.items():
        path = tmp_path / f"{name}.h5"
        write_fastmri(path, k, x)
        with pytest.raises(InputError, match=match):
            load_fastmri_h5(path)


# ----------------------------------------------------------------------------- dispatch
def test_load_base_images_refuses_unknown(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        load_base_images(tmp_path / "missing.h5")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(InputError, match=r"notes.txt: unrecognised file format: expected HDF5"):
        load_base_images(txt)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("images", data=np.zeros(3))
    with pytest.raises(InputError, match=r"unknown layout.*got top-level entries \['images'\]"):
        load_base_images(other)


# ----------------------------------------------------------------------------- Siemens twix
@pytest.fixture(scope="module")
def twix_images() -> BaseImages:
    if not TWIX.is_file():
        pytest.skip(f"shared twix phantom not found at {TWIX}")
    return load_twix(TWIX)


def test_twix_phantom(twix_images: BaseImages) -> None:
    b = twix_images
    assert b.images.shape == (1, 2, 160, 160)  # 320 oversampled readout samples -> 160 columns
    assert b.fov_mm == (200.0, 200.0)
    assert b.pixel_spacing_mm == (1.25, 1.25)
    assert b.labels == ["slice 0"]
    assert np.isfinite(b.images).all() and b.images.dtype == np.complex64
    rss = np.sqrt((np.abs(b.images[0]) ** 2).sum(0))
    corners = np.mean(
        [rss[:12, :12].mean(), rss[:12, -12:].mean(), rss[-12:, :12].mean(), rss[-12:, -12:].mean()]
    )
    uniform = rss[95:125, 60:120].mean()  # homogeneous lower part of the phantom
    assert uniform > 5 * corners
    obj = rss > 0.5 * np.percentile(rss, 99)
    assert 0.3 < obj.mean() < 0.8
    cy, cx = np.argwhere(obj).mean(0)
    assert abs(cy - 80) < 15 and abs(cx - 80) < 15  # object centred: no shift / wrap from the crop


def test_twix_refuses_other_files(tmp_path: Path) -> None:
    fake = tmp_path / "fake.dat"
    fake.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match=r"fake.dat: expected a Siemens twix .dat file"):
        load_twix(fake)
    with pytest.raises(InputError, match="unrecognised file format"):
        load_base_images(fake)


def test_twix_dispatch_and_truncated(tmp_path: Path, twix_images: BaseImages) -> None:
    np.testing.assert_array_equal(load_base_images(TWIX).images, twix_images.images)
    cut = tmp_path / "cut.dat"
    cut.write_bytes(TWIX.read_bytes()[:200_000])  # header intact, no (complete) scans
    with pytest.raises(InputError, match="cut.dat"):
        load_twix(cut)


def test_padded_grows_fov_keeps_pixels_and_centre() -> None:
    img = np.zeros((1, 1, 9, 8), dtype=np.complex64)
    img[0, 0, 4, 4] = 1.0
    base = BaseImages(img, (18.0, 16.0), "test")
    pad = base.padded(1.5)
    assert pad.images.shape == (1, 1, 14, 12)
    assert pad.pixel_spacing_mm == pytest.approx(base.pixel_spacing_mm)
    assert pad.images[0, 0, 14 // 2, 12 // 2] == 1.0
    with pytest.raises(InputError, match="factor"):
        base.padded(0.5)
