"""The protocols of ``docs/gadget.md`` ("Supported protocols"), each on a small simulated stream end to end.

One fully sampled acquisition (``kmotion.simulation.raw.simulate_raw``: 128 x 128, FOV 220 mm, 2x readout
oversampling, 8 coils, SNR 30 with a noise line, repetition 0 motion-free, repetition 1 moved by
``MOTION``) is turned into each protocol by :func:`protocol` — rows dropped for the acceleration, the row
parity and partial Fourier, leading readout samples dropped for an asymmetric echo (``center_sample`` set),
calibration lines flagged (integrated) or moved into encoding space 1 (a separate reference scan), samples
stored in time order for reversed readouts (``ACQ_IS_REVERSE``) — and streamed through
:class:`~kmotion.gadget.MotionCorrector`.  Checked: the estimate against the truth (tolerances below), the
slice corrected, every acquisition out with its header unchanged, and the image of the corrected lines
closer to the reference than the uncorrected one (the same ``reconstruct_images`` for both).

Measured (this seed, 2026-11-30, commit f73fbae, 1 thread): translation errors <= 0.026 px at every R,
rotation errors <= 0.047 deg for R <= 3 (every row parity, calibration integrated or separate, partial
Fourier 5/8-7/8, asymmetric echo, reversed readouts) except the second cardiac phase (another phantom slice):
0.154 deg; R = 4: 0.06-0.10 deg (other phantoms up to 0.77 deg, ``TOL_DEG_R4``).  The reported standard
errors (0.003-0.006 px; 0.013-0.032 deg at R <= 2, 0.09-0.16 deg at R = 3, 4 where the reference's data enter
the fit) do not hold the coil-map error, which dominates at R <= 2 (``docs/gadget.md``, "Do no harm").
Corrected / uncorrected NRMSE 0.16-0.22 at R <= 2, 0.29-0.36 at R = 3, 0.40 at R = 4.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import ismrmrd
import ismrmrd.xsd
import numpy as np
import pytest

from kmotion.gadget import GadgetParams, MotionCorrector, MotionReport, reconstruct_images
from kmotion.gadget.params import DEFAULT_MODEL
from kmotion.simulation.raw import RawAcquisition, RawConfig, simulate_raw

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="no shipped model in this checkout")

MOTION = (2.5, -1.5, 6.0)
"""The motion of repetition 1 (dx_px, dy_px, phi_deg)."""
TOL_PX, TOL_DEG = 0.1, 0.3
"""Tolerance of the estimate (measured <= 0.026 px, <= 0.154 deg: margin >= 2x)."""
TOL_DEG_R4 = 0.5
"""R = 4 (8 coils, SNR 30): the rotation is 0.06-0.10 deg off at this seed, up to 0.77 deg at others (reported
std 0.10-0.16 deg)."""
GROSS_DEG = 1.0
"""An error above this (deg, or px) is gross."""
CPU = GadgetParams(device="cpu")

_POSITION_FLAGS = (
    ismrmrd.ACQ_FIRST_IN_SLICE,
    ismrmrd.ACQ_LAST_IN_SLICE,
    ismrmrd.ACQ_FIRST_IN_REPETITION,
    ismrmrd.ACQ_LAST_IN_REPETITION,
    ismrmrd.ACQ_LAST_IN_MEASUREMENT,
)


@functools.lru_cache(maxsize=4)
def fully_sampled(seed: int = 5, n_slices: int = 1) -> RawAcquisition:
    """The fully sampled acquisition every protocol is cut from (module docstring)."""
    cfg = RawConfig(
        matrix=(128, 128),
        n_coils=8,
        n_slices=n_slices,
        n_repetitions=2,
        acceleration=1,
        calibration_lines=0,
        snr=30.0,
        seed=seed,
        motion=((0.0, 0.0, 0.0), MOTION),
    )
    return simulate_raw(cfg)


def _with_data(acq: ismrmrd.Acquisition, data: np.ndarray, center_sample: int) -> ismrmrd.Acquisition:
    """A copy of ``acq`` holding ``data`` ``(n_coils, n_samples)`` with ``center_sample``."""
    head = acq.getHead()
    head.number_of_samples = data.shape[1]
    head.center_sample = center_sample
    out = ismrmrd.Acquisition(head)
    out.data[:] = data
    return out


def protocol(
    raw: RawAcquisition,
    accel: int = 2,
    parity: int = 0,
    calibration: str = "integrated",
    calibration_lines: int = 24,
    partial_fourier: float = 1.0,
    asymmetric_echo: float = 1.0,
    reverse_repetition: int | None = None,
) -> tuple[ismrmrd.xsd.ismrmrdHeader, list[object]]:
    """The stream of a protocol cut from the fully sampled ``raw`` (header, items).

    ``accel``/``parity``: the acquired rows ``(row - n_y // 2) % accel == parity``; ``calibration``:
    ``integrated`` (the centre ``calibration_lines`` rows in every repetition, those off the pattern flagged
    ``ACQ_IS_PARALLEL_CALIBRATION``, those on it ``..._AND_IMAGING``), ``separate`` (the centre rows of
    repetition 0 as a reference scan in encoding space 1, a second encoding with the same geometry, before
    the imaging lines) or ``none``; ``partial_fourier``: the fraction of rows kept (the lowest rows
    dropped); ``asymmetric_echo``: the fraction of readout samples kept (the first dropped,
    ``center_sample`` moved); ``reverse_repetition``: the lines of that repetition stored in time order of a
    reversed gradient (``ACQ_IS_REVERSE``).  ``ACQ_FIRST/LAST_IN_SLICE`` are set on the first/last imaging
    line of each slice group.
    """
    header = copy.deepcopy(raw.header)
    enc = header.encoding[0]
    n_y = int(enc.encodedSpace.matrixSize.y)
    c = n_y // 2
    first_row = n_y - int(round(partial_fourier * n_y))
    lo = c - calibration_lines // 2
    calib_rows = range(lo, lo + calibration_lines) if calibration != "none" else range(0)
    enc.parallelImaging.accelerationFactor.kspace_encoding_step_1 = accel
    if calibration == "separate":
        enc.parallelImaging.calibrationMode = "separate"
        ref_enc = copy.deepcopy(enc)
        ref_enc.parallelImaging.accelerationFactor.kspace_encoding_step_1 = 1
        header.encoding.append(ref_enc)
    items: list[object] = []
    reference_scan: list[ismrmrd.Acquisition] = []
    groups: dict[tuple[int, int], list[ismrmrd.Acquisition]] = {}
    for item in raw.items:
        if not isinstance(item, ismrmrd.Acquisition) or item.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            items.append(item)
            continue
        row = int(item.idx.kspace_encode_step_1)
        if row < first_row:
            continue
        on_pattern = (row - c) % accel == parity
        in_calib = row in calib_rows
        acq = copy.deepcopy(item)
        for f in _POSITION_FLAGS:
            acq.clear_flag(f)
        if asymmetric_echo < 1.0:
            n_s = int(acq.number_of_samples)
            cut = n_s - int(round(asymmetric_echo * n_s))
            acq = _with_data(acq, np.array(acq.data)[:, cut:], n_s // 2 - cut)
        if reverse_repetition is not None and int(acq.idx.repetition) == reverse_repetition:
            # time order of a reversed gradient; center_sample counts in k-space order (docs/gadget.md)
            acq = _with_data(acq, np.array(acq.data)[:, ::-1], int(acq.center_sample))
            acq.set_flag(ismrmrd.ACQ_IS_REVERSE)
        key = (int(acq.idx.slice), int(acq.idx.repetition))
        if calibration == "separate":
            if in_calib and key[1] == 0:
                cal = copy.deepcopy(acq)
                cal.encoding_space_ref = 1
                cal.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
                reference_scan.append(cal)
            if on_pattern:
                groups.setdefault(key, []).append(acq)
            continue
        if on_pattern and in_calib and accel > 1:
            acq.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
        elif in_calib and not on_pattern:
            acq.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
        elif not on_pattern:
            continue
        groups.setdefault(key, []).append(acq)
    items += reference_scan
    for key in sorted(groups, key=lambda k: (k[1], k[0])):
        lines = groups[key]
        imaging = [a for a in lines if not _calibration_only(a)]
        imaging[0].set_flag(ismrmrd.ACQ_FIRST_IN_SLICE)
        imaging[-1].set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
        items += lines
    return header, items


def _calibration_only(a: ismrmrd.Acquisition) -> bool:
    return a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION) and not a.is_flag_set(
        ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING
    )


def _copy(items: list[object]) -> list[object]:
    return [copy.deepcopy(i) if isinstance(i, ismrmrd.Acquisition) else i for i in items]


def _pairs(
    items: list[object], copies: list[object]
) -> list[tuple[ismrmrd.Acquisition, ismrmrd.Acquisition]]:
    """The acquisitions of ``items`` with their copies (:func:`_copy`)."""
    return [
        (a, b)
        for a, b in zip(items, copies, strict=True)
        if isinstance(a, ismrmrd.Acquisition) and isinstance(b, ismrmrd.Acquisition)
    ]


def _images(items: list[object], header: object) -> dict[tuple[int, int, int], np.ndarray]:
    return {
        (o.slice, o.phase, o.repetition): o.data[0, 0]
        for o in reconstruct_images(items, header)  # type: ignore[arg-type]
        if isinstance(o, ismrmrd.Image)
    }


def _nrmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@dataclass
class Outcome:
    """What a stream gave: the reports of the moved slice groups and their images' NRMSE against the
    reference repetition's (uncorrected, corrected)."""

    reports: list[MotionReport]
    nrmse: list[tuple[float, float]]


def run(header: ismrmrd.xsd.ismrmrdHeader, items: list[object], params: GadgetParams = CPU) -> Outcome:
    """Stream ``items``; check that every acquisition leaves once with its header unchanged."""
    before = _copy(items)
    out = list(MotionCorrector(header, params)(items))
    acqs_out = [o for o in out if isinstance(o, ismrmrd.Acquisition)]
    acqs_in = [o for o in items if isinstance(o, ismrmrd.Acquisition)]
    assert sorted(id(a) for a in acqs_out) == sorted(id(a) for a in acqs_in)
    heads = {id(a): b.getHead() for a, b in _pairs(items, before)}
    assert all(a.getHead() == heads[id(a)] for a in acqs_out)
    reports = [o for o in out if isinstance(o, MotionReport) and o.key.repetition > 0]
    img_b, img_a = _images(before, header), _images(out, header)
    nrmse = []
    for r in reports:
        k, k0 = (r.key.slice, r.key.phase, r.key.repetition), (r.key.slice, r.key.phase, 0)
        nrmse.append((_nrmse(img_b[k], img_b[k0]), _nrmse(img_a[k], img_a[k0])))
    return Outcome(reports, nrmse)


def _check(o: Outcome, tol_deg: float = TOL_DEG, ratio: float = 0.3) -> None:
    """Every moved slice group estimated within the tolerances, corrected, and its NRMSE reduced to below
    ``ratio`` times the uncorrected."""
    assert o.reports
    for rep, (unc, cor) in zip(o.reports, o.nrmse, strict=True):
        assert rep.corrected, rep.log_line()
        assert math.isclose(rep.dx_px, MOTION[0], abs_tol=TOL_PX), rep.log_line()
        assert math.isclose(rep.dy_px, MOTION[1], abs_tol=TOL_PX), rep.log_line()
        assert math.isclose(rep.rot_deg, MOTION[2], abs_tol=tol_deg), rep.log_line()
        assert all(math.isfinite(v) and v > 0 for v in (rep.dx_std_px, rep.dy_std_px, rep.rot_std_deg))
        assert unc > 0.2 and cor < ratio * unc, (rep.log_line(), unc, cor)


# --- acceleration, row parity, calibration ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("accel", "parity", "calibration", "ratio"),
    [
        (1, 0, "none", 0.3),  # fully sampled: coil maps from the acquired centre
        (2, 0, "integrated", 0.3),
        (2, 1, "integrated", 0.3),  # odd parity: the centre row only in the calibration block
        (3, 0, "integrated", 0.45),
        (3, 1, "integrated", 0.45),
        (2, 0, "separate", 0.3),
        (3, 0, "separate", 0.45),
    ],
    ids=["R1", "R2-even", "R2-odd", "R3-even", "R3-odd", "R2-separate", "R3-separate"],
)
def test_acceleration_parity_and_calibration(accel: int, parity: int, calibration: str, ratio: float) -> None:
    header, items = protocol(fully_sampled(), accel, parity, calibration)
    o = run(header, items)
    _check(o, ratio=ratio)
    assert o.reports[0].reason == ""


@pytest.mark.parametrize("calibration", ["integrated", "separate"])
def test_acceleration_4(calibration: str) -> None:
    """R = 4, 24 calibration lines, 8 coils: estimated (no network seed: it was trained at R = 2) and
    corrected; the rotation within ``TOL_DEG_R4``."""
    header, items = protocol(fully_sampled(), 4, 0, calibration)
    o = run(header, items)
    _check(o, tol_deg=TOL_DEG_R4, ratio=0.5)
    assert "no network seed: acceleration 4" in o.reports[0].method


@pytest.mark.parametrize("seed", [6, 7])
def test_acceleration_4_is_never_corrected_grossly_wrong(seed: int) -> None:
    """Do no harm at R = 4 on phantoms where the fit without the reference's data went 3.5-4.6 deg wrong and
    corrected (before commit a83547c): the rotation within ``GROSS_DEG`` of the truth, or not corrected."""
    header, items = protocol(fully_sampled(seed=seed), 4, 0, "integrated")
    rep = run(header, items).reports[0]
    right = abs(rep.rot_deg - MOTION[2]) < GROSS_DEG and abs(rep.dx_px - MOTION[0]) < GROSS_DEG
    assert right or not rep.corrected, rep.log_line()


def test_no_calibration_translation_only(caplog: pytest.LogCaptureFixture) -> None:
    """R = 2 without calibration lines: no coil maps, so the translation by phase correlation is tested with
    the translation-only model and only the translation is undone (reason ``translation only: ...``, once).
    The motion's 6 deg rotation, which is not modelled, puts it 0.0 / 0.37 px off: tolerance 0.5 px.  The
    stream's end raises no "nothing estimated" WARNING (the rotation is NaN, the slice was estimated)."""
    header, items = protocol(fully_sampled(), 2, 0, "none")
    with caplog.at_level("WARNING", logger="kmotion"):
        rep = run(header, items).reports[0]
    assert "no slice group was estimated" not in caplog.text
    assert rep.corrected and rep.reason.startswith("translation only: no calibration data"), rep.log_line()
    assert rep.reason.count("translation only") == 1, rep.reason
    assert abs(rep.dx_px - MOTION[0]) < 0.5 and abs(rep.dy_px - MOTION[1]) < 0.5, rep.log_line()
    assert math.isnan(rep.rot_deg)
    assert "translation test" in rep.method


# --- partial Fourier, asymmetric echo, reversed readouts ---------------------------------------------------


@pytest.mark.parametrize("fraction", [5 / 8, 6 / 8, 7 / 8], ids=["5/8", "6/8", "7/8"])
def test_partial_fourier(fraction: float) -> None:
    header, items = protocol(fully_sampled(), 2, 0, "integrated", partial_fourier=fraction)
    o = run(header, items)
    _check(o)
    assert o.reports[0].reason.startswith("partial Fourier along y")


@pytest.mark.parametrize("partial_fourier", [1.0, 6 / 8], ids=["asymmetric", "asymmetric+PF6/8"])
def test_asymmetric_echo(partial_fourier: float) -> None:
    """75 % of the (oversampled) readout acquired, ``center_sample`` 64 of 192; with and without partial
    Fourier 6/8."""
    header, items = protocol(
        fully_sampled(), 2, 0, "integrated", partial_fourier=partial_fourier, asymmetric_echo=0.75
    )
    assert {int(a.number_of_samples) for a in items if isinstance(a, ismrmrd.Acquisition)} == {192, 256}
    o = run(header, items)
    _check(o)
    assert o.reports[0].reason.startswith("asymmetric echo (readout zero filled)")


def test_reversed_readouts() -> None:
    """The moved repetition read with the reversed gradient (samples in time order, ``ACQ_IS_REVERSE``):
    estimated in the true frame and corrected (the correction written back in time order)."""
    header, items = protocol(fully_sampled(), 2, 0, "integrated", reverse_repetition=1)
    o = run(header, items)
    _check(o)


# --- cardiac phases, 3D -------------------------------------------------------------------------------------


def test_cardiac_phases() -> None:
    """Two cardiac phases (``idx.phase``) of one slice: each its own group, reference and report, both with
    the repetition's motion."""
    header, items = protocol(fully_sampled(n_slices=2), 2, 0, "integrated")
    for a in items:
        if isinstance(a, ismrmrd.Acquisition) and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            a.idx.phase, a.idx.slice = a.idx.slice, 0
            a.position[:] = [0.0, 0.0, 0.0]
    limits = header.encoding[0].encodingLimits
    limits.phase = ismrmrd.xsd.limitType(minimum=0, maximum=1, center=0)
    limits.slice = ismrmrd.xsd.limitType(minimum=0, maximum=0, center=0)
    o = run(header, items)
    assert sorted(tuple(r.key) for r in o.reports) == [(0, 0, 0, 1, 0), (0, 0, 1, 1, 0)]
    _check(o)


def _as_3d(header: ismrmrd.xsd.ismrmrdHeader, items: list[object], n_z: int, kz: bool) -> list[object]:
    """Each imaging line repeated over ``n_z`` partitions (``kspace_encode_step_2`` 0..n_z-1, ky outer), or
    with ``kz`` False every line kept with ``kspace_encode_step_2 = 0`` (a 2-D Pulseq scan converted with
    encoded z = ``n_z``)."""
    enc = header.encoding[0]
    enc.encodedSpace.matrixSize.z = n_z
    enc.reconSpace.matrixSize.z = n_z
    if not kz:
        return items
    enc.encodingLimits.kspace_encoding_step_2 = ismrmrd.xsd.limitType(
        minimum=0, maximum=n_z - 1, center=n_z // 2
    )
    out: list[object] = []
    for a in items:
        if not isinstance(a, ismrmrd.Acquisition) or a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            out.append(a)
            continue
        last = a.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE)
        for z in range(n_z):
            b = copy.deepcopy(a)
            b.idx.kspace_encode_step_2 = z
            if last and z < n_z - 1:
                b.clear_flag(ismrmrd.ACQ_LAST_IN_SLICE)
            out.append(b)
    return out


def test_3d_encoding_is_passed_through_with_its_reason() -> None:
    """A 3D slab (4 partitions): one group per repetition, not corrected, its data untouched, the reason
    ``not correctable: 3D encoding: ...``."""
    header, items = protocol(fully_sampled(), 2, 0, "integrated")
    items = _as_3d(header, items, 4, kz=True)
    before = _copy(items)
    out = list(MotionCorrector(header, CPU)(items))
    reports = [o for o in out if isinstance(o, MotionReport)]
    assert [tuple(r.key) for r in reports] == [(0, 0, 0, 0, 0), (0, 0, 0, 1, 0)]
    for r in reports:
        assert not r.corrected and r.reason.startswith("not correctable: 3D encoding: 4 of 4 partitions")
    old = {id(a): b for a, b in _pairs(items, before)}
    after = [o for o in out if isinstance(o, ismrmrd.Acquisition)]
    assert sorted(id(a) for a in after) == sorted(old)
    assert all(np.array_equal(a.data, old[id(a)].data) for a in after)


def test_encoded_z_2_with_every_partition_0_stays_2d() -> None:
    """Pulseq-style 2-D data (encoded z = 2, every ``kspace_encode_step_2 = 0``): estimated and corrected."""
    header, items = protocol(fully_sampled(), 2, 0, "integrated")
    items = _as_3d(header, items, 2, kz=False)
    _check(run(header, items))


def test_docs_protocol_table_names_existing_tests() -> None:
    """``docs/gadget.md``, "Supported protocols": every test a row names exists in ``tests/`` (parameter ids
    stripped), and the table has a row for every protocol of issue 9."""
    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "gadget.md").read_text()
    section = text.split("\n## Supported protocols\n", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| protocol")]
    sources = "\n".join(p.read_text() for p in (root / "tests").rglob("test_*.py"))
    named = {n for r in rows for n in re.findall(r"`(test_[a-z0-9_]+)", r.split(" | ")[-1])}
    assert named and [n for n in sorted(named) if f"def {n}(" not in sources] == []
    first = " ".join(r.split(" | ")[0] for r in rows)
    for protocol in (
        "R = 1",
        "R = 2",
        "R = 3",
        "R = 4",
        "odd row parity",
        "separate calibration",
        "partial Fourier",
        "asymmetric echo",
        "reversed readouts",
        "cardiac phases",
        "3D encoding",
        "no calibration",
    ):
        assert protocol in first, protocol
