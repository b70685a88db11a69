"""``kmotion replay``: round trip on simulated raw data, CSV, images, estimates, bad input."""

from __future__ import annotations

import csv
import math
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import ismrmrd
import mrd
import numpy as np
import pytest

from kmotion.cli import main
from kmotion.frontends.replay import CORRECTED, UNCORRECTED, _relative_truth
from kmotion.io.estimates import CSV_COLUMNS, TRUE_COLUMNS, read_estimates, read_motion_csv
from kmotion.io.ismrmrd_reader import open_ismrmrd, read_images
from kmotion.io.ismrmrd_writer import TrueMotion, read_true_motion
from kmotion.io.mrd_v2 import Mrd2FileWriter
from kmotion.simulation.raw import RawConfig, simulate_raw, write_raw

# the network needs >= 64 acquired rows: 128 rows at R = 2
CFG = RawConfig(matrix=(128, 128), n_coils=4, n_slices=1, n_repetitions=3, waveforms=True, seed=5)


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("replay")
    raw_h5 = write_raw(simulate_raw(CFG), d / "raw.h5")
    out, csv_path = d / "out.h5", d / "motion.csv"
    rc = main(
        ["replay", str(raw_h5), str(out), "--motion-csv", str(csv_path), "--device", "cpu", "--no-progress"]
    )
    assert rc == 0
    return {"raw": raw_h5, "out": out, "csv": csv_path}


def _acqs(path: Path) -> list[ismrmrd.Acquisition]:
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False) as ds:
        return [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]


def _waves(path: Path) -> list[ismrmrd.Waveform]:
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False) as ds:
        return [ds.read_waveform(i) for i in range(ds.number_of_waveforms())]


def _counters(a: ismrmrd.Acquisition) -> tuple[int, ...]:
    i = a.idx
    return (int(a.scan_counter), int(i.slice), int(i.repetition), int(i.kspace_encode_step_1), int(a.flags))


def test_every_acquisition_and_waveform_accounted_for(replayed: dict[str, Path]) -> None:
    src, out = _acqs(replayed["raw"]), _acqs(replayed["out"])
    assert len(out) == len(src) == 1 + 3 * (64 + 12)
    assert sorted(map(_counters, out)) == sorted(map(_counters, src))
    by_counter = {a.scan_counter: a for a in out}
    n_changed = 0
    for a in src:
        b = by_counter[a.scan_counter]
        assert b.data.shape == a.data.shape and np.isfinite(b.data).all()
        if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) or a.idx.repetition == 0:
            assert np.array_equal(a.data, b.data)  # noise and the reference pass untouched
        n_changed += not np.array_equal(a.data, b.data)
    assert n_changed > 0  # the moved repetitions were corrected
    ws, wo = _waves(replayed["raw"]), _waves(replayed["out"])
    assert len(wo) == len(ws) == 3
    assert all(np.array_equal(x.data, y.data) for x, y in zip(ws, wo, strict=True))
    with h5py.File(replayed["out"], "r") as f:
        assert f["dataset/xml"][0] == h5py.File(replayed["raw"], "r")["dataset/xml"][0]


def test_images_estimates_and_csv(replayed: dict[str, Path]) -> None:
    for group in (UNCORRECTED, CORRECTED):
        imgs = read_images(replayed["out"], group)
        assert len(imgs) == 3
        assert sorted(int(im.repetition) for im in imgs) == [0, 1, 2]
        assert all(im.data.shape[-2:] == (128, 128) and np.isfinite(im.data).all() for im in imgs)
    rows = read_estimates(replayed["out"])
    assert [r["repetition"] for r in rows] == [0, 1, 2]
    assert read_true_motion(replayed["out"]) == read_true_motion(replayed["raw"])
    with replayed["csv"].open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS + TRUE_COLUMNS
        table = list(reader)
    assert len(table) == 3
    for r in table[1:]:
        assert r["reference_repetition"] == "0" and r["corrected"] == "True"
        assert abs(float(r["dx_px"]) - float(r["true_dx_px"])) < 1.5
        assert abs(float(r["dy_px"]) - float(r["true_dy_px"])) < 1.5
        assert abs(float(r["rot_deg"]) - float(r["true_rot_deg"])) < 2.0
        assert math.isclose(float(r["dx_mm"]), float(r["dx_px"]) * 220 / 128, rel_tol=1e-3, abs_tol=1e-3)


def test_relative_truth_composes_rigid_motions() -> None:
    """Truth relative to a reference other than repetition 0: T_rep o T_ref^-1."""
    spacing = (0.5, 1.0)
    ref = TrueMotion(0, 1, 2.0, -4.0, 30.0, 2.0, -2.0)
    rep = TrueMotion(0, 2, -1.0, 6.0, -15.0, -1.0, 3.0)
    dx_px, dy_px, phi, dx_mm, dy_mm = _relative_truth(rep, ref, spacing)
    assert phi == pytest.approx(-45.0)
    # T_rel(T_ref(p)) == T_rep(p) for a point p in mm
    p = np.array([7.0, -3.0])

    def rot(deg: float) -> np.ndarray:
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        return np.array([[c, -s], [s, c]])

    via_ref = rot(phi) @ (rot(ref.phi_deg) @ p + [ref.dx_mm, ref.dy_mm]) + [dx_mm, dy_mm]
    np.testing.assert_allclose(via_ref, rot(rep.phi_deg) @ p + [rep.dx_mm, rep.dy_mm], atol=1e-12)
    assert (dx_px, dy_px) == pytest.approx((dx_mm / 1.0, dy_mm / 0.5))


def test_bad_input_exit_2_with_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out.h5")
    notes = tmp_path / "notes.h5"
    notes.write_text("not hdf5")
    assert main(["replay", str(notes), out]) == 2
    err = capsys.readouterr().err
    assert "notes.h5" in err and "not HDF5" in err and "Traceback" not in err

    assert main(["replay", str(tmp_path / "missing.h5"), out]) == 2
    assert "missing.h5" in capsys.readouterr().err

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_group("something")
    assert main(["replay", str(other), out]) == 2
    err = capsys.readouterr().err
    assert "other.h5" in err and "'dataset'" in err
    assert not Path(out).exists()  # (an unusable header is no bad file: test_headers_and_passthrough)

    raw = write_raw(simulate_raw(RawConfig(matrix=(32, 32), n_coils=2, n_slices=1, n_repetitions=1)), out)
    assert main(["replay", str(raw), str(raw)]) == 2
    assert "differ" in capsys.readouterr().err
    assert main(["replay", str(raw), str(tmp_path / "o2.h5"), "--device", "tpu"]) == 2
    assert "device" in capsys.readouterr().err
    bad_model = tmp_path / "bad.safetensors"
    bad_model.write_text("garbage")
    for model in (bad_model, tmp_path / "absent.safetensors"):
        assert (
            main(["replay", str(raw), str(tmp_path / "o3.h5"), "--model", str(model), "--no-progress"]) == 2
        )
        assert model.name in capsys.readouterr().err
        assert not (tmp_path / "o3.h5").exists()  # no partial output


def test_open_ismrmrd_merges_waveforms_by_time(tmp_path: Path) -> None:
    raw = simulate_raw(RawConfig(matrix=(32, 32), n_coils=2, n_slices=2, n_repetitions=2, waveforms=True))
    src = open_ismrmrd(write_raw(raw, tmp_path / "w.h5"))
    items = list(src.items())
    assert len(items) == len(raw.items)
    kinds = [type(i).__name__ for i in items]
    assert kinds == [type(i).__name__ for i in raw.items]  # waveforms where they were streamed


# ---- the output as the ecosystem opens it -----------------------------------------------------------------


def _last_group_like_mrpro(path: Path) -> tuple[str, int]:
    """What mrpro's ``KData.from_file(dataset_idx=-1)`` opens: ``ismrmrd.File``, ``list(keys())[-1]``.

    Returns the group's name and its number of acquisitions (0 when it holds none).
    """
    with ismrmrd.File(str(path), "r") as f:
        name = list(f.keys())[-1]
        acqs = f[name].acquisitions
        return name, 0 if acqs is None else len(acqs)


def test_readers_that_take_the_last_group_open_the_raw_data(
    replayed: dict[str, Path], tmp_path: Path
) -> None:
    n_in = open_ismrmrd(replayed["raw"]).n_acquisitions
    for path in (replayed["raw"], replayed["out"]):  # simulate-raw's truth and replay's estimates alike
        with h5py.File(path, "r") as f:
            assert list(f.keys()) == ["dataset"]  # one top-level group: "last", "first" and "only" agree
            assert sorted(f.keys())[-1] == "dataset"
        assert _last_group_like_mrpro(path) == ("dataset", n_in)
    with ismrmrd.File(str(replayed["out"]), "r") as f:  # ismrmrd.File's default access of the group
        ds = f["dataset"]
        assert ds.header.encoding[0].encodedSpace.matrixSize.y == 128
        assert len(ds.acquisitions) == n_in and ds.waveforms is not None and len(ds.waveforms) == 3
        assert "kmotion_motion_estimates" not in list(ds)  # sub-groups only: our tables are not listed
        assert f.find_images() == {f"dataset/{UNCORRECTED}", f"dataset/{CORRECTED}"}

    # the layout of earlier versions (a top-level /kmotion group) misleads such readers; still read by us
    old = tmp_path / "old_layout.h5"
    old.write_bytes(replayed["out"].read_bytes())
    with h5py.File(old, "a") as f:
        f.move("dataset/kmotion_motion_estimates", "kmotion/motion_estimates")
        f.move("dataset/kmotion_true_motion", "kmotion/true_motion")
    assert _last_group_like_mrpro(old) == ("kmotion", 0)
    assert repr(read_estimates(old)) == repr(read_estimates(replayed["out"]))  # repr: NaN == NaN
    assert read_true_motion(old) == read_true_motion(replayed["out"])


_CPP_TOOLS = (
    "ismrmrd_generate_cartesian_shepp_logan",
    "ismrmrd_recon_cartesian_2d",
    "ismrmrd_read_timing_test",
    "ismrmrd_test_xml",
)
needs_cpp_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in _CPP_TOOLS),
    reason="ISMRMRD C++ tools absent (Debian: apt-get install ismrmrd-tools; .ci/run installs them)",
)


def _cpp(*args: str, cwd: Path | None = None) -> str:
    """Run an ISMRMRD C++ tool (in ``cwd``: some write files there); its stdout (a failure shows the tool's
    stderr)."""
    r = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, cwd=cwd)
    assert r.returncode == 0, f"{args[0]} exit {r.returncode}: {r.stderr[-2000:]}"
    return r.stdout


def _cpp_reads(path: Path, tmp_path: Path) -> None:
    """The ISMRMRD C++ library reads every acquisition of ``path`` and reconstructs it (on a copy)."""
    copy = tmp_path / f"cpp_{path.name}"
    copy.write_bytes(path.read_bytes())
    n = open_ismrmrd(path).n_acquisitions
    _cpp("ismrmrd_read_timing_test", str(copy))
    out = _cpp("ismrmrd_recon_cartesian_2d", str(copy))
    assert re.search(rf"Number of acquisitions\s*:\s*{n}\b", out), out
    (img,) = read_images(copy, "cpp")  # the C++ recon's image, written into the same group
    enc = open_ismrmrd(path).header.encoding[0].reconSpace.matrixSize
    assert img.data.shape[-2:] == (enc.y, enc.x) and np.isfinite(img.data).all() and img.data.max() > 0


@needs_cpp_tools
def test_cpp_ismrmrd_tools_read_the_replay_output(replayed: dict[str, Path], tmp_path: Path) -> None:
    _cpp_reads(replayed["out"], tmp_path)
    # the C++ library's XML parser accepts the header we write
    xml = tmp_path / "header.xml"
    with h5py.File(replayed["out"], "r") as f:
        xml.write_bytes(f["dataset/xml"][0])
    _cpp("ismrmrd_test_xml", str(xml), cwd=tmp_path)  # it writes raw.xml / processed.xml where it runs


@needs_cpp_tools
def test_shepp_logan_of_the_cpp_tool_through_replay(tmp_path: Path) -> None:
    """An input written by the ISMRMRD project's own generator (a noise line, then 4 repetitions of R = 2
    interleaved between repetitions, 16 calibration lines): every acquisition comes out and the output stays
    readable by the C++ library."""
    raw = tmp_path / "shepp_logan.h5"
    _cpp(
        "ismrmrd_generate_cartesian_shepp_logan",
        *("-m", "128", "-c", "4", "-r", "2", "-a", "2", "-w", "16", "-C", "-o", str(raw)),
    )
    out, csv_path = tmp_path / "out.h5", tmp_path / "m.csv"
    args = ["replay", str(raw), str(out), "--motion-csv", str(csv_path), "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    src, dst = _acqs(raw), _acqs(out)
    assert len(src) == 1 + 4 * (128 // 2 + 16 // 2) and len(dst) == len(src)
    assert sorted(map(_counters, dst)) == sorted(map(_counters, src))  # the same lines
    assert all(b.data.shape == (4, 256) and np.isfinite(b.data).all() for b in dst)
    noise = [a for a in dst if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    assert len(noise) == 1 and np.array_equal(noise[0].data, src[0].data)  # passed through untouched
    rows = read_estimates(out)
    assert sorted(r["repetition"] for r in rows) == [0, 1, 2, 3] and all(r["phase"] == 0 for r in rows)
    assert len(read_motion_csv(csv_path)) == len(rows)
    assert _last_group_like_mrpro(out) == ("dataset", len(src))
    _cpp_reads(out, tmp_path)


# ---- MRD v2 files ---------------------------------------------------------------------------------------


def _v2_read(path: Path) -> tuple[mrd.Header, list[mrd.StreamItem]]:
    with mrd.BinaryMrdReader(str(path)) as r:
        return r.read_header(), list(r.read_data())


def test_replay_mrd2_in_and_out(replayed: dict[str, Path], tmp_path: Path) -> None:
    """The simulated acquisition as an MRD v2 file: replay detects it, writes MRD v2 (every acquisition and
    waveform, headers as read, the same corrected data as the .h5 replay, images with the estimates in their
    meta), the truth comes from the header; --format mrd1 writes the .h5 instead, and .h5 -> --format mrd2."""
    src = open_ismrmrd(replayed["raw"])
    v2_in = tmp_path / "raw.mrd"
    with Mrd2FileWriter(v2_in, src.xml, None) as w:
        for item in src.items():
            w.append(item)
    out, csv_path = tmp_path / "out.mrd", tmp_path / "m.csv"
    args = ["replay", str(v2_in), str(out), "--motion-csv", str(csv_path), "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    h_in, items_in = _v2_read(v2_in)
    h_out, items_out = _v2_read(out)
    assert h_out == h_in
    acqs = [i.value for i in items_out if isinstance(i, mrd.StreamItem.Acquisition)]
    waves = [i.value for i in items_out if isinstance(i, mrd.StreamItem.WaveformUint32)]
    images = [i.value for i in items_out if isinstance(i, mrd.StreamItem.ImageFloat)]
    assert len(acqs) == src.n_acquisitions and len(waves) == 3 and len(images) == 6
    h5_out = _acqs(replayed["out"])  # the .h5 replay of the same data: the same corrected data
    by_counter = {int(a.scan_counter): a for a in h5_out}
    in_acqs = [i.value for i in items_in if isinstance(i, mrd.StreamItem.Acquisition)]
    inputs = {a.head.scan_counter: a for a in in_acqs}
    for b in acqs:
        assert b.head == inputs[b.head.scan_counter].head
        np.testing.assert_array_equal(b.data, by_counter[b.head.scan_counter].data)
    corrected = [im for im in images if im.head.image_series_index == 2]
    assert sorted(im.head.repetition for im in corrected) == [0, 1, 2]
    assert all("kmotion_dx_px" in im.meta for im in corrected)
    rows = read_motion_csv(csv_path)
    assert [r["repetition"] for r in rows] == [0, 1, 2] and "true_dx_px" in rows[0]  # truth from the header

    h5 = tmp_path / "out.h5"
    assert main(["replay", str(v2_in), str(h5), "--format", "mrd1", "--device", "cpu", "--no-progress"]) == 0
    assert _last_group_like_mrpro(h5) == ("dataset", src.n_acquisitions)
    assert [r["repetition"] for r in read_estimates(h5)] == [0, 1, 2]
    v2_out = tmp_path / "from_h5.mrd"
    args = ["replay", str(replayed["raw"]), str(v2_out), "--format", "mrd2", "--device", "cpu"]
    assert main([*args, "--no-progress"]) == 0
    _, items = _v2_read(v2_out)
    assert sum(isinstance(i, mrd.StreamItem.Acquisition) for i in items) == src.n_acquisitions


def test_replay_bad_mrd2_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "cut.mrd"
    bad.write_bytes(b"yardl" + bytes(40))
    assert main(["replay", str(bad), str(tmp_path / "o.mrd")]) == 2
    err = capsys.readouterr().err
    assert "cut.mrd" in err and "MRD v2" in err and "Traceback" not in err
    assert not (tmp_path / "o.mrd").exists()


def test_replay_motion_model_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--motion-model``: with a motion-free reference repetition ``auto`` registers the whole repetition
    (one row per slice); ``shot`` gives one pose per echo train (CSV ``shot`` 0..n-1 after the slice's
    summary row -1); a wrong value is refused by the parser (exit 2)."""
    raw = tmp_path / "intra.h5"
    sim = ["simulate-raw", str(raw), "--intra-scan", "--matrix", "64", "64", "--coils", "4", "--slices", "1"]
    assert main([*sim, "--etl", "8", "--ordering", "interleaved", "--reference-repetitions", "1"]) == 0
    shots_per_slice = []
    for model in ("auto", "shot"):
        csv_path = tmp_path / f"{model}.csv"
        out = str(tmp_path / f"{model}.h5")
        opts = ["--motion-model", model, "--no-progress", "--motion-csv", str(csv_path)]
        rc = main(["replay", str(raw), out, *opts])
        assert rc == 0
        with csv_path.open() as f:
            rows = [r for r in csv.DictReader(f) if r["repetition"] == "1"]
        shots_per_slice.append(sorted(int(r["shot"]) for r in rows))
    assert shots_per_slice[0] == [-1]
    assert shots_per_slice[1][0] == -1 and shots_per_slice[1][1:] == list(range(len(shots_per_slice[1]) - 1))
    assert len(shots_per_slice[1]) > 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["replay", str(raw), str(tmp_path / "x.h5"), "--motion-model", "train"])
    assert exc.value.code == 2
