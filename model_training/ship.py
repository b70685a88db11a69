"""Produce the shipped estimator: train with ``configs/shipped.json``, then install it in the package.

    python -m model_training.ship --out runs/shipped 2>&1 | tee model_training/logs/shipped.log

trains (resumable: run the same command again after an interruption) and copies the best weights to
``gadgets/kmotion/models/default.safetensors`` (+ ``default.json``), the gadget's default model.
``--install-only`` installs the current best weights of ``--out`` without training (e.g. after stopping a
long run early).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from kmotion.network.storage import read_meta
from model_training.train import main as train_main

CONFIG = Path(__file__).with_name("configs") / "shipped.json"
TARGET = Path(__file__).resolve().parents[1] / "gadgets" / "kmotion" / "models" / "default.safetensors"


def install(weights: Path, target: Path = TARGET) -> Path:
    """Copy trained weights (and their JSON) into the package after checking they load."""
    info = read_meta(weights)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, target)
    target.with_suffix(".json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/shipped")
    p.add_argument("--install-only", action="store_true")
    p.add_argument("--device", default="auto")
    args, extra = p.parse_known_args(argv)
    if not args.install_only:
        rc = train_main(
            [
                "--config",
                str(CONFIG),
                "--out",
                args.out,
                "--resume",
                "--device",
                args.device,
                "--no-progress",
                *extra,
            ]
        )
        if rc:
            return rc
    target = install(Path(args.out) / "model.safetensors")
    logging.getLogger("kmotion.ship").info("installed %s", target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
