"""``kmotion demo --intra-scan`` (issue 10, item 7): a small multi-shot TSE with motion between echo trains
through the gadget's shot motion model; files, summary keys and the printed lines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kmotion.cli import main
from kmotion.io.estimates import read_motion_csv

KEYS = {
    "title",
    "reference",
    "ordering",
    "pattern",
    "n_shots",
    "centre_shot",
    "n_shots_corrected",
    "mae_dx_mm",
    "mae_dy_mm",
    "mae_rot_deg",
    "max_error_corrected_mm",
    "max_error_corrected_deg",
    "nrmse_uncorrected",
    "nrmse_corrected",
    "per_slice",
    "replay_seconds",
    "total_seconds",
}


def test_intra_scan_demo_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """96^2, 4 coils, ETL 8 (8 shots), checkered, steps, SNR 30, a motion-free reference repetition."""
    args = ["demo", "--intra-scan", "--matrix", "96", "96", "--coils", "4", "--etl", "8"]
    assert main([*args, "--out", str(tmp_path), "--no-progress"]) == 0
    for name in ("motion_report.png", "motion.csv", "summary.json", "raw.h5", "replayed.h5"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "motion_report.png").stat().st_size > 20_000
    s = json.loads((tmp_path / "summary.json").read_text())
    assert set(s) == KEYS
    setting = (s["reference"], s["ordering"], s["pattern"], s["n_shots"])
    assert setting == ("repetition", "checkered", "steps", 8)
    assert 0 < s["n_shots_corrected"] <= s["n_shots"]
    assert all(math.isfinite(s[k]) for k in ("mae_dx_mm", "mae_dy_mm", "mae_rot_deg"))
    assert s["nrmse_corrected"] < 0.5 * s["nrmse_uncorrected"], s
    rows = read_motion_csv(tmp_path / "motion.csv")
    moved = [r for r in rows if r["repetition"] == 1]
    assert sorted(r["shot"] for r in moved) == [-1, *range(8)]  # the summary and one row per shot
    assert sum(r["corrected"] for r in moved if r["shot"] >= 0) == s["n_shots_corrected"]
    assert all(math.isfinite(r["true_dx_mm"]) for r in moved if r["shot"] >= 0)
    out = capsys.readouterr().out
    assert "per-shot estimates vs true motion (8 shots" in out and "NRMSE vs the motion-free image" in out
