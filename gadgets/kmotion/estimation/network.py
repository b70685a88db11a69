"""The shipped estimator: a trained :class:`~kmotion.network.KMotionNet` plus a data-consistency refinement.

It turns (reference, moved) k-space crops into ``(dx_px, dy_px, phi_deg)`` of the encoded grid and flags
unreliable estimates.  Weights load from safetensors without unpickling.

With ``refine=True`` (the default) the network's estimate seeds the data-consistency refinement of
:func:`kmotion.estimation.classical.register_classical`: the rotation that maximises the complex coherence
of the two crops (the normalised phase-correlation peak height, the network's angle being one candidate of
the search) and the phase-correlation translation at that angle.  ``refine=False`` returns the network alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kmotion.estimation.classical import register_classical
from kmotion.estimation.prepare import to_network_grid
from kmotion.network import KMotionNet, load_model
from kmotion.physics.standardise import standardise_pair, to_channels
from kmotion.physics.validate import InputError
from kmotion.simulation.study import StudyConfig, compress_coils

_SEARCH_MARGIN = 1.5
"""The refinement of :meth:`NetworkEstimator.estimate_data` searches this multiple of the trained range."""


@dataclass
class Estimate:
    """Batch of motion estimates."""

    motion: torch.Tensor
    """``(B, 3)``: dx [px], dy [px], phi [deg] on the encoded grid of the study."""
    at_range_edge: torch.Tensor
    """``(B,)`` bool: some parameter is within 5 % of the trained motion range (unreliable)."""
    network: torch.Tensor | None = None
    """``(B, 3)`` the network's own estimate (before refinement), when refined."""
    unreliable: torch.Tensor | None = None
    """``(B,)`` bool: at the range edge, or refinement and network disagree by more than 3 px/deg."""


class NetworkEstimator:
    """Runs a trained network on crops; ``device`` is ``auto``, ``cpu`` or ``cuda``."""

    def __init__(
        self, model: KMotionNet, study: StudyConfig, device: str | torch.device = "auto", refine: bool = True
    ) -> None:
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.study = study
        self.scale = study.target_scale().to(self.device)
        self.refine = refine

    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device = "auto", refine: bool = True
    ) -> NetworkEstimator:
        """Load weights + configs written by ``model_training.train`` / :func:`kmotion.network.save_model`."""
        model, info = load_model(path)
        try:
            study = StudyConfig(**info["study"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"{path}: study settings missing or invalid in the model metadata ({exc})"
            ) from exc
        return cls(model, study, device, refine)

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
        net = self._network(reference, moved, batch)
        motion = net
        if self.refine:  # on all coils: the refinement compresses coils its own way
            ref_all, mov_all = (x.to(self.device, torch.complex64) for x in (reference, moved))
            motion = register_classical(ref_all, mov_all, self.study, initial=net.to(self.device)).cpu()
        return _flagged(motion, net, torch.tensor(self.study.motion_range), torch.ones(3), self.refine)

    @torch.no_grad()
    def _network(self, reference: torch.Tensor, moved: torch.Tensor, batch: int = 1024) -> torch.Tensor:
        """The network's own ``(B, 3)`` estimate (CPU) on crops of its grid (no refinement)."""
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
        return pred[:, [0, 1, 5]].cpu()

    @torch.no_grad()
    def estimate_data(
        self,
        reference: torch.Tensor,
        moved: torch.Tensor,
        matrix: tuple[int, int],
        fov_mm: tuple[float, float],
        acceleration: int,
        refine_crop: tuple[int, int] = (128, 256),
    ) -> Estimate:
        """Estimate motion from crops of any matrix and FOV, in the data's own pixels.

        Parameters
        ----------
        reference, moved
            ``(B, n_coils, n_rows, n_kx)``: acquired rows around the centre line (row ``n_rows // 2``, rows
            ``acceleration`` apart, as :func:`~kmotion.physics.sampling.crop_row_indices`) and *all*
            readout samples of the data's encoded grid.
        matrix, fov_mm
            ``(n_y, n_x)`` and ``(FOV_y, FOV_x)`` of the encoded grid (``n_x == n_kx``).
        refine_crop
            At most this many central rows x readout samples are used by the refinement.

        Returns
        -------
        :class:`Estimate` with ``dx`` [px of the data's readout], ``dy`` [px of its phase encoding], ``phi``
        [deg].  The network reads the crops resampled to its grid
        (:func:`~kmotion.estimation.prepare.to_network_grid`); its estimate, converted to the data's pixels,
        seeds the refinement on the data's own crop, which searches 1.5 x the trained motion range (in mm;
        estimates beyond the trained range are flagged ``at_range_edge``).
        """
        n_rows, n_kx = reference.shape[-2:]
        if n_kx != matrix[1]:
            raise InputError(f"estimate_data: crops must hold all {matrix[1]} readout samples, got {n_kx}")
        ref_n, mov_n, grid = to_network_grid(reference, moved, fov_mm, self.study.matrix, self.study.crop)
        dy_mm, dx_mm = fov_mm[0] / matrix[0], fov_mm[1] / matrix[1]
        to_px = torch.tensor([grid.mm_per_net_px[1] / dx_mm, grid.mm_per_net_px[0] / dy_mm, 1.0])
        net = self._network(ref_n, mov_n) * to_px
        rng = self.study.motion_range
        range_px = (rng[0] * float(to_px[0]), rng[1] * float(to_px[1]), rng[2])
        if not self.refine:
            return _flagged(net, net, torch.tensor(range_px), to_px, refined=False)
        s_y, s_x = min(n_rows, refine_crop[0]), min(n_kx, refine_crop[1])
        r0, c0 = n_rows // 2 - s_y // 2, n_kx // 2 - s_x // 2
        config = replace(
            self.study,
            matrix=(int(matrix[0]), int(matrix[1])),
            fov_mm=(float(fov_mm[0]), float(fov_mm[1])),
            acceleration=acceleration,
            crop=(s_y, s_x),
            motion_range=(
                _SEARCH_MARGIN * range_px[0],
                _SEARCH_MARGIN * range_px[1],
                _SEARCH_MARGIN * range_px[2],
            ),
        )
        ref_c = reference[..., r0 : r0 + s_y, c0 : c0 + s_x].to(self.device, torch.complex64)
        mov_c = moved[..., r0 : r0 + s_y, c0 : c0 + s_x].to(self.device, torch.complex64)
        motion = register_classical(ref_c, mov_c, config, initial=net.to(self.device)).cpu()
        return _flagged(motion, net, torch.tensor(range_px), to_px, refined=True)


def _flagged(
    motion: torch.Tensor, net: torch.Tensor, limit: torch.Tensor, unit: torch.Tensor, refined: bool
) -> Estimate:
    """``motion`` with its flags: within 5 % of the trained range ``limit`` (``(3,)``), or more than
    3 network px/deg (``3 * unit`` in the units of ``motion``) away from the network's estimate ``net``."""
    edge = (motion.abs() >= 0.95 * limit).any(-1)
    unreliable = edge | ((motion - net).abs() > 3.0 * unit).any(-1)
    return Estimate(
        motion=motion, at_range_edge=edge, network=net if refined else None, unreliable=unreliable
    )
