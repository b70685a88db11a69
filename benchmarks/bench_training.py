"""Training throughput: samples per second with the simulation on the fly (fresh pairs every step).

Times ``sample_pairs`` + forward + backward + Adam step for the network at the study's default setting
(matrix 448, crop 64x64, R=2) on CPU and, where present, CUDA; also the pure network step on pre-simulated
pairs, so the two costs can be told apart.

Run:  .venv/bin/python benchmarks/bench_training.py [--device cpu|cuda|all] [--features reim+mag+cross]
"""

from __future__ import annotations

import argparse
import time

import torch

from kmotion.network import KMotionNet, NetConfig
from kmotion.simulation.sources import PhantomSource, sample_pairs
from kmotion.simulation.study import StudyConfig, StudySimulator
from model_training.metrics import euclidean_loss


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def throughput(
    device: str, batch: int, steps: int, net_cfg: NetConfig, study: StudyConfig, amp: bool
) -> tuple:
    sim = StudySimulator(study, device)
    src = PhantomSource(study, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    model = KMotionNet(net_cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = euclidean_loss(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    b = sample_pairs(sim, src, batch, g)
    step(b.inputs, b.targets)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        b = sample_pairs(sim, src, batch, g)
        step(b.inputs, b.targets)
    _sync(device)
    fresh = steps * batch / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(b.inputs, b.targets)
    _sync(device)
    net_only = steps * batch / (time.perf_counter() - t0)
    return fresh, net_only


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--features", default="reim", choices=["reim", "reim+mag", "reim+mag+cross"])
    p.add_argument("--coils", type=int, default=1)
    args = p.parse_args()
    study = StudyConfig(n_coils=args.coils)
    net_cfg = NetConfig(in_channels=4 * args.coils, crop=study.crop, features=args.features)
    print(
        f"kmotion training throughput: matrix {study.matrix}, crop {study.crop}, {args.coils} coil(s), "
        f"features {args.features}, batch {args.batch}, torch {torch.__version__}"
    )
    for device in ["cpu", "cuda"] if args.device == "all" else [args.device]:
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped")
            continue
        name = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} CPU threads"
        steps = args.steps * (20 if device == "cuda" else 1)
        batch = args.batch * (8 if device == "cuda" else 1)
        fresh, net_only = throughput(device, batch, steps, net_cfg, study, amp=device == "cuda")
        print(
            f"{device} ({name}): {fresh:9.0f} samples/s with on-the-fly simulation, "
            f"{net_only:9.0f} samples/s network step only"
        )


if __name__ == "__main__":
    main()
