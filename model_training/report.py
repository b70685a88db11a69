"""Table 2-style report of a hyper-parameter search: ``table2.md`` and ``table2.csv``.

    python -m model_training.report --storage sqlite:///runs/search/study.db --study-name table1 \\
        --out runs/search

One row per finished (complete or pruned) trial: its configuration, the minimum validation MAE of dx, dy
(px) and phi (deg) and their mean over the epochs, the epochs to convergence (first epoch with mean
in-plane MAE < 2, else "–") and whether it converged (minimum mean in-plane MAE <= 6), sorted by the mean
in-plane MAE.  In the Markdown table a line separates the converged runs from those that did not converge,
as in the abstract's Table 2.  Definitions: :mod:`model_training.metrics`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from model_training.metrics import CONVERGED_BELOW, NOT_CONVERGED_ABOVE, convergence

DASH = "–"
COLUMNS: tuple[tuple[str, str], ...] = (
    ("trial", "trial"),
    ("state", "state"),
    ("s_y_crop", "s_y,crop"),
    ("s_x_crop", "s_x,crop"),
    ("kernel_size", "k"),
    ("n_conv", "N_conv"),
    ("n_fully", "N_fully"),
    ("downsampling", "down-sampling"),
    ("init", "init"),
    ("loss", "loss"),
    ("standardise", "standardisation"),
    ("batch_norm", "batch norm"),
    ("lr", "lr"),
    ("batch_size", "batch"),
    ("mae_dx_px", "MAE dx [px]"),
    ("mae_dy_px", "MAE dy [px]"),
    ("mae_phi_deg", "MAE phi [deg]"),
    ("mean_inplane_mae", "mean in-plane MAE"),
    ("epochs_to_convergence", "epochs to convergence"),
    ("converged", "converged"),
    ("epochs", "epochs run"),
    ("note", "note"),
)
"""``(key, Markdown header)`` of every column; the CSV uses the keys as its header."""


def trial_settings(trial: FrozenTrial) -> dict[str, Any]:
    """Searched settings of ``trial``: from its ``config`` user attr (a TrainConfig) or its params."""
    text = trial.user_attrs.get("config")
    if text:
        cfg = json.loads(text)
        study, net = cfg["study"], cfg["net"]
        return {
            "s_y_crop": study["crop"][0],
            "s_x_crop": study["crop"][1],
            "kernel_size": net["kernel_size"],
            "n_conv": net["n_conv"],
            "n_fully": net["n_fully"],
            "downsample": net["downsample"],
            "downsample_factor": net["downsample_factor"],
            "init": net["init"],
            "init_bound": net.get("init_bound", 0.075),
            "loss": cfg["loss"],
            "standardise": study["standardise"],
            "batch_norm": net["batch_norm"],
            "lr": cfg["lr"],
            "batch_size": cfg["batch_size"],
        }
    p = trial.params
    keys = ("s_y_crop", "s_x_crop", "kernel_size", "n_conv", "n_fully", "downsample", "downsample_factor")
    out: dict[str, Any] = {k: p.get(k) for k in keys}
    out.update({k: p.get(k) for k in ("init", "loss", "standardise", "batch_norm", "lr", "batch_size")})
    out["init_bound"] = 0.075
    return out


def _finite(h: dict[str, float]) -> bool:
    keys = ("mean_inplane_mae", "mae_dx_px", "mae_dy_px", "mae_phi_deg")
    return all(k in h and math.isfinite(float(h[k])) for k in keys)


def trial_row(trial: FrozenTrial) -> dict[str, Any]:
    """One report row (see :data:`COLUMNS`); MAEs are None where no epoch gave finite metrics."""
    s = trial_settings(trial)
    history: list[dict[str, float]] = json.loads(trial.user_attrs.get("history", "[]"))
    finite = [h for h in history if _finite(h)]
    conv = convergence(finite)
    notes = []
    if "invalid" in trial.user_attrs:
        notes.append(f"invalid: {trial.user_attrs['invalid']}")
    if "diverged" in trial.user_attrs:
        notes.append(f"diverged ({trial.user_attrs['diverged']})")
    if trial.state == TrialState.PRUNED and "invalid" not in trial.user_attrs:
        notes.append(f"pruned after epoch {len(history)}")
    retried = trial.system_attrs.get("failed_trial")
    if retried is not None:
        resumed = trial.user_attrs.get("resumed_after_epoch")
        notes.append(f"retry of #{retried}" + (f", resumed after epoch {resumed}" if resumed else ""))

    def num(key: str) -> float | None:
        v = conv.get(key)
        return float(v) if isinstance(v, int | float) and math.isfinite(v) else None

    init = s["init"]
    if init == "uniform":
        init = f"uniform ±{s['init_bound']:g}"
    return {
        "trial": trial.number,
        "state": trial.state.name.lower(),
        "s_y_crop": s["s_y_crop"],
        "s_x_crop": s["s_x_crop"],
        "kernel_size": s["kernel_size"],
        "n_conv": s["n_conv"],
        "n_fully": s["n_fully"],
        "downsampling": f"{s['downsample']} {s['downsample_factor']}",
        "init": init,
        "loss": s["loss"],
        "standardise": _yes_no(s["standardise"]),
        "batch_norm": _yes_no(s["batch_norm"]),
        "lr": s["lr"],
        "batch_size": s["batch_size"],
        "mae_dx_px": num("min_mae_dx_px"),
        "mae_dy_px": num("min_mae_dy_px"),
        "mae_phi_deg": num("min_mae_phi_deg"),
        "mean_inplane_mae": num("min_mean_inplane_mae"),
        "epochs_to_convergence": conv["epochs_to_convergence"],
        "converged": bool(conv["converged"]),
        "epochs": len(history),
        "note": "; ".join(notes),
    }


def _yes_no(v: Any) -> str:
    return DASH if v is None else ("yes" if v else "no")


def table_rows(trials: Iterable[FrozenTrial]) -> list[dict[str, Any]]:
    """Rows of the finished (complete or pruned) trials, sorted by mean in-plane MAE (missing last)."""
    rows = [trial_row(t) for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    rows.sort(key=lambda r: (r["mean_inplane_mae"] is None, r["mean_inplane_mae"] or 0.0, r["trial"]))
    return rows


def _cell(key: str, v: Any) -> str:
    if v is None or v == "":
        return DASH if key != "note" else ""
    if key == "converged":
        return "yes" if v else "no"
    if key == "lr":
        return f"{v:.2g}"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v).replace("|", "\\|")


def to_markdown(rows: Sequence[dict[str, Any]], preamble: str = "", postamble: str = "") -> str:
    """Markdown table; a bold row marks where the not-converged runs (min mean in-plane MAE > 6) begin."""
    lines = [preamble.rstrip() + "\n"] if preamble else []
    lines.append("| " + " | ".join(h for _, h in COLUMNS) + " |")
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    line_drawn = False
    for r in rows:
        if not r["converged"] and not line_drawn:
            label = f"**not converged below this line (min. mean in-plane MAE > {NOT_CONVERGED_ABOVE:g})**"
            lines.append("| " + " | ".join([label] + [""] * (len(COLUMNS) - 1)) + " |")
            line_drawn = True
        lines.append("| " + " | ".join(_cell(k, r[k]) for k, _ in COLUMNS) + " |")
    if postamble:
        lines += ["", postamble.rstrip()]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV text (header = column keys; empty cells where a value is missing)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([k for k, _ in COLUMNS])
    for r in rows:
        w.writerow(
            [
                "" if r[k] is None else ("yes" if r[k] else "no") if k == "converged" else r[k]
                for k, _ in COLUMNS
            ]
        )
    return buf.getvalue()


def _failed_lines(trials: Sequence[FrozenTrial]) -> list[str]:
    retried_by = {
        t.system_attrs["failed_trial"]: t.number for t in trials if "failed_trial" in t.system_attrs
    }
    for t in trials:  # a retry of a retry points to the first failure; map every failed link
        for n in t.system_attrs.get("retry_history", []):
            retried_by.setdefault(n, t.number)
    out = []
    for t in trials:
        if t.state != TrialState.FAIL:
            continue
        if "abandoned" in t.user_attrs:
            why = "abandoned (the study already had enough trials)"
        elif t.number in retried_by:
            why = f"worker died (no heartbeat); retried as #{retried_by[t.number]}"
        else:
            why = "failed (error, or a worker died and the retry limit was reached; see the worker's log)"
        out.append(f"- #{t.number}: {why}")
    return out


def preamble(study: optuna.Study) -> str:
    """Title, fixed settings, trial counts and the metric definitions."""
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(1 for t in trials if t.state == s) for s in TrialState}
    fixed = study.user_attrs.get("fixed")
    lines = [f"# Hyper-parameter search `{study.study_name}` (Table 2 style)", ""]
    if fixed:
        f = json.loads(fixed)
        rx, ry, rphi = f["motion_range"]
        lines.append(
            f"Fixed: matrix {f['matrix'][0]}×{f['matrix'][1]}, FOV {f['fov_mm'][0]:g}×{f['fov_mm'][1]:g} mm, "
            f"motion ±{rx:g} px / ±{ry:g} px / ±{rphi:g}°, "
            f"{f['n_coils']} coil(s), SNR {f['snr'] if f['snr'] is not None else '∞'}, "
            f"{f['n_train']} training / {f['n_val']} validation pairs, {f['epochs']} epochs, "
            f"space `{f['space']}`."
        )
        lines.append("")
    lines.append(
        f"Trials: {counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
        f"{counts[TrialState.FAIL]} failed, {counts[TrialState.RUNNING]} running, "
        f"{counts[TrialState.WAITING]} waiting."
    )
    lines.append("")
    lines.append(
        "MAEs are the minimum over the epochs of the validation mean absolute error (dx, dy in px, phi in "
        "degrees; mean in-plane MAE = their mean). Epochs to convergence: first epoch with mean in-plane "
        f"MAE < {CONVERGED_BELOW:g}; converged: minimum mean in-plane MAE <= {NOT_CONVERGED_ABOVE:g}."
    )
    return "\n".join(lines) + "\n"


def failed_section(study: optuna.Study) -> str:
    """Markdown list of the failed trials and why (empty when there are none)."""
    failed = _failed_lines(study.get_trials(deepcopy=False))
    return "\n".join(["Failed trials (not in the table):", *failed]) + "\n" if failed else ""


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_report(study: optuna.Study, out_dir: str | Path) -> dict[str, Path]:
    """Write ``table2.md`` and ``table2.csv`` of ``study`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(study.get_trials(deepcopy=False))
    paths = {"markdown": out / "table2.md", "csv": out / "table2.csv"}
    _write(paths["markdown"], to_markdown(rows, preamble(study), failed_section(study)))
    _write(paths["csv"], to_csv(rows))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m model_training.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--storage", required=True, help="RDB URL of the study, e.g. sqlite:///runs/search/study.db"
    )
    p.add_argument("--study-name", required=True)
    p.add_argument("--out", required=True, help="folder for table2.md and table2.csv")
    args = p.parse_args(argv)
    try:
        study = optuna.load_study(study_name=args.study_name, storage=args.storage)
    except KeyError as exc:
        print(f"model_training.report: error: {exc}")
        return 2
    paths = write_report(study, args.out)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
