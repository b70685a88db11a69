"""Train the k-space motion network: the abstract's default run and everything around it.

Default run = the abstract's: 7,700 training pairs, 20 epochs, separate validation images (1,000 pairs from
phantoms never used in training), matrix 448, FOV 220 mm, every second row removed, motion ~ U[-12, 12]
px/deg, Euclidean loss, uniform ±0.075 initialisation, per-sample standardisation and batch norm.

    python -m model_training.train --out runs/abstract            # or: kmotion train --out ...
    torchrun --nproc_per_node 2 -m model_training.train --out runs/ddp   # several processes / nodes

Writes to ``--out``: ``model.safetensors`` + ``model.json`` (best epoch by validation mean in-plane MAE, with
the configs and provenance), ``checkpoint.pt`` (resume state, loaded with ``weights_only=True``),
``history.json``, ``figure2.png`` and TensorBoard scalars in ``tensorboard/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from kmotion.network import KMotionNet, NetConfig, save_model
from kmotion.simulation.sources import BaseSource, ImageSource, PhantomSource, sample_pairs
from kmotion.simulation.study import StudyConfig, StudySimulator
from model_training.figures import figure2
from model_training.metrics import LOSSES, convergence, summarise

log = logging.getLogger("kmotion.train")


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored with the weights as provenance)."""

    study: StudyConfig = field(default_factory=StudyConfig)
    net: NetConfig = field(default_factory=NetConfig)
    n_train: int = 7700
    n_val: int = 1000
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "none"
    """``none`` or ``cosine`` (to 1 % of ``lr`` over the run)."""
    loss: str = "euclidean"
    fresh: bool = False
    pool: int = 0
    """With ``fresh``: keep a pool of this many simulated pairs and replace ``pool_refresh`` of it each
    epoch (cheaper than fully fresh pairs when simulation dominates); ``n_train`` pairs per epoch from it."""
    pool_refresh: float = 0.25
    augment_swap: bool = False
    """Swap reference and moved for half the pairs; the target becomes the inverse motion (exact)."""
    """Draw new training pairs every epoch (on the fly) instead of the fixed ``n_train`` set."""
    seed: int = 0
    val_seed: int = 1_000_003
    """Seed of the validation phantoms: other images than training (whose seeds start at ``seed``)."""
    device: str = "auto"
    amp: bool = False
    """bfloat16 autocast on CUDA."""
    train_raw: list[str] = field(default_factory=list)
    """Raw-data files (ISMRMRD/fastMRI/twix) whose images serve as training base images."""
    val_raw: list[str] = field(default_factory=list)
    pad_fov: float = 1.0
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.study, dict):
            self.study = StudyConfig(**self.study)
        if isinstance(self.net, dict):
            self.net = NetConfig.from_dict(self.net)
        if self.loss not in LOSSES:
            raise ValueError(f"TrainConfig.loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        if self.lr_schedule not in ("none", "cosine"):
            raise ValueError(f"TrainConfig.lr_schedule must be 'none' or 'cosine', got {self.lr_schedule!r}")
        for name in ("n_train", "n_val", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        # the network's input follows the data
        self.net.crop = self.study.crop

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("progress")
        return d


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def _source(cfg: TrainConfig, files: Sequence[str], device: torch.device) -> BaseSource:
    if not files:
        return PhantomSource(cfg.study, device=device)
    from kmotion.io import load_base_images

    images = []
    for f in files:
        base = load_base_images(f)
        if cfg.pad_fov > 1:
            base = base.padded(cfg.pad_fov)
        if tuple(base.images.shape[-2:]) != cfg.study.matrix:
            base = base.resized(cfg.study.matrix)
        images.append(base.as_tensor())
    n_ch = {im.shape[1] for im in images}
    if len(n_ch) != 1:
        raise ValueError(
            f"raw files have different coil counts {sorted(n_ch)}; use files with one coil count"
        )
    return ImageSource(torch.cat(images), cfg.study)


def make_pairs(
    sim: StudySimulator, source: BaseSource, n: int, seed: int, chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` simulated pairs (inputs, targets), deterministic by ``seed``, on the simulator's device."""
    g = torch.Generator(device=sim.device).manual_seed(seed)
    xs, ys = [], []
    for start in range(0, n, chunk):
        b = sample_pairs(sim, source, min(chunk, n - start), g)
        xs.append(b.inputs)
        ys.append(b.targets)
    return torch.cat(xs), torch.cat(ys)


def swap_half(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, spacing: tuple[float, float], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap reference and moved channels of a random half of the pairs and invert their motion.

    If ``g = T_t R_phi f`` then ``f = T_t' R_-phi g`` with ``t' = -R(-phi) t`` (t in mm): exact.
    """
    flip = torch.rand(len(x), generator=gen, device=gen.device).to(x.device) < 0.5
    b, c, h, w = x.shape
    swapped = x.reshape(b, c // 4, 4, h, w)[:, :, [2, 3, 0, 1]].reshape(b, c, h, w)
    motion = y * scale  # (dx px, dy px, 0, 0, 0, phi deg)
    dy_mm, dx_mm = spacing
    tx, ty = motion[:, 0] * dx_mm, motion[:, 1] * dy_mm
    rad = torch.deg2rad(motion[:, 5])
    cos, sin = torch.cos(rad), torch.sin(rad)
    inv = motion.clone()
    inv[:, 0] = -(cos * tx + sin * ty) / dx_mm
    inv[:, 1] = -(-sin * tx + cos * ty) / dy_mm
    inv[:, 5] = -motion[:, 5]
    x = torch.where(flip[:, None, None, None], swapped, x)
    y = torch.where(flip[:, None], inv / scale, y)
    return x, y


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    batch: int = 512,
    amp: bool = False,
) -> dict[str, float]:
    """Validation metrics of ``model`` on inputs ``x`` / normalised targets ``y``."""
    model.eval()
    preds = []
    for i in range(0, len(x), batch):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            preds.append(model(x[i : i + batch]).float())
    return summarise(torch.cat(preds), y, scale)


def train(
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Run one training; returns ``{"history", "summary", "paths"}``.

    ``on_epoch(epoch, metrics)`` is called after each validation (e.g. for Optuna's pruning; it may raise).
    """
    rank, world = _dist_info()
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    out = Path(out_dir) if out_dir is not None else None
    torch.manual_seed(cfg.seed)
    study = cfg.study
    sim = StudySimulator(study, device)
    train_src = _source(cfg, cfg.train_raw, device)
    val_src = _source(cfg, cfg.val_raw or cfg.train_raw, device)
    t0 = time.perf_counter()
    x_val, y_val = make_pairs(sim, val_src, cfg.n_val, cfg.val_seed)
    cfg.net.in_channels = x_val.shape[1]
    x_tr = y_tr = None
    if not cfg.fresh:
        x_tr, y_tr = make_pairs(sim, train_src, cfg.n_train, cfg.seed)
    elif cfg.pool > 0:
        x_tr, y_tr = make_pairs(sim, train_src, cfg.pool, cfg.seed + 17 * (rank + 1))
    if rank == 0:
        log.info(
            "simulated %s training and %d validation pairs in %.1f s on %s",
            "on-the-fly" if cfg.fresh else cfg.n_train,
            cfg.n_val,
            time.perf_counter() - t0,
            device,
        )
    scale = study.target_scale().to(device)

    model: nn.Module = KMotionNet(cfg.net).to(device)
    net = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(cfg.n_train / (cfg.batch_size * world))
    sched = None
    if cfg.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=cfg.epochs * steps_per_epoch, eta_min=cfg.lr / 100
        )
    loss_fn = LOSSES[cfg.loss]
    history: list[dict[str, float]] = []
    start_epoch = 1
    best = math.inf
    ckpt_path = out / "checkpoint.pt" if out else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None and "scheduler" in state:
            sched.load_state_dict(state["scheduler"])
        history = json.loads(state["history"])
        start_epoch = int(state["epoch"]) + 1
        best = min((h["mean_inplane_mae"] for h in history), default=math.inf)
        if rank == 0:
            log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
    writer = None
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + rank)
    amp = cfg.amp and device.type == "cuda"

    for epoch in range(start_epoch, cfg.epochs + 1):
        model.train()
        t_epoch = time.perf_counter()
        perm = torch.randperm(cfg.n_train, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        perm = perm[rank::world]
        if cfg.fresh and cfg.pool > 0:
            assert x_tr is not None and y_tr is not None
            if epoch > start_epoch or start_epoch > 1:
                n_new = max(1, int(cfg.pool * cfg.pool_refresh))
                where = torch.randperm(
                    cfg.pool, generator=torch.Generator().manual_seed(cfg.seed * 31 + epoch)
                )
                x_new, y_new = make_pairs(sim, train_src, n_new, cfg.seed + 1000 * epoch + rank)
                where = where[:n_new].to(device)
                x_tr[where] = x_new
                y_tr[where] = y_new
            perm = torch.randint(
                cfg.pool, (len(perm),), generator=torch.Generator().manual_seed(cfg.seed + epoch)
            )
        total, count = 0.0, 0
        bar = tqdm(
            range(0, len(perm), cfg.batch_size),
            desc=f"epoch {epoch}/{cfg.epochs}",
            unit="batch",
            disable=not (cfg.progress and rank == 0),
            leave=False,
        )
        for i in bar:
            if cfg.fresh and cfg.pool == 0:
                b = sample_pairs(sim, train_src, min(cfg.batch_size, len(perm) - i), gen)
                xb, yb = b.inputs, b.targets
            else:
                assert x_tr is not None and y_tr is not None
                idx = perm[i : i + cfg.batch_size].to(device)
                xb, yb = x_tr[idx], y_tr[idx]
            if len(xb) < 2 and cfg.net.batch_norm:
                continue  # batch norm needs two samples
            if cfg.augment_swap:
                xb, yb = swap_half(xb, yb, scale, study.pixel_spacing_mm, gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(model(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.detach().item() * len(xb)
            count += len(xb)
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        train_loss = total / max(count, 1)
        if world > 1:
            t = torch.tensor([total, count], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            train_loss = float(t[0] / t[1].clamp_min(1))
        metrics = evaluate(net, x_val, y_val, scale, amp=amp)
        metrics.update(
            epoch=epoch,
            train_loss=train_loss,
            lr=opt.param_groups[0]["lr"],
            seconds=time.perf_counter() - t_epoch,
            samples_per_s=cfg.n_train / (time.perf_counter() - t_epoch),
        )
        history.append(metrics)
        if rank == 0:
            log.info(
                "epoch %d/%d: train loss %.4f, val loss %.4f, MAE dx %.2f px, dy %.2f px, phi %.2f deg "
                "(%.1f s)",
                epoch,
                cfg.epochs,
                train_loss,
                metrics["euclidean_loss"],
                metrics["mae_dx_px"],
                metrics["mae_dy_px"],
                metrics["mae_phi_deg"],
                metrics["seconds"],
            )
            if writer is not None:
                for k, v in metrics.items():
                    if k != "epoch":
                        writer.add_scalar(
                            k if k.startswith(("train", "lr", "sec", "samp")) else f"val/{k}", v, epoch
                        )
            if out is not None:
                if metrics["mean_inplane_mae"] < best:
                    best = metrics["mean_inplane_mae"]
                    _save_best(net, cfg, history, out)
                state = {
                    "model": net.state_dict(),
                    "optimizer": opt.state_dict(),
                    "epoch": epoch,
                    "history": json.dumps(history),
                }
                if sched is not None:
                    state["scheduler"] = sched.state_dict()
                tmp = out / "checkpoint.pt.tmp"
                torch.save(state, tmp)
                tmp.replace(out / "checkpoint.pt")
                (out / "history.json").write_text(json.dumps(history, indent=1))
                figure2(history, out / "figure2.png", _title(cfg))
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    if writer is not None:
        writer.close()
    summary = convergence(history)
    paths = {}
    if out is not None:
        paths = {
            k: str(out / v)
            for k, v in (
                ("model", "model.safetensors"),
                ("figure2", "figure2.png"),
                ("checkpoint", "checkpoint.pt"),
                ("history", "history.json"),
            )
        }
    return {"history": history, "summary": summary, "paths": paths}


def _title(cfg: TrainConfig) -> str:
    s = cfg.study
    return (
        f"{'fresh' if cfg.fresh else cfg.n_train} training pairs, matrix {s.matrix[0]}x{s.matrix[1]}, "
        f"crop {s.crop[0]}x{s.crop[1]}, k={cfg.net.kernel_size}, n_conv={cfg.net.n_conv}, "
        f"n_fully={cfg.net.n_fully}, {cfg.loss} loss, init {cfg.net.init}"
    )


def _save_best(net: nn.Module, cfg: TrainConfig, history: list[dict[str, float]], out: Path) -> None:
    assert isinstance(net, KMotionNet)
    last = history[-1]
    meta = {
        "study": cfg.study.to_dict(),
        "target_scale": cfg.study.target_scale().tolist(),
        "training": {
            **cfg.to_dict(),
            "epoch": last["epoch"],
            "validation": {
                k: last[k]
                for k in ("mae_dx_px", "mae_dy_px", "mae_phi_deg", "mean_inplane_mae", "euclidean_loss")
            },
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    }
    save_model(out / "model.safetensors", net, meta)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kmotion train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="JSON file with a TrainConfig (command-line options override it)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-val", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-schedule", choices=["none", "cosine"])
    p.add_argument("--loss", choices=sorted(LOSSES))
    p.add_argument("--fresh", action="store_true", default=None, help="new pairs every epoch (on the fly)")
    p.add_argument("--pool", type=int, help="with --fresh: size of the refreshed pool of simulated pairs")
    p.add_argument("--pool-refresh", type=float, help="fraction of the pool replaced every epoch")
    p.add_argument("--augment-swap", action="store_true", default=None, help="swap reference/moved (exact)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--amp", action="store_true", default=None)
    p.add_argument("--matrix", type=int, nargs=2)
    p.add_argument("--fov", type=float, nargs=2)
    p.add_argument("--crop", type=int, nargs=2)
    p.add_argument("--range", type=float, nargs=3, dest="motion_range")
    p.add_argument("--coils", type=int)
    p.add_argument("--snr", type=float)
    p.add_argument("--snr-range", type=float, nargs=2, help="per-image SNR, log-uniform in [LOW, HIGH]")
    p.add_argument("--virtual-coils", type=int, help="compress coils to this many virtual coils (SVD)")
    p.add_argument("--no-standardise", action="store_true")
    p.add_argument("--kernel-size", type=int)
    p.add_argument("--n-conv", type=int)
    p.add_argument("--n-fully", type=int)
    p.add_argument("--downsample", choices=["stride", "maxpool"])
    p.add_argument("--downsample-factor", type=int)
    p.add_argument("--max-channels", type=int)
    p.add_argument("--init", choices=["uniform", "xavier"])
    p.add_argument("--features", choices=["reim", "reim+mag", "reim+mag+cross"])
    p.add_argument("--min-size", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--no-batch-norm", action="store_true")
    p.add_argument("--train-raw", nargs="*", help="raw-data files as training base images")
    p.add_argument("--val-raw", nargs="*", help="raw-data files as validation base images")
    p.add_argument("--pad-fov", type=float)
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    base: dict[str, Any] = json.loads(Path(args.config).read_text()) if args.config else {}
    study = dict(base.get("study", {}))
    net = dict(base.get("net", {}))
    for key, dest in (
        ("matrix", "matrix"),
        ("fov", "fov_mm"),
        ("crop", "crop"),
        ("motion_range", "motion_range"),
        ("coils", "n_coils"),
        ("snr", "snr"),
        ("snr_range", "snr_range"),
        ("virtual_coils", "virtual_coils"),
    ):
        if getattr(args, key) is not None:
            study[dest] = getattr(args, key)
    if args.no_standardise:
        study["standardise"] = False
    for key in (
        "kernel_size",
        "n_conv",
        "n_fully",
        "downsample",
        "downsample_factor",
        "max_channels",
        "init",
        "features",
        "min_size",
    ):
        if getattr(args, key) is not None:
            net[key] = getattr(args, key)
    if args.no_batch_norm:
        net["batch_norm"] = False
    top = {k: v for k, v in base.items() if k not in ("study", "net")}
    for key in (
        "n_train",
        "n_val",
        "epochs",
        "batch_size",
        "lr",
        "lr_schedule",
        "loss",
        "fresh",
        "pool",
        "pool_refresh",
        "augment_swap",
        "seed",
        "device",
        "amp",
        "train_raw",
        "val_raw",
        "pad_fov",
        "weight_decay",
    ):
        if getattr(args, key) is not None:
            top[key] = getattr(args, key)
    if args.no_progress:
        top["progress"] = False
    return TrainConfig(study=StudyConfig(**study), net=NetConfig.from_dict(net), **top)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"kmotion train: error: {exc}")
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if resolve_device(cfg.device).type == "cuda" else "gloo"
        dist.init_process_group(backend)
    try:
        result = train(cfg, args.out, resume=args.resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    s = result["summary"]
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"summary": s, "paths": result["paths"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
