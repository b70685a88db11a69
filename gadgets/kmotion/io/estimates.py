"""kmotion's motion-estimate tables: the HDF5 dataset ``/kmotion/motion_estimates`` and the CSV.

One row per estimated (slice, contrast, repetition, set), columns :data:`CSV_COLUMNS`: ``slice, contrast,
repetition, set, reference_repetition, dx_px, dy_px, rot_deg, dx_mm, dy_mm, patient_x_mm, patient_y_mm,
patient_z_mm, flagged, corrected, reason`` and, when the true motion is known, :data:`TRUE_COLUMNS`
(``true_dx_px, true_dy_px, true_rot_deg, true_dx_mm, true_dy_mm``).  :func:`write_estimates` stores the rows
in an HDF5 file (``kmotion replay`` output), :func:`read_estimates` reads them back, :func:`write_motion_csv`
writes them as CSV.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from kmotion.physics.validate import InputError

__all__ = [
    "CSV_COLUMNS",
    "ESTIMATES_DATASET",
    "TRUE_COLUMNS",
    "read_estimates",
    "write_estimates",
    "write_motion_csv",
]

ESTIMATES_DATASET = "kmotion/motion_estimates"
"""HDF5 path of the estimates (outside the ISMRMRD group) written by :func:`write_estimates`."""

CSV_COLUMNS = [
    "slice",
    "contrast",
    "repetition",
    "set",
    "reference_repetition",
    "dx_px",
    "dy_px",
    "rot_deg",
    "dx_mm",
    "dy_mm",
    "patient_x_mm",
    "patient_y_mm",
    "patient_z_mm",
    "flagged",
    "corrected",
    "reason",
]
TRUE_COLUMNS = ["true_dx_px", "true_dy_px", "true_rot_deg", "true_dx_mm", "true_dy_mm"]


def write_motion_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write estimate rows as CSV (columns ``CSV_COLUMNS`` [+ ``TRUE_COLUMNS``])."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    cols = CSV_COLUMNS + (TRUE_COLUMNS if rows and "true_dx_px" in rows[0] else [])
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    return p


_EST_DTYPE = np.dtype(
    [(c, "<i4") for c in CSV_COLUMNS[:5]]
    + [(c, "<f8") for c in CSV_COLUMNS[5:13]]
    + [("flagged", "?"), ("corrected", "?"), ("reason", h5py.string_dtype())]
)


def write_estimates(
    path: str | Path, rows: Sequence[dict[str, Any]], reports: Sequence[Mapping[str, Any]]
) -> None:
    """Store estimate ``rows`` as the structured dataset ``/kmotion/motion_estimates`` (replacing it).

    Its attribute ``json`` holds ``reports`` (``MotionReport.as_dict()`` of every report; non-finite numbers
    become null).
    """
    arr = np.array([tuple(r[c] for c in _EST_DTYPE.names or ()) for r in rows], dtype=_EST_DTYPE)
    with h5py.File(path, "a") as f:
        if ESTIMATES_DATASET in f:
            del f[ESTIMATES_DATASET]
        d = f.create_dataset(ESTIMATES_DATASET, data=arr, maxshape=(None,))
        d.attrs["json"] = json.dumps([_jsonable(r) for r in reports])
        d.attrs["description"] = (
            "kmotion motion estimates per (slice, contrast, repetition, set) relative to "
            "reference_repetition: "
            "dx/dy in pixels of the recon grid and mm, rot in degrees, patient-frame translation in mm"
        )


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def read_estimates(path: str | Path) -> list[dict[str, Any]]:
    """The ``/kmotion/motion_estimates`` rows of a replay output file."""
    with h5py.File(path, "r") as f:
        if ESTIMATES_DATASET not in f:
            raise InputError(
                f"{path}: '{ESTIMATES_DATASET}': expected the estimates of kmotion replay, got none"
            )
        arr = f[ESTIMATES_DATASET][()]
    rows = []
    for a in arr:
        row = {n: (a[n].decode() if isinstance(a[n], bytes) else a[n].item()) for n in arr.dtype.names}
        rows.append(row)
    return rows
