from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kmotion.cli import main


def test_demo_writes_picture_and_pairs(tmp_path: Path) -> None:
    rc = main(
        [
            "demo",
            "--pairs",
            "--matrix",
            "96",
            "96",
            "--crop",
            "16",
            "16",
            "--out",
            str(tmp_path),
            "--n-show",
            "2",
        ]
    )
    assert rc == 0
    png = tmp_path / "training_pairs.png"
    assert png.stat().st_size > 10_000
    data = np.load(tmp_path / "pairs.npz")
    assert data["inputs"].shape == (256, 4, 16, 16)
    assert np.abs(data["targets"][:, [2, 3, 4]]).max() == 0


def test_simulate_multicoil_noise(tmp_path: Path) -> None:
    out = tmp_path / "p.npz"
    rc = main(
        [
            "simulate",
            "--matrix",
            "64",
            "60",
            "--crop",
            "8",
            "12",
            "--coils",
            "3",
            "--snr",
            "20",
            "--n-pairs",
            "20",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = np.load(out)
    assert data["inputs"].shape == (20, 12, 8, 12)
    assert np.isfinite(data["inputs"]).all()


def test_bad_file_gives_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "notes.h5"
    bad.write_text("not hdf5")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "notes.h5" in err and "error" in err
    assert main(["inspect", str(tmp_path / "missing.h5")]) == 2


def test_bad_config_gives_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--matrix", "64", "64", "--crop", "80", "8", "--out", "x.npz"]) == 2
    assert "s_y_crop" in capsys.readouterr().err


def test_simulate_from_twix_raw_data(tmp_path: Path) -> None:
    from _helpers import SHARED_DIR

    twix = SHARED_DIR / "data" / "siemens_twix_gre_phantom.dat"
    if not twix.exists():
        pytest.skip("../shared/data not present")
    out = tmp_path / "raw.npz"
    rc = main(
        [
            "simulate",
            "--raw",
            str(twix),
            "--matrix",
            "192",
            "192",
            "--crop",
            "16",
            "32",
            "--n-pairs",
            "8",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = np.load(out)
    assert data["inputs"].shape == (8, 8, 16, 32)  # 2 coils x 4 channels
    assert '"fov_mm": [200.0, 200.0]' in str(data["config"])


def test_simulate_raw_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kmotion.io.ismrmrd_h5 import load_ismrmrd_h5
    from kmotion.io.ismrmrd_writer import read_true_motion

    out = tmp_path / "raw.h5"
    args = ["simulate-raw", str(out), "--matrix", "64", "48", "--coils", "2", "--slices", "1"]
    assert main([*args, "--repetitions", "3", "--no-calibration", "--no-oversampling"]) == 0
    text = capsys.readouterr().out
    assert "repetition,dx_px,dy_px,phi_deg,dx_mm,dy_mm" in text and text.count("\n") >= 5
    truth = read_true_motion(out)
    assert truth is not None and [t.repetition for t in truth] == [0, 1, 2]
    assert f"{truth[1].dx_px:.3f}" in text
    with pytest.raises(Exception, match="missing lines"):  # under-sampled: not a fully sampled file
        load_ismrmrd_h5(out)


def test_stream_demo_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    args = ["demo", "--out", str(tmp_path), "--matrix", "128", "128", "--coils", "4", "--slices", "1"]
    assert main([*args, "--repetitions", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "MAE dx" in out and "NRMSE" in out
    assert (tmp_path / "motion_report.png").stat().st_size > 20_000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_moved_slices"] == 2
    assert summary["nrmse_corrected"] < summary["nrmse_uncorrected"]
    assert summary["mae_dx_px"] < 1.5 and summary["mae_rot_deg"] < 2.0
    header = (tmp_path / "motion.csv").read_text().splitlines()[0]
    assert header.startswith(
        "slice,contrast,phase,repetition,set,shot,reference_repetition,dx_px,dy_px,rot_deg,dx_std_px,dy_std_px,"
        "rot_std_deg,dx_mm,dy_mm"
    )


def test_twix_demo_without_data_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--twix", str(tmp_path / "absent.dat"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "absent.dat" in err and "not found" in err


def test_twix_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from _helpers import SHARED_DIR

    twix = SHARED_DIR / "data" / "siemens_twix_gre_phantom.dat"
    if not twix.exists():
        pytest.skip("../shared/data not present")
    assert (
        main(["demo", "--twix", str(twix), "--repetitions", "3", "--out", str(tmp_path), "--no-progress"])
        == 0
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_moved_slices"] == 2
    assert summary["nrmse_corrected"] < 0.5 * summary["nrmse_uncorrected"]
    assert summary["mae_dx_px"] < 1.0 and summary["mae_rot_deg"] < 1.5
    assert (tmp_path / "motion_report.png").exists()
