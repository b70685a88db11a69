"""The network estimator: a trained :class:`~kmotion.network.KMotionNet` with its study settings.

It turns (reference, moved) k-space crops into ``(dx_px, dy_px, phi_deg)`` of the encoded grid and flags
estimates at the edge of the trained range.  Weights load from safetensors without unpickling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kmotion.network import KMotionNet, load_model
from kmotion.physics.standardise import standardise_pair, to_channels
from kmotion.physics.validate import InputError
from kmotion.simulation.study import StudyConfig, compress_coils


@dataclass
class Estimate:
    """Batch of motion estimates."""

    motion: torch.Tensor
    """``(B, 3)``: dx [px], dy [px], phi [deg] on the encoded grid of the study."""
    at_range_edge: torch.Tensor
    """``(B,)`` bool: some parameter is within 5 % of the trained motion range (unreliable)."""


class NetworkEstimator:
    """Runs a trained network on crops; ``device`` is ``auto``, ``cpu`` or ``cuda``."""

    def __init__(self, model: KMotionNet, study: StudyConfig, device: str | torch.device = "auto") -> None:
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.study = study
        self.scale = study.target_scale().to(self.device)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto") -> NetworkEstimator:
        """Load weights + configs written by ``model_training.train`` / :func:`kmotion.network.save_model`."""
        model, info = load_model(path)
        try:
            study = StudyConfig(**info["study"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"{path}: study settings missing or invalid in the model metadata ({exc})"
            ) from exc
        return cls(model, study, device)

    @torch.no_grad()
    def estimate(self, reference: torch.Tensor, moved: torch.Tensor, batch: int = 1024) -> Estimate:
        """Estimate motion from crops ``(B, n_coils, s_y_crop, s_x_crop)`` (complex, as simulated).

        The crops are standardised here (one real scale per pair) when the study used standardisation.
        """
        if reference.shape != moved.shape or reference.ndim != 4:
            raise InputError(
                f"estimate: reference and moved must both be (B, n_coils, s_y, s_x), got "
                f"{tuple(reference.shape)} and {tuple(moved.shape)}"
            )
        expected = (self.model.config.in_channels // 4, *self.model.config.crop)
        if reference.shape[1] > expected[0]:  # more coils than the network reads: virtual coils (SVD)
            reference, moved = compress_coils(
                reference.to(torch.complex64), moved.to(torch.complex64), expected[0]
            )
        if tuple(reference.shape[1:]) != expected:
            raise InputError(
                f"estimate: crops must be (B, {expected[0]}, {expected[1]}, {expected[2]}) for this "
                f"model, got {tuple(reference.shape)}"
            )
        out = []
        for i in range(0, len(reference), batch):
            ref = reference[i : i + batch].to(self.device, torch.complex64)
            mov = moved[i : i + batch].to(self.device, torch.complex64)
            if self.study.standardise:
                ref, mov, _ = standardise_pair(ref, mov)
            out.append(self.model(to_channels(ref, mov)).float())
        pred = torch.cat(out) * self.scale
        motion = pred[:, [0, 1, 5]]
        limit = torch.tensor(self.study.motion_range, device=motion.device)
        edge = (motion.abs() >= 0.95 * limit).any(-1)
        return Estimate(motion=motion.cpu(), at_range_edge=edge.cpu())
