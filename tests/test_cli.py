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
