"""Reproduce the abstract's findings with controlled one-factor-at-a-time runs (and write a summary).

Each run is the abstract's default training (7,700 pairs, 20 epochs, matrix 448, crop 64x64, k = 5,
n_conv = 4, n_fully = 3, stride 2, Euclidean loss, uniform ±0.075, standardisation, batch norm) with one
knob changed, so every finding of the abstract is tested against the same baseline:

    python -m model_training.reproduce --out runs/reproduction            # full size (~30 min, 2 CPU cores)
    python -m model_training.reproduce --out runs/repro_small --reduced   # matrix 128, 2,000 pairs, 10 epochs

Writes ``OUT/summary.md`` and ``OUT/summary.csv`` (one row per run: the changed knob, minimum validation MAE
per parameter, mean in-plane MAE, epochs to convergence, converged) and each run's folder with its Figure 2.
Finished runs are skipped when the command is run again (resumable).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kmotion.network import NetConfig
from kmotion.simulation.study import StudyConfig
from model_training.metrics import convergence
from model_training.train import TrainConfig, train

log = logging.getLogger("kmotion.reproduce")

# (name, finding it tests, study overrides, net overrides, train overrides)
RUNS: list[tuple[str, str, dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    ("baseline", "the abstract's setting", {}, {}, {}),
    ("xavier", "Xavier init slow / not converging vs uniform ±0.075", {}, {"init": "xavier"}, {}),
    ("mae_loss", "MAE loss not converging vs Euclidean", {}, {}, {"loss": "mae"}),
    ("no_standardise", "standardisation beneficial", {"standardise": False}, {}, {}),
    ("no_batch_norm", "batch norm beneficial", {}, {"batch_norm": False}, {}),
    ("downsample_3", "down-sampling 2 better than higher", {}, {"downsample_factor": 3}, {}),
    ("downsample_4", "down-sampling 2 better than higher", {}, {"downsample_factor": 4}, {}),
    ("maxpool_2", "stride or max pooling alike", {}, {"downsample": "maxpool"}, {}),
    ("kernel_3", "k in 4-8 crucial (k < 4)", {}, {"kernel_size": 3}, {}),
    ("kernel_10", "k in 4-8 crucial (k > 8)", {}, {"kernel_size": 10}, {}),
    ("crop_8", "input size >= 2k crucial (crop 8 < 2k = 10)", {"crop": (8, 8)}, {}, {}),
    ("n_conv2_n_fully2", "every n_conv, n_fully >= 2 converges", {}, {"n_conv": 2, "n_fully": 2}, {}),
    ("n_conv6_n_fully4", "every n_conv, n_fully >= 2 converges", {}, {"n_conv": 6, "n_fully": 4}, {}),
    ("n_fully1", "n_fully >= 2 needed for capacity", {}, {"n_fully": 1}, {}),
]


def run_all(
    out: Path,
    reduced: bool,
    only: Sequence[str] | None = None,
    device: str = "auto",
    overrides: dict[str, Any] | None = None,
) -> list[dict]:
    """Run (or pick up finished) reproduction runs; ``overrides`` replaces TrainConfig sizes (tests)."""
    rows = []
    for name, finding, study_kw, net_kw, train_kw in RUNS:
        if only and name not in only:
            continue
        study: dict[str, Any] = {"crop": (64, 64)}
        if reduced:
            study.update(matrix=(128, 128), crop=(32, 32))
        study.update(study_kw)
        if reduced and name == "crop_8":
            study["crop"] = (8, 8)
        cfg = TrainConfig(
            study=StudyConfig(**study),
            net=NetConfig(**net_kw),
            n_train=2000 if reduced else 7700,
            n_val=500 if reduced else 1000,
            epochs=10 if reduced else 20,
            device=device,
            progress=False,
            **train_kw,
        )
        for key, value in (overrides or {}).items():
            if key == "study":
                cfg.study = StudyConfig(**{**cfg.study.to_dict(), **value})
                cfg.net.crop = cfg.study.crop
            else:
                setattr(cfg, key, value)
        run_dir = out / name
        hist_file = run_dir / "history.json"
        done = hist_file.exists() and len(json.loads(hist_file.read_text())) >= cfg.epochs
        if done:
            history = json.loads(hist_file.read_text())
        else:
            log.info("run %s (%s)", name, finding)
            history = train(cfg, run_dir, resume=True)["history"]
        c = convergence(history)
        rows.append(
            {
                "run": name,
                "tests": finding,
                "min MAE dx [px]": round(c["min_mae_dx_px"], 2),  # type: ignore[arg-type]
                "min MAE dy [px]": round(c["min_mae_dy_px"], 2),  # type: ignore[arg-type]
                "min MAE phi [deg]": round(c["min_mae_phi_deg"], 2),  # type: ignore[arg-type]
                "min mean in-plane MAE": round(c["min_mean_inplane_mae"], 2),  # type: ignore[arg-type]
                "epochs to convergence (< 2)": c["epochs_to_convergence"] or "–",
                "converged (<= 6)": "yes" if c["converged"] else "no",
                "s/epoch": round(sum(h["seconds"] for h in history) / len(history), 1),
            }
        )
        write_summary(out, rows, reduced)
    return rows


def write_summary(out: Path, rows: list[dict], reduced: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    size = (
        "reduced: matrix 128, crop 32x32, 2,000 training / 500 validation pairs, 10 epochs"
        if reduced
        else "full: matrix 448, crop 64x64, 7,700 training / 1,000 validation pairs, 20 epochs"
    )
    lines = [
        f"# Reproduction runs ({size})",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
    ]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--reduced", action="store_true")
    p.add_argument("--only", nargs="*", help="run only these (names: " + ", ".join(r[0] for r in RUNS) + ")")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    rows = run_all(Path(args.out), args.reduced, args.only, args.device)
    print((Path(args.out) / "summary.md").read_text())
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
