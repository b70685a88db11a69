"""Produce the shipped per-shot network: train with ``configs/shot.json``, then install it in the package.

    python -m model_training.ship_shot --out runs/shot 2>&1 | tee model_training/logs/shot.log

trains (resumable: run the same command again after an interruption) and copies the best weights to
``gadgets/kmotion/models/shot.safetensors`` (+ ``shot.json``) and the training curve to
``docs/img/figure2_shot.png``.  ``--install-only`` installs the current best weights of ``--out`` without
training.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from kmotion.estimation.shot_network import ShotNetworkEstimator
from model_training.ship import install
from model_training.shot_train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = Path(__file__).with_name("configs") / "shot.json"
TARGET = ROOT / "gadgets" / "kmotion" / "models" / "shot.safetensors"
FIGURE = ROOT / "docs" / "img" / "figure2_shot.png"


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/shot")
    p.add_argument("--install-only", action="store_true")
    p.add_argument("--device", default="auto")
    args, extra = p.parse_known_args(argv)
    if not args.install_only:
        rc = train_main(
            ["--config", str(CONFIG), "--out", args.out, "--resume", "--device", args.device, *extra]
        )
        if rc:
            return rc
    weights = Path(args.out) / "model.safetensors"
    ShotNetworkEstimator.load(weights, "cpu")  # refuses anything that is not a per-shot network
    target = install(weights, TARGET)
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(args.out) / "figure2.png", FIGURE)
    logging.getLogger("kmotion.ship").info("installed %s and %s", target, FIGURE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
