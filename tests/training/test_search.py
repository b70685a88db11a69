"""Hyper-parameter search on Optuna: space, sampler, objective, resume/kill semantics and Table 2 report."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from model_training import search
from model_training.report import table_rows, to_markdown, trial_row, write_report
from model_training.search import (
    FixedSettings,
    Objective,
    SearchSpace,
    TrialSeededRandomSampler,
    make_config,
    open_study,
    suggest,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = ["--space", "small", "--matrix", "64", "64", "--n-val", "32", "--threads", "1"]
FIXED = FixedSettings(matrix=(64, 64), n_train=128, n_val=32, epochs=2, space="small")

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _worker(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    fh = log.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "model_training.search", *args],
        cwd=REPO_ROOT,
        env=_env(),
        stdout=fh,
        stderr=subprocess.STDOUT,
    )


def _states(study: optuna.Study) -> dict[TrialState, list[optuna.trial.FrozenTrial]]:
    out: dict[TrialState, list[optuna.trial.FrozenTrial]] = {s: [] for s in TrialState}
    for t in study.get_trials():
        out[t.state].append(t)
    return out


# ------------------------------------------------------------------------------------------ fast units
def test_space_drops_crops_that_do_not_fit_the_matrix() -> None:
    space = SearchSpace().fitted((64, 64))
    assert space.crop_y == (16, 32)  # 64 acquired rows at R=2 need 128 lines
    assert space.crop_x == (16, 32, 64)
    assert SearchSpace().fitted((448, 448)).crop_y == (16, 32, 64)
    with pytest.raises(ValueError, match="no crop choice"):
        SearchSpace(crop_y=(64,)).fitted((64, 64))


def test_random_sampler_depends_only_on_seed_and_trial_number() -> None:
    space = search.SPACES["full"].fitted((448, 448))

    def draws(seed: int, n: int) -> list[dict[str, Any]]:
        study = optuna.create_study(sampler=TrialSeededRandomSampler(seed))
        return [suggest(study.ask(), space) for _ in range(n)]

    a, b = draws(0, 4), draws(0, 4)
    assert a == b
    assert draws(1, 4) != a
    assert len({json.dumps(d, sort_keys=True) for d in a}) == 4
    cfg = make_config(FixedSettings(), a[0])
    assert cfg.study.crop == (a[0]["s_y_crop"], a[0]["s_x_crop"]) == cfg.net.crop
    assert cfg.n_train == 7700 and cfg.epochs == 20 and cfg.study.matrix == (448, 448)


def test_invalid_configuration_is_pruned_not_crashing(tmp_path: Path) -> None:
    bad = SearchSpace(crop_y=(64,), crop_x=(16,))  # does not fit matrix 64 (not .fitted)
    study = optuna.create_study()
    study.optimize(Objective(FIXED, tmp_path, n_trials=1, space=bad), n_trials=1)
    t = study.trials[0]
    assert t.state == TrialState.PRUNED
    assert "do not fit" in t.user_attrs["invalid"]
    row = trial_row(t)
    assert row["mean_inplane_mae"] is None and not row["converged"] and "invalid" in row["note"]


def _metrics(mae: float, epoch: int) -> dict[str, float]:
    return {
        "epoch": epoch,
        "mae_dx_px": mae,
        "mae_dy_px": mae,
        "mae_phi_deg": mae,
        "mean_inplane_mae": mae,
        "euclidean_loss": mae,
        "train_loss": mae,
    }


@pytest.mark.parametrize(("maes", "value"), [([7.0, math.nan, math.nan], 7.0), ([math.nan], math.inf)])
def test_diverged_run_is_complete_and_not_converged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, maes: list[float], value: float
) -> None:
    def fake_train(cfg: Any, out_dir: Any, resume: bool, on_epoch: Any) -> dict[str, Any]:
        history = []
        for i, m in enumerate(maes, 1):
            history.append(_metrics(m, i))
            on_epoch(i, history[-1])
        return {"history": history, "summary": {}, "paths": {}}

    monkeypatch.setattr(search, "train", fake_train)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    study.optimize(Objective(FIXED, tmp_path, n_trials=1), n_trials=1)
    t = study.trials[0]
    assert t.state == TrialState.COMPLETE and t.value == value
    assert "epoch" in t.user_attrs["diverged"]
    assert len(json.loads(t.user_attrs["history"])) == (2 if value == 7.0 else 1)  # stopped at the NaN
    row = trial_row(t)
    assert not row["converged"] and "diverged" in row["note"]


def test_median_pruner_stops_a_bad_trial_after_its_first_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def fake_train(cfg: Any, out_dir: Any, resume: bool, on_epoch: Any) -> dict[str, Any]:
        mae = 9.0 if len(calls) == 5 else 2.0
        calls.append(1)
        history = []
        for i in (1, 2):
            history.append(_metrics(mae, i))
            on_epoch(i, history[-1])
        return {"history": history, "summary": {}, "paths": {}}

    monkeypatch.setattr(search, "train", fake_train)
    study = optuna.create_study(pruner=search.make_pruner("median", warmup_epochs=0))
    study.optimize(Objective(FIXED, tmp_path, n_trials=6), n_trials=6)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5 + [TrialState.PRUNED]
    pruned = study.trials[-1]
    assert pruned.intermediate_values == {1: 9.0} and len(json.loads(pruned.user_attrs["history"])) == 1
    row = trial_row(pruned)
    assert row["state"] == "pruned" and row["epochs"] == 1 and "pruned after epoch 1" in row["note"]


def test_report_sorts_by_mae_and_marks_convergence() -> None:
    dist = {"s_y_crop": CategoricalDistribution([16]), "lr": FloatDistribution(1e-4, 1e-2, log=True)}

    def make(maes: list[float], state: TrialState = TrialState.COMPLETE) -> optuna.trial.FrozenTrial:
        cfg = make_config(
            FIXED,
            {
                "s_y_crop": 16,
                "s_x_crop": 8,
                "kernel_size": 3,
                "n_conv": 2,
                "n_fully": 2,
                "downsample": "maxpool",
                "downsample_factor": 2,
                "init": "uniform",
                "loss": "euclidean",
                "standardise": True,
                "batch_norm": False,
                "lr": 1e-3,
                "batch_size": 32,
            },
        )
        hist = [_metrics(m, i) for i, m in enumerate(maes, 1)]
        finite = [m for m in maes if math.isfinite(m)]
        return optuna.trial.create_trial(
            state=state,
            value=(min(finite) if finite else math.inf) if state == TrialState.COMPLETE else None,
            params={"s_y_crop": 16, "lr": 1e-3},
            distributions=dist,
            user_attrs={"config": json.dumps(cfg.to_dict()), "history": json.dumps(hist)},
        )

    trials = [
        make([9.0, 7.5]),  # not converged (min 7.5 > 6)
        make([5.0, 1.5, 1.2]),  # converged, epochs to convergence 2
        make([6.0]),  # converged exactly at the threshold, never < 2
        make([math.nan]),  # diverged: no finite epoch
        make([8.0, 3.0], TrialState.PRUNED),
        optuna.trial.create_trial(state=TrialState.FAIL),  # not a finished trial
    ]
    for i, t in enumerate(trials):
        t.number = i
    rows = table_rows(trials)
    assert [r["trial"] for r in rows] == [1, 4, 2, 0, 3]
    assert [r["converged"] for r in rows] == [True, True, True, False, False]
    assert [r["epochs_to_convergence"] for r in rows] == [2, None, None, None, None]
    assert rows[0]["mean_inplane_mae"] == 1.2 and rows[0]["mae_dx_px"] == 1.2
    assert rows[0]["downsampling"] == "maxpool 2" and rows[0]["init"] == "uniform ±0.075"
    assert rows[0]["s_x_crop"] == 8 and rows[0]["batch_norm"] == "no" and rows[0]["standardise"] == "yes"
    assert rows[1]["state"] == "pruned" and rows[-1]["mean_inplane_mae"] is None
    md = to_markdown(rows).splitlines()
    line = next(i for i, s in enumerate(md) if "not converged below this line" in s)
    assert md[line - 1].startswith("| 2 |") and md[line + 1].startswith("| 0 |")
    assert md[2].endswith("| 1.20 | 2 | yes | 3 |  |")  # min MAE, epochs to convergence, converged, epochs
    assert md[-1].startswith("| 3 |") and "| – | – | – | – | – | no | 1 |" in md[-1]


def test_fixed_settings_must_match_to_join(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    open_study("s", url, FIXED)
    open_study("s", url, FIXED)  # same settings: joins
    with pytest.raises(ValueError, match="other fixed settings"):
        open_study("s", url, FixedSettings(matrix=(64, 64), n_train=128, n_val=32, epochs=3, space="small"))


# ------------------------------------------------------------------------------------------ end to end
def test_seeded_random_search_writes_table2(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    args = ["--study-name", "r", "--storage", url, "--out", str(tmp_path), "--seed", "3"]
    args += [*TINY, "--n-train", "128", "--epochs", "1", "--heartbeat", "1"]
    assert search.main([*args, "--n-trials", "2"]) == 0
    study = optuna.load_study(study_name="r", storage=url)
    first = {t.number: (t.params, t.value) for t in study.trials}
    # resuming to 3 runs one new configuration; finished ones stay as they are
    assert search.main([*args, "--n-trials", "3"]) == 0
    study = optuna.load_study(study_name="r", storage=url)
    assert len(study.trials) == 3 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert {n: (t.params, t.value) for n, t in enumerate(study.trials) if n < 2} == first
    for t in study.trials:
        cfg = json.loads(t.user_attrs["config"])
        assert cfg["study"]["matrix"] == [64, 64] and cfg["n_train"] == 128
        assert len(json.loads(t.user_attrs["history"])) == 1
        assert (tmp_path / f"trial_{t.number:04d}" / "history.json").exists()
    md = (tmp_path / "table2.md").read_text()
    assert sum(1 for s in md.splitlines() if s.startswith("| ") and s[2].isdigit()) == 3
    with (tmp_path / "table2.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["trial"]) for r in rows) == [0, 1, 2]
    maes = [float(r["mean_inplane_mae"]) for r in rows]
    assert maes == sorted(maes)


@pytest.mark.slow
def test_two_workers_finish_exactly_n_trials(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    args = ["--study-name", "w", "--storage", url, "--out", str(tmp_path), "--n-trials", "5"]
    args += [*TINY, "--n-train", "128", "--epochs", "1", "--heartbeat", "1"]
    procs = [_worker([*args, "--worker-id", str(i)], tmp_path / f"w{i}.log") for i in range(2)]
    for i, p in enumerate(procs):
        assert p.wait(timeout=120) == 0, (tmp_path / f"w{i}.log").read_text()[-3000:]
    study = optuna.load_study(study_name="w", storage=url)
    s = _states(study)
    assert len(s[TrialState.COMPLETE]) + len(s[TrialState.PRUNED]) == 5
    assert not s[TrialState.RUNNING] and not s[TrialState.WAITING]
    # the only failures allowed are abandoned slots of a race between the workers
    assert all("abandoned" in t.user_attrs for t in s[TrialState.FAIL])
    with (tmp_path / "table2.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 5


@pytest.mark.slow
def test_killed_worker_trial_is_failed_retried_and_not_repeated(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    args = ["--study-name", "k", "--storage", url, "--out", str(tmp_path), "--n-trials", "3"]
    args += [*TINY, "--n-train", "768", "--epochs", "3", "--heartbeat", "1", "--grace-period", "2"]
    proc = _worker(args, tmp_path / "killed.log")
    killed = None
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            try:
                s = _states(optuna.load_study(study_name="k", storage=url))
            except KeyError:  # study not created yet
                continue
            running = [t for t in s[TrialState.RUNNING] if t.intermediate_values]
            if s[TrialState.COMPLETE] and running:
                proc.kill()
                killed = running[0].number
                break
    finally:
        proc.kill()
        proc.wait()
    assert killed is not None, (tmp_path / "killed.log").read_text()[-3000:]
    before = _states(optuna.load_study(study_name="k", storage=url))
    done_before = {t.number: (t.params, t.value, t.datetime_complete) for t in before[TrialState.COMPLETE]}
    assert [t.number for t in before[TrialState.RUNNING]] == [killed]

    assert search.main(args) == 0  # resumes: fails the stale trial after the grace period, retries it
    after = _states(optuna.load_study(study_name="k", storage=url))
    finished = after[TrialState.COMPLETE] + after[TrialState.PRUNED]
    assert len(finished) == 3
    assert [t.number for t in after[TrialState.FAIL]] == [killed]
    for n, old in done_before.items():  # finished trials are not repeated
        t = next(t for t in after[TrialState.COMPLETE] if t.number == n)
        assert (t.params, t.value, t.datetime_complete) == old
    retry = next(t for t in finished if t.system_attrs.get("failed_trial") == killed)
    killed_trial = after[TrialState.FAIL][0]
    assert retry.params == killed_trial.params
    assert retry.user_attrs["out_dir"].endswith(f"trial_{killed:04d}")
    assert retry.user_attrs["resumed_after_epoch"] >= 1  # continued from the killed trial's checkpoint
    assert [h["epoch"] for h in json.loads(retry.user_attrs["history"])] == [1, 2, 3]
    assert sorted(retry.intermediate_values) == [1, 2, 3]
    md = (tmp_path / "table2.md").read_text()
    assert f"#{killed}: worker died (no heartbeat); retried as #{retry.number}" in md
    assert f"retry of #{killed}" in md
    paths = write_report(optuna.load_study(study_name="k", storage=url), tmp_path / "again")
    assert paths["csv"].read_text().count("\n") == 4
