"""Estimate tables (HDF5 inside the ISMRMRD group, CSV) and the stored true motion: columns, old files."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from kmotion.io.estimates import (
    CSV_COLUMNS,
    LEGACY_ESTIMATES_DATASET,
    TRUE_COLUMNS,
    estimates_path,
    read_estimates,
    read_motion_csv,
    row_from_report,
    write_estimates,
    write_motion_csv,
)
from kmotion.io.ismrmrd_writer import LEGACY_TRUTH_DATASET, TrueMotion, read_true_motion, write_true_motion
from kmotion.physics.validate import InputError


def _report(rep: int, phase: int = 0, estimated: bool = True) -> dict[str, object]:
    """A dict as ``MotionReport.as_dict()`` returns it (None where nothing was estimated)."""
    v = (lambda x: x) if estimated else (lambda x: None)
    return {
        "slice": 1,
        "contrast": 0,
        "phase": phase,
        "repetition": rep,
        "set": 0,
        "reference_repetition": 0,
        "dx_px": v(0.5 * rep),
        "dy_px": v(-0.25),
        "rot_deg": v(1.5),
        "dx_mm": v(0.86),
        "dy_mm": v(-0.43),
        "patient_x_mm": v(0.1),
        "patient_y_mm": v(0.2),
        "patient_z_mm": v(0.3),
        "dx_std_px": v(0.012),
        "dy_std_px": v(0.013),
        "rot_std_deg": v(0.021),
        "chi2": v(812.5),
        "p_value": v(3.2e-12),
        "flagged": False,
        "corrected": estimated,
        "reason": "" if estimated else "not significant",
        "method": "network+dc" if estimated else "",
    }


def test_rows_carry_every_report_field_and_round_trip_hdf5(tmp_path: Path) -> None:
    reports = [_report(1, phase=2), _report(2, phase=3, estimated=False)]
    reports[0]["new_field"] = 7  # a report key this module does not know yet is kept
    rows = [row_from_report(r) for r in reports]
    assert set(CSV_COLUMNS) <= set(rows[0]) and rows[0]["new_field"] == 7
    assert math.isnan(rows[1]["dx_std_px"]) and rows[1]["method"] == ""
    path = tmp_path / "out.h5"
    with h5py.File(path, "w") as f:
        f.create_group("dataset")
    write_estimates(path, rows, reports)
    with h5py.File(path, "r") as f:
        assert list(f.keys()) == ["dataset"]  # no second top-level group
        names = f[estimates_path()].dtype.names
    assert list(names[: len(CSV_COLUMNS)]) == CSV_COLUMNS
    back = read_estimates(path)
    assert [r["phase"] for r in back] == [2, 3]
    assert back[0]["p_value"] == pytest.approx(3.2e-12, rel=1e-12)
    assert back[0]["rot_std_deg"] == pytest.approx(0.021, rel=1e-12)
    assert back[0]["method"] == "network+dc" and back[1]["reason"] == "not significant"
    assert back[0]["new_field"] == 7
    assert math.isnan(back[1]["chi2"]) and back[1]["corrected"] is False


def test_old_estimates_location_and_columns_are_read(tmp_path: Path) -> None:
    """A file of an earlier version: top-level /kmotion group, no phase/uncertainty/method columns."""
    old_cols = [c for c in CSV_COLUMNS if c not in ("phase", "dx_std_px", "dy_std_px", "rot_std_deg")]
    old_cols = [c for c in old_cols if c not in ("chi2", "p_value", "method", "shot")]
    dtype = np.dtype(
        [(c, "<i4") for c in old_cols[:5]]
        + [(c, "<f8") for c in old_cols[5:13]]
        + [("flagged", "?"), ("corrected", "?"), ("reason", h5py.string_dtype())]
    )
    arr = np.array([(0, 0, 1, 0, 0, 0.4, -0.2, 1.0, 0.7, -0.3, 0.0, 0.0, 0.0, False, True, "")], dtype=dtype)
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset(LEGACY_ESTIMATES_DATASET, data=arr)
    (row,) = read_estimates(path)
    assert row["repetition"] == 1 and row["dx_px"] == pytest.approx(0.4) and row["corrected"] is True
    assert row["phase"] == 0 and math.isnan(row["dx_std_px"]) and row["method"] == ""
    assert row["shot"] == -1  # a whole slice group (files before per-shot estimates)
    with h5py.File(path, "w") as f:
        f.create_group("dataset")
    with pytest.raises(InputError, match="kmotion_motion_estimates"):
        read_estimates(path)


def test_csv_columns_and_old_csv(tmp_path: Path) -> None:
    rows = [row_from_report(_report(1, phase=1)), row_from_report(_report(2, estimated=False))]
    for r in rows:
        r.update(dict.fromkeys(TRUE_COLUMNS, 0.25))
    path = write_motion_csv(rows, tmp_path / "m.csv")
    with path.open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS + TRUE_COLUMNS
        table = list(reader)
    assert {"dx_std_px", "dy_std_px", "rot_std_deg", "phase"} <= set(table[0])
    assert table[0]["phase"] == "1" and table[0]["dx_std_px"] == "0.0120"
    assert float(table[0]["p_value"]) == pytest.approx(3.2e-12, rel=1e-5)  # not rounded to 0.0000
    assert table[1]["dx_std_px"] == "nan"
    back = read_motion_csv(path)
    assert back[0]["phase"] == 1 and back[0]["corrected"] is True and back[0]["true_dx_px"] == 0.25
    assert math.isnan(back[1]["rot_std_deg"])

    old = tmp_path / "old.csv"  # the columns of an earlier version
    old.write_text(
        "slice,contrast,repetition,set,reference_repetition,dx_px,dy_px,rot_deg,dx_mm,dy_mm,patient_x_mm,"
        "patient_y_mm,patient_z_mm,flagged,corrected,reason\n0,0,2,0,0,0.5,0.1,1.0,0.8,0.2,0,0,0,False,True,\n"
    )
    (row,) = read_motion_csv(old)
    assert row["repetition"] == 2 and row["dx_px"] == 0.5 and row["corrected"] is True
    assert row["phase"] == 0 and math.isnan(row["dx_std_px"]) and math.isnan(row["p_value"])


def test_true_motion_inside_the_group_and_old_location(tmp_path: Path) -> None:
    truth = [TrueMotion(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0), TrueMotion(0, 1, 1.5, -2.0, 3.0, 2.6, -3.4)]
    path = tmp_path / "t.h5"
    write_true_motion(path, truth, dataset="scan")
    with h5py.File(path, "r") as f:
        assert list(f.keys()) == ["scan"] and "kmotion_true_motion" in f["scan"]
    assert read_true_motion(path, dataset="scan") == truth
    assert read_true_motion(path) is None  # another group: none

    old = tmp_path / "old.h5"
    with h5py.File(path, "r") as src, h5py.File(old, "w") as dst:
        dst.create_dataset(LEGACY_TRUTH_DATASET, data=src["scan/kmotion_true_motion"][()])
    assert read_true_motion(old) == truth
