"""The abstract's Figure 2: Euclidean loss (training and validation) and each parameter's absolute error."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from model_training.metrics import PARAM_NAMES  # noqa: E402


def figure2(history: list[dict[str, float]], path: Path, title: str = "") -> Path:
    """Write Figure 2 for a training history (one dict per epoch) and return its path."""
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(epochs, [h["train_loss"] for h in history], "o-", label="training")
    a.plot(epochs, [h["euclidean_loss"] for h in history], "s-", label="validation")
    a.set_xlabel("epoch")
    a.set_ylabel("Euclidean loss (normalised 6-vector)")
    a.set_yscale("log")
    a.legend()
    a.grid(alpha=0.3)
    units = {"dx": "px", "dy": "px", "dz": "px", "phi_x": "°", "phi_y": "°", "phi_z": "°"}
    for name in PARAM_NAMES:
        b.plot(epochs, [h[f"abs_err_{name}"] for h in history], ".-", label=f"{name} [{units[name]}]")
    b.set_xlabel("epoch")
    b.set_ylabel("validation mean absolute error [px / deg]")
    b.set_yscale("symlog", linthresh=0.1)
    b.legend(ncol=2, fontsize=8)
    b.grid(alpha=0.3)
    fig.suptitle(title or "Training curves (cf. the abstract's Figure 2)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
