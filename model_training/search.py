"""The abstract's random hyper-parameter search (Table 1 / Table 2) on Optuna.

Every trial draws one combination of Table 1's hyper-parameters, trains it with
:func:`model_training.train.train` for a fixed number of epochs and scores it by its minimum validation
``mean_inplane_mae``.  The study lives in an RDB (SQLite by default), so several worker processes or
machines can join it; ``python -m model_training.report`` (also written at the end of every worker) turns
it into a Table 2-style report.

    python -m model_training.search --study-name table1 --storage sqlite:///runs/search/study.db \\
        --n-trials 100 --out runs/search --seed 0

Samplers: ``random`` (default; the abstract's protocol) draws every parameter of trial number ``n`` from
a generator seeded by ``(seed, n, parameter name)``, so the same seed gives the same configurations
whatever the number of workers; ``tpe`` uses ``TPESampler(seed=seed + worker_id, constant_liar=True)``.
Resuming runs only the missing trials up to ``--n-trials`` finished (complete or pruned) ones; trials of
killed workers are failed after the heartbeat grace period and retried once (see docs/search.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import socket
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import optuna
import sqlalchemy
import torch
from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from kmotion.network import NetConfig
from kmotion.physics.sampling import crop_row_indices
from kmotion.physics.validate import InputError
from kmotion.simulation.study import StudyConfig
from model_training.metrics import LOSSES
from model_training.train import TrainConfig, train

log = logging.getLogger("kmotion.search")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
"""States that count towards ``--n-trials``."""
DIVERGED_VALUE = math.inf
"""Objective value of a run whose validation MAE was never finite (NaN/inf from the first epoch)."""


# ---------------------------------------------------------------------------------------------- space
@dataclass(frozen=True)
class SearchSpace:
    """Choices of every searched hyper-parameter (Table 1 of the abstract)."""

    crop_y: tuple[int, ...] = (16, 32, 64)
    """``s_y_crop`` choices (acquired rows); choices that do not fit the matrix are dropped."""
    crop_x: tuple[int, ...] = (16, 32, 64)
    """``s_x_crop`` choices (readout samples)."""
    kernel_size: tuple[int, int] = (2, 10)
    n_conv: tuple[int, int] = (2, 6)
    n_fully: tuple[int, int] = (1, 4)
    downsample: tuple[str, ...] = ("stride", "maxpool")
    downsample_factor: tuple[int, ...] = (2, 3, 4)
    init: tuple[str, ...] = ("uniform", "xavier")
    loss: tuple[str, ...] = ("euclidean", "mae")
    standardise: tuple[bool, ...] = (True, False)
    batch_norm: tuple[bool, ...] = (True, False)
    lr: tuple[float, float] = (1e-4, 1e-2)
    """Log-uniform range."""
    batch_size: tuple[int, ...] = (16, 32, 64)

    def fitted(self, matrix: tuple[int, int], acceleration: int = 2) -> SearchSpace:
        """The space with the crop choices that fit ``matrix`` (``StudyConfig`` would reject the others)."""
        n_y, n_x = matrix

        def rows_fit(s: int) -> bool:
            try:
                crop_row_indices(n_y, s, acceleration)
            except InputError:
                return False
            return True

        crop_y = tuple(s for s in self.crop_y if rows_fit(s))
        crop_x = tuple(s for s in self.crop_x if 1 <= s <= n_x)
        if not crop_y or not crop_x:
            raise ValueError(
                f"no crop choice fits matrix {matrix} "
                f"(s_y_crop from {self.crop_y}, s_x_crop from {self.crop_x})"
            )
        return replace(self, crop_y=crop_y, crop_x=crop_x)


SPACES: dict[str, SearchSpace] = {
    "full": SearchSpace(),
    "small": SearchSpace(
        crop_y=(8, 16),
        crop_x=(8, 16),
        kernel_size=(2, 5),
        n_conv=(2, 3),
        n_fully=(1, 2),
        downsample_factor=(2, 3),
        lr=(1e-3, 1e-2),
        batch_size=(16, 32),
    ),
}
"""``full``: the abstract's Table 1 (plus the issue's ranges); ``small``: tiny networks for tests."""


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """Draw one configuration of ``space`` for ``trial`` (parameter names as in the report)."""
    return {
        "s_y_crop": trial.suggest_categorical("s_y_crop", list(space.crop_y)),
        "s_x_crop": trial.suggest_categorical("s_x_crop", list(space.crop_x)),
        "kernel_size": trial.suggest_int("kernel_size", *space.kernel_size),
        "n_conv": trial.suggest_int("n_conv", *space.n_conv),
        "n_fully": trial.suggest_int("n_fully", *space.n_fully),
        "downsample": trial.suggest_categorical("downsample", list(space.downsample)),
        "downsample_factor": trial.suggest_categorical("downsample_factor", list(space.downsample_factor)),
        "init": trial.suggest_categorical("init", list(space.init)),
        "loss": trial.suggest_categorical("loss", list(space.loss)),
        "standardise": trial.suggest_categorical("standardise", list(space.standardise)),
        "batch_norm": trial.suggest_categorical("batch_norm", list(space.batch_norm)),
        "lr": trial.suggest_float("lr", *space.lr, log=True),
        "batch_size": trial.suggest_categorical("batch_size", list(space.batch_size)),
    }


# ---------------------------------------------------------------------------------------------- fixed
@dataclass
class FixedSettings:
    """Settings shared by every trial of a study (stored in the study; workers must agree)."""

    matrix: tuple[int, int] = (448, 448)
    fov_mm: tuple[float, float] = (220.0, 220.0)
    motion_range: tuple[float, float, float] = (12.0, 12.0, 12.0)
    n_coils: int = 1
    snr: float | None = None
    n_train: int = 7700
    n_val: int = 1000
    epochs: int = 20
    seed: int = 0
    """Training-data seed (``TrainConfig.seed``): every trial sees the same training pairs."""
    train_raw: list[str] = field(default_factory=list)
    val_raw: list[str] = field(default_factory=list)
    space: str = "full"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FixedSettings:
        d = json.loads(text)
        for key in ("matrix", "fov_mm", "motion_range"):
            d[key] = tuple(d[key])
        return cls(**d)


def make_config(fixed: FixedSettings, params: dict[str, Any], device: str = "auto") -> TrainConfig:
    """The :class:`TrainConfig` of one trial; raises ``ValueError`` for an invalid combination."""
    study = StudyConfig(
        matrix=fixed.matrix,
        fov_mm=fixed.fov_mm,
        motion_range=fixed.motion_range,
        crop=(int(params["s_y_crop"]), int(params["s_x_crop"])),
        n_coils=fixed.n_coils,
        snr=fixed.snr,
        standardise=bool(params["standardise"]),
    )
    net = NetConfig(
        kernel_size=int(params["kernel_size"]),
        n_conv=int(params["n_conv"]),
        n_fully=int(params["n_fully"]),
        downsample=params["downsample"],
        downsample_factor=int(params["downsample_factor"]),
        init=params["init"],
        batch_norm=bool(params["batch_norm"]),
    )
    if params["loss"] not in LOSSES:
        raise ValueError(f"unknown loss {params['loss']!r}")
    return TrainConfig(
        study=study,
        net=net,
        n_train=fixed.n_train,
        n_val=fixed.n_val,
        epochs=fixed.epochs,
        batch_size=int(params["batch_size"]),
        lr=float(params["lr"]),
        loss=params["loss"],
        seed=fixed.seed,
        device=device,
        train_raw=list(fixed.train_raw),
        val_raw=list(fixed.val_raw),
        progress=False,
    )


# --------------------------------------------------------------------------------------------- sampler
class TrialSeededRandomSampler(optuna.samplers.RandomSampler):
    """``RandomSampler`` whose draws for trial ``n`` depend only on ``(seed, n, parameter name)``.

    Workers sharing a study then need no seed bookkeeping: the configuration of every trial number is
    reproducible from the study seed, whichever worker runs it.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.seed = seed

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        entropy = [self.seed & 0xFFFFFFFF, trial.number, zlib.crc32(param_name.encode())]
        sub_seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
        return optuna.samplers.RandomSampler(seed=sub_seed).sample_independent(
            study, trial, param_name, param_distribution
        )


def make_sampler(kind: str, seed: int, worker_id: int) -> optuna.samplers.BaseSampler:
    """``random``: :class:`TrialSeededRandomSampler` (seed); ``tpe``: TPE seeded ``seed + worker_id``."""
    if kind == "random":
        return TrialSeededRandomSampler(seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed + worker_id, constant_liar=True)
    raise ValueError(f"sampler must be 'random' or 'tpe', got {kind!r}")


def make_pruner(kind: str, warmup_epochs: int = 5) -> optuna.pruners.BasePruner:
    """``none`` or ``median`` (median of earlier trials at the same epoch, after ``warmup_epochs``)."""
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=warmup_epochs)
    raise ValueError(f"pruner must be 'none' or 'median', got {kind!r}")


def make_storage(url: str, heartbeat: int = 10, grace_period: int | None = None) -> RDBStorage:
    """RDB storage with heartbeats: a trial silent for ``grace_period`` s is failed and retried once.

    ``heartbeat <= 0`` disables heartbeats (killed trials then stay RUNNING forever).
    """
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    if heartbeat > 0:
        warnings.filterwarnings(
            "ignore", ".*RetryHeartbeatStaleTrialCallback", optuna.exceptions.ExperimentalWarning
        )
        kwargs.update(
            heartbeat_interval=int(heartbeat),
            grace_period=int(grace_period if grace_period is not None else 3 * heartbeat),
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                max_retry=1, inherit_intermediate_values=True
            ),
        )

    def connect() -> RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, **kwargs)

    return _retry(connect)


_T = TypeVar("_T")


def _retry(fn: Callable[[], _T], attempts: int = 5) -> _T:
    """``fn()``, retried on database errors: workers starting together race to create tables and study."""
    for attempt in range(attempts):
        try:
            return fn()
        except sqlalchemy.exc.SQLAlchemyError as exc:
            if attempt == attempts - 1:
                raise
            log.info("database busy (%s); retrying", type(exc).__name__)
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------- objective
class _Diverged(Exception):
    """Validation metrics became NaN/inf."""


class _OverLimit(Exception):
    """Another worker already holds the study's last trial slots (a race between workers)."""


def _is_finite(metrics: dict[str, float]) -> bool:
    keys = ("mean_inplane_mae", "mae_dx_px", "mae_dy_px", "mae_phi_deg", "train_loss")
    return all(math.isfinite(float(metrics.get(k, 0.0))) for k in keys)


class Objective:
    """Train one configuration; value = minimum validation ``mean_inplane_mae`` over the epochs.

    Parameters
    ----------
    fixed
        Study-wide settings.
    out_dir
        Trials write to ``out_dir/trial_XXXX`` (a retried trial continues in its original's folder).
    n_trials
        Finished trials the study aims at; a trial beyond them (a race between workers) is failed at once
        with user attr ``abandoned``.
    space
        Search space (default: ``SPACES[fixed.space]`` fitted to the matrix).
    device
        ``TrainConfig.device``.
    """

    def __init__(
        self,
        fixed: FixedSettings,
        out_dir: str | Path,
        n_trials: int,
        space: SearchSpace | None = None,
        device: str = "auto",
    ) -> None:
        self.fixed = fixed
        self.out_dir = Path(out_dir)
        self.n_trials = n_trials
        self.space = space if space is not None else SPACES[fixed.space].fitted(fixed.matrix)
        self.device = device

    def _check_slot(self, trial: optuna.Trial) -> FrozenTrial:
        active = trial.study.get_trials(
            deepcopy=False, states=(*FINISHED, TrialState.RUNNING, TrialState.WAITING)
        )
        ahead = sum(1 for t in active if t.number < trial.number)
        if ahead >= self.n_trials:
            trial.set_user_attr("abandoned", f"study already has {self.n_trials} trials")
            raise _OverLimit(f"trial {trial.number}: the study already has {self.n_trials} trials")
        return next(t for t in active if t.number == trial.number)

    def __call__(self, trial: optuna.Trial) -> float:
        me = self._check_slot(trial)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        params = suggest(trial, self.space)
        try:
            cfg = make_config(self.fixed, params, self.device)
        except ValueError as exc:  # e.g. a crop that does not fit the matrix
            trial.set_user_attr("invalid", str(exc))
            raise optuna.TrialPruned(f"invalid configuration: {exc}") from exc
        trial.set_user_attr("config", json.dumps(cfg.to_dict()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            original = RetryHeartbeatStaleTrialCallback.retried_trial_number(me)
        folder = self.out_dir / f"trial_{(original if original is not None else trial.number):04d}"
        trial.set_user_attr("out_dir", str(folder))
        resume = False
        history: list[dict[str, float]] = []
        if original is not None and (folder / "checkpoint.pt").exists():
            state = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
            trial.set_user_attr("resumed_after_epoch", int(state["epoch"]))
            history = json.loads(state["history"])
            for h in history:  # epochs checkpointed after the original's last report
                if int(h["epoch"]) not in me.intermediate_values and _is_finite(h):
                    trial.report(float(h["mean_inplane_mae"]), int(h["epoch"]))
            resume = True
            log.info("trial %d retries trial %d from its epoch %d", trial.number, original, state["epoch"])

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            history.append(dict(metrics))
            trial.set_user_attr("history", json.dumps(history))
            if not _is_finite(metrics):
                raise _Diverged(f"non-finite metrics at epoch {epoch}")
            trial.report(float(metrics["mean_inplane_mae"]), epoch)
            if epoch < cfg.epochs and trial.should_prune():  # pruning after the last epoch saves nothing
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        try:
            result = train(cfg, out_dir=folder, resume=resume, on_epoch=on_epoch)
            history = result["history"]
        except _Diverged as exc:
            trial.set_user_attr("diverged", str(exc))
            log.warning("trial %d diverged: %s", trial.number, exc)
        except optuna.TrialPruned:
            trial.set_user_attr("history", json.dumps(history))
            raise
        trial.set_user_attr("history", json.dumps(history))
        finite = [h["mean_inplane_mae"] for h in history if _is_finite(h)]
        return min(finite) if finite else DIVERGED_VALUE


# --------------------------------------------------------------------------------------------- workers
def _counts(study: optuna.Study) -> dict[TrialState, int]:
    counts = dict.fromkeys(TrialState, 0)
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return counts


def open_study(
    study_name: str,
    storage: str | RDBStorage,
    fixed: FixedSettings,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Create or join the study; the first worker stores ``fixed``, later ones must match it."""
    study = _retry(
        lambda: optuna.create_study(
            study_name=study_name,
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            direction="minimize",
            load_if_exists=True,
        )
    )
    stored = study.user_attrs.get("fixed")
    if stored is None:
        study.set_user_attr("fixed", fixed.to_json())
    elif FixedSettings.from_json(stored) != fixed:
        raise ValueError(
            f"study {study_name!r} was created with other fixed settings:\n  stored: {stored}\n"
            f"  given:  {fixed.to_json()}"
        )
    return study


class _Collect:
    """``study.optimize`` callback that keeps the trials this worker finished."""

    def __init__(self, sink: list[FrozenTrial]) -> None:
        self.sink = sink

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.sink.append(trial)


def run_worker(
    study: optuna.Study,
    objective: Objective,
    n_trials: int,
    heartbeat: int = 10,
    max_failures: int = 10,
) -> dict[str, int]:
    """Run trials until the study has ``n_trials`` finished (complete or pruned) ones.

    While the last trials run in other workers this one waits (polling every ``heartbeat`` s), so it can
    take over their retries if they die; with heartbeats off it returns instead.  Returns the counts by
    state.
    """
    failures = 0
    poll = max(float(heartbeat), 1.0)
    while True:
        if heartbeat > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        c = _counts(study)
        finished = c[TrialState.COMPLETE] + c[TrialState.PRUNED]
        if finished >= n_trials:
            break
        busy = finished + c[TrialState.RUNNING] + c[TrialState.WAITING]
        if busy >= n_trials and c[TrialState.WAITING] == 0:
            if heartbeat <= 0:
                log.info("the remaining trials run in other workers; stopping")
                break
            time.sleep(poll)
            continue
        done: list[FrozenTrial] = []
        study.optimize(
            objective,
            n_trials=1,
            catch=(Exception,),
            gc_after_trial=True,
            callbacks=[_Collect(done)],
        )
        if any(t.state == TrialState.FAIL and "abandoned" not in t.user_attrs for t in done):
            failures += 1
            if failures >= max_failures:
                log.error("%d trials failed in this worker; giving up", failures)
                break
    c = _counts(study)
    return {s.name: n for s, n in c.items()}


# -------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model_training.search",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = FixedSettings()
    p.add_argument("--study-name", required=True)
    p.add_argument("--storage", help="RDB URL (default: sqlite:///OUT/study.db)")
    p.add_argument("--n-trials", type=int, required=True, help="finished trials the study should reach")
    p.add_argument("--out", required=True, help="folder of trial_XXXX runs and table2.md/.csv")
    p.add_argument("--sampler", choices=["random", "tpe"], default="random")
    p.add_argument("--pruner", choices=["none", "median"], default="none")
    p.add_argument("--prune-warmup", type=int, default=5, help="epochs before the median pruner acts")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument(
        "--worker-id", type=int, help="TPE seed offset (default: the process id); unused by --sampler random"
    )
    p.add_argument("--heartbeat", type=int, default=10, help="seconds; 0 disables stale-trial detection")
    p.add_argument("--grace-period", type=int, help="seconds without heartbeat until a trial fails (3x)")
    p.add_argument("--max-failures", type=int, default=10, help="failed trials until this worker stops")
    p.add_argument("--space", choices=sorted(SPACES), default=d.space)
    p.add_argument("--matrix", type=int, nargs=2, default=list(d.matrix))
    p.add_argument("--fov", type=float, nargs=2, default=list(d.fov_mm))
    p.add_argument("--range", type=float, nargs=3, dest="motion_range", default=list(d.motion_range))
    p.add_argument("--coils", type=int, default=d.n_coils)
    p.add_argument("--snr", type=float)
    p.add_argument("--n-train", type=int, default=d.n_train)
    p.add_argument("--n-val", type=int, default=d.n_val)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--train-seed", type=int, default=d.seed, help="training-data seed of every trial")
    p.add_argument("--train-raw", nargs="*", default=[])
    p.add_argument("--val-raw", nargs="*", default=[])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads of this worker")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from model_training.report import write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    url = args.storage or f"sqlite:///{out / 'study.db'}"
    fixed = FixedSettings(
        matrix=tuple(args.matrix),
        fov_mm=tuple(args.fov),
        motion_range=tuple(args.motion_range),
        n_coils=args.coils,
        snr=args.snr,
        n_train=args.n_train,
        n_val=args.n_val,
        epochs=args.epochs,
        seed=args.train_seed,
        train_raw=list(args.train_raw),
        val_raw=list(args.val_raw),
        space=args.space,
    )
    worker_id = args.worker_id if args.worker_id is not None else os.getpid()
    try:
        objective = Objective(fixed, out, args.n_trials, device=args.device)
        storage = make_storage(url, args.heartbeat, args.grace_period)
        study = open_study(
            args.study_name,
            storage,
            fixed,
            make_sampler(args.sampler, args.seed, worker_id),
            make_pruner(args.pruner, args.prune_warmup),
        )
    except ValueError as exc:
        print(f"model_training.search: error: {exc}")
        return 2
    counts = run_worker(study, objective, args.n_trials, args.heartbeat, args.max_failures)
    paths = write_report(study, out)
    print(json.dumps({"study": args.study_name, "trials": counts, **{k: str(v) for k, v in paths.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
