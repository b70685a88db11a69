"""Train the per-shot network (``docs/intra_scan.md``, "The per-shot network and its ablation").

    python -m model_training.shot_train --config model_training/configs/shot.json --out runs/shot

A small loop beside :mod:`model_training.train` (whose loop is tied to the pair study): a pool of simulated
samples (:mod:`model_training.shot_study`) of which ``pool_refresh`` is replaced every epoch, ``n_train``
samples per epoch drawn from it, Adam with a cosine learning rate, the Euclidean loss of the normalised
3-vector ``(dx, dy, phi)``, validation on ``n_val`` samples of phantoms never used in training (``val_seed``).

Writes to ``--out``: ``model.safetensors`` + ``model.json`` (best epoch by validation mean in-plane MAE, with
the ``shot_grid``, the study, the target scale and the provenance), ``checkpoint.pt`` (resume state, loaded
with ``weights_only=True``), ``history.json`` and ``figure2.png`` (training curve in the style of the
abstract's Figure 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import torch
from torch import nn

from kmotion.network import KMotionNet, NetConfig, save_model
from model_training.metrics import LOSSES
from model_training.shot_study import ShotStudyConfig, simulate_batch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("kmotion.shot_train")

NAMES = ("dx", "dy", "phi")


def default_net() -> NetConfig:
    """The per-shot architecture: the abstract's family with a mask channel and 3 outputs."""
    return NetConfig(
        in_channels=5,
        crop=(128, 64),
        features="reim+mag+cross",
        mask_channel=True,
        n_outputs=3,
        n_conv=4,
        kernel_size=5,
        max_channels=32,
        min_size=8,
        n_fully=3,
    )


@dataclass
class ShotTrainConfig:
    """Everything a per-shot training run depends on (stored with the weights)."""

    study: ShotStudyConfig = field(default_factory=ShotStudyConfig)
    net: NetConfig = field(default_factory=default_net)
    pool: int = 12000
    """Simulated samples kept; ``pool_refresh`` of them replaced by new ones every epoch."""
    pool_refresh: float = 0.25
    n_train: int = 12000
    """Samples per epoch (drawn from the pool)."""
    n_val: int = 1000
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    """``none`` or ``cosine`` (to 1 % of ``lr`` over the run)."""
    loss: str = "euclidean"
    seed: int = 1
    val_seed: int = 1_000_003
    """Validation phantoms come from this seed (training seeds stay below 1,000,000)."""
    device: str = "auto"
    time_limit_min: float = 0.0
    """Stop after the epoch that passes this many minutes (0: no limit)."""
    chunk: int = 256
    """Samples simulated at once."""

    def __post_init__(self) -> None:
        if isinstance(self.study, dict):
            self.study = ShotStudyConfig(**self.study)
        if isinstance(self.net, dict):
            self.net = NetConfig.from_dict({**default_net().to_dict(), **self.net})
        if self.loss not in LOSSES:
            raise ValueError(f"ShotTrainConfig.loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        if self.lr_schedule not in ("none", "cosine"):
            raise ValueError(
                f"ShotTrainConfig.lr_schedule must be 'none' or 'cosine', got {self.lr_schedule!r}"
            )
        for name in ("pool", "n_train", "n_val", "epochs", "batch_size", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"ShotTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.pool_refresh <= 1:
            raise ValueError(f"ShotTrainConfig.pool_refresh must be in (0, 1], got {self.pool_refresh}")
        if self.seed * 10_000 + 10_000 * (self.epochs + 2) >= 1_000_000:
            raise ValueError("ShotTrainConfig.seed/epochs: training seeds must stay below 1,000,000")
        # the network's input follows the data
        g = self.study.grid
        self.net.crop = g.crop
        self.net.in_channels = 4 * g.n_virtual + 1
        self.net.mask_channel = True
        self.net.n_outputs = 3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def simulate(cfg: ShotTrainConfig, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``n`` samples (float16 inputs, float32 targets, orderings), deterministic by ``seed``."""
    xs, ys, names = [], [], []
    for i, start in enumerate(range(0, n, cfg.chunk)):
        b = simulate_batch(cfg.study, min(cfg.chunk, n - start), seed * 1000 + i)
        xs.append(b.inputs.half())
        ys.append(b.targets)
        names += b.orderings
    return torch.cat(xs), torch.cat(ys), names


def summarise(pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> dict[str, float]:
    """MAE per parameter (px, px, deg) and the Euclidean loss of normalised ``(N, 3)`` predictions."""
    err = (pred.float() - target.float()).abs() * scale
    mae = err.mean(0).tolist()
    out = {f"mae_{n}_{u}": v for n, u, v in zip(NAMES, ("px", "px", "deg"), mae, strict=True)}
    out["mean_inplane_mae"] = sum(mae) / 3
    out["euclidean_loss"] = float(LOSSES["euclidean"](pred.float(), target.float()))
    return out


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch].to(device).float()).cpu() for i in range(0, len(x), batch)])


def train_shots(
    cfg: ShotTrainConfig, out_dir: str | Path | None = None, resume: bool = False
) -> dict[str, Any]:
    """One training run; returns ``{"history", "per_ordering", "paths"}``."""
    name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    out = Path(out_dir) if out_dir is not None else None
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    grid = cfg.study.grid
    scale = grid.target_scale()
    x_val, y_val, names_val = simulate(cfg, cfg.n_val, cfg.val_seed)
    model = KMotionNet(cfg.net).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(cfg.n_train / cfg.batch_size)
    sched = None
    if cfg.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=cfg.epochs * steps, eta_min=cfg.lr / 100
        )
    loss_fn = LOSSES[cfg.loss]
    history: list[dict[str, float]] = []
    start_epoch, best = 1, math.inf
    if resume and out is not None and (out / "checkpoint.pt").exists():
        state = torch.load(out / "checkpoint.pt", map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        history = json.loads(state["history"])
        start_epoch = int(state["epoch"]) + 1
        best = min((h["mean_inplane_mae"] for h in history), default=math.inf)
        log.info("resumed from %s at epoch %d", out / "checkpoint.pt", start_epoch)
    x_tr, y_tr, _ = simulate(cfg, cfg.pool, cfg.seed * 10_000)
    log.info(
        "simulated %d pool and %d validation samples in %.0f s",
        cfg.pool,
        cfg.n_val,
        time.perf_counter() - t_start,
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for epoch in range(start_epoch, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        if epoch > 1:  # refresh part of the pool
            n_new = max(1, int(cfg.pool * cfg.pool_refresh))
            where = torch.randperm(cfg.pool, generator=torch.Generator().manual_seed(cfg.seed * 31 + epoch))[
                :n_new
            ]
            x_new, y_new, _ = simulate(cfg, n_new, cfg.seed * 10_000 + epoch)
            x_tr[where], y_tr[where] = x_new, y_new
        t_sim = time.perf_counter() - t_epoch
        model.train()
        idx = torch.randint(
            cfg.pool, (cfg.n_train,), generator=torch.Generator().manual_seed(cfg.seed + epoch)
        )
        total, count = 0.0, 0
        for i in range(0, cfg.n_train, cfg.batch_size):
            j = idx[i : i + cfg.batch_size]
            if len(j) < 2:
                continue  # batch norm needs two samples
            xb, yb = x_tr[j].to(device).float(), y_tr[j].to(device)
            loss = loss_fn(model(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.item() * len(j)
            count += len(j)
        metrics = summarise(predict(model, x_val, device), y_val, scale)
        metrics.update(
            epoch=epoch,
            train_loss=total / max(count, 1),
            lr=opt.param_groups[0]["lr"],
            seconds=time.perf_counter() - t_epoch,
            simulation_seconds=t_sim,
        )
        history.append(metrics)
        log.info(
            "epoch %d/%d: train loss %.4f, val loss %.4f, MAE dx %.2f px, dy %.2f px, phi %.2f deg "
            "(%.0f s, of which simulation %.0f s)",
            epoch,
            cfg.epochs,
            metrics["train_loss"],
            metrics["euclidean_loss"],
            metrics["mae_dx_px"],
            metrics["mae_dy_px"],
            metrics["mae_phi_deg"],
            metrics["seconds"],
            t_sim,
        )
        if out is not None:
            if metrics["mean_inplane_mae"] < best:
                best = metrics["mean_inplane_mae"]
                _save_best(
                    model, cfg, history, out, _per_ordering(model, x_val, y_val, names_val, scale, device)
                )
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch,
                "history": json.dumps(history),
            }
            if sched is not None:
                state["scheduler"] = sched.state_dict()
            torch.save(state, out / "checkpoint.pt.tmp")
            (out / "checkpoint.pt.tmp").replace(out / "checkpoint.pt")
            (out / "history.json").write_text(json.dumps(history, indent=1))
            figure_shot(history, out / "figure2.png", _title(cfg))
        if cfg.time_limit_min and time.perf_counter() - t_start > 60 * cfg.time_limit_min:
            log.info("time limit of %.0f min reached after epoch %d", cfg.time_limit_min, epoch)
            break
    paths = {}
    if out is not None:
        paths = {k: str(out / v) for k, v in (("model", "model.safetensors"), ("figure2", "figure2.png"))}
    return {"history": history, "paths": paths}


def _per_ordering(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    names: list[str],
    scale: torch.Tensor,
    device: torch.device,
) -> dict[str, dict[str, float]]:
    pred = predict(model, x, device)
    out = {}
    for o in sorted(set(names)):
        sel = torch.tensor([n == o for n in names])
        out[o] = {**summarise(pred[sel], y[sel], scale), "n": int(sel.sum())}
    return out


def _title(cfg: ShotTrainConfig) -> str:
    g = cfg.study.grid
    return (
        f"per-shot network: matrix {g.matrix[0]}x{g.matrix[1]}, crop {g.crop[0]}x{g.crop[1]}, "
        f"{g.n_virtual} virtual coil(s), k={cfg.net.kernel_size}, n_conv={cfg.net.n_conv}, pool {cfg.pool}"
    )


def _save_best(
    model: nn.Module,
    cfg: ShotTrainConfig,
    history: list[dict[str, float]],
    out: Path,
    per_ordering: dict[str, dict[str, float]],
) -> None:
    assert isinstance(model, KMotionNet)
    last = history[-1]
    meta = {
        "shot_grid": cfg.study.grid.to_dict(),
        "study": cfg.study.to_dict(),
        "target_scale": cfg.study.grid.target_scale().tolist(),
        "training": {
            **cfg.to_dict(),
            "epoch": last["epoch"],
            "validation": {
                k: last[k]
                for k in ("mae_dx_px", "mae_dy_px", "mae_phi_deg", "mean_inplane_mae", "euclidean_loss")
            },
            "validation_per_ordering": per_ordering,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    }
    save_model(out / "model.safetensors", model, meta)


def figure_shot(history: list[dict[str, float]], path: Path, title: str = "") -> Path:
    """The training curve in the style of the abstract's Figure 2: loss (training, validation) and the
    validation MAE of dx, dy [px] and phi [deg] per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(epochs, [h["train_loss"] for h in history], "o-", label="training")
    a.plot(epochs, [h["euclidean_loss"] for h in history], "s-", label="validation")
    a.set_xlabel("epoch")
    a.set_ylabel("Euclidean loss (normalised 3-vector)")
    a.set_yscale("log")
    a.legend()
    a.grid(alpha=0.3)
    for n, u in zip(NAMES, ("px", "px", "deg"), strict=True):
        b.plot(epochs, [h[f"mae_{n}_{u}"] for h in history], ".-", label=f"{n} [{u}]")
    b.set_xlabel("epoch")
    b.set_ylabel("validation mean absolute error [px / deg]")
    b.set_yscale("log")
    b.legend()
    b.grid(alpha=0.3)
    fig.suptitle(title or "Training curve of the per-shot network")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> ShotTrainConfig:
    """A :class:`ShotTrainConfig` from a JSON file (``study``/``net`` as dicts) and top-level overrides."""
    base: dict[str, Any] = json.loads(Path(path).read_text()) if path else {}
    study = dict(base.pop("study", {}))
    net = base.pop("net", {})
    base.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return ShotTrainConfig(study=ShotStudyConfig(**study), net=net, **base)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="JSON file with a ShotTrainConfig")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--epochs", type=int)
    p.add_argument("--pool", type=int)
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-val", type=int)
    p.add_argument("--time-limit-min", type=float)
    p.add_argument("--device")
    args = p.parse_args(argv)
    try:
        cfg = load_config(
            args.config,
            {
                "epochs": args.epochs,
                "pool": args.pool,
                "n_train": args.n_train,
                "n_val": args.n_val,
                "time_limit_min": args.time_limit_min,
                "device": args.device,
            },
        )
    except (ValueError, TypeError, OSError) as exc:
        print(f"shot_train: error: {exc}")
        return 2
    result = train_shots(cfg, args.out, resume=args.resume)
    h = result["history"]
    best = min(h, key=lambda r: r["mean_inplane_mae"]) if h else {}
    print(json.dumps({"best": best, "paths": result["paths"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
