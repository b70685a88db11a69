"""The per-shot network: a fast k-space estimate of one echo train's rigid pose, as a seed for the fit.

A :class:`~kmotion.network.KMotionNet` with a mask channel and 3 outputs reads, per shot,

* the reference's k-space on *every* row of a central crop (e.g. the reference image encoded with the coil
  maps, ``F C x_ref``; the network was trained on a fully sampled reference crop),
* the shot's rows on the same grid, zero-filled, and the 0/1 mask of those rows,

and returns ``(dx_px, dy_px, phi_deg)``: the pose of the object during the shot relative to the reference
(``docs/conventions.md``), in the data's own pixels.  Its role is the seed of the data-consistency fit of
:func:`kmotion.estimation.shots.fit_shots` (``docs/intra_scan.md``, "The per-shot network and its ablation").

Input preparation (:func:`shot_inputs`, shared by training and inference): the coils are compressed to
``n_virtual`` virtual coils (SVD of the reference crop, the same weights for the shot: receive coils do not
move), both crops are divided by one real scale (the RMS of the reference crop; the shot is sparse), and the
channels are ``(Re ref, Im ref, Re shot, Im shot)`` per virtual coil followed by the mask.

Grids: data of any matrix and FOV are brought to the network's grid as for the shipped network
(:func:`kmotion.estimation.prepare.to_network_grid`: the readout is resampled to the phase-encoding FOV, the
central ``crop`` rows x readout samples are kept).  The network's crop must hold some rows of the shot: a
shot with no row among the central ``crop[0]`` rows (an outer band of a linear ordering) gets no seed
(``valid`` False, motion NaN).  The network was trained on one geometry (``ShotGrid``: 256 x 256, FOV 220 mm);
other matrices work through the resampling but were not trained for.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from kmotion.estimation.prepare import to_network_grid
from kmotion.network import KMotionNet, load_model
from kmotion.physics.standardise import to_channels
from kmotion.physics.validate import InputError

__all__ = ["ShotGrid", "ShotNetworkEstimator", "ShotSeeds", "crop_shot_grid", "shot_inputs", "virtual_coils"]


@dataclass
class ShotGrid:
    """The geometry a per-shot network was trained on (stored with its weights as ``shot_grid``)."""

    matrix: tuple[int, int] = (256, 256)
    """Encoded matrix ``(n_y, n_x)`` of the training data; the network's pixels are ``fov_mm / matrix``."""
    fov_mm: tuple[float, float] = (220.0, 220.0)
    crop: tuple[int, int] = (128, 64)
    """Central rows x readout samples the network reads (every row, acquired or not)."""
    motion_mm: float = 10.0
    """Trained translation range (+-, mm)."""
    motion_deg: float = 10.0
    """Trained rotation range (+-, deg)."""
    target_margin: float = 1.1
    """Targets are the pose / (range * margin)."""
    n_virtual: int = 2
    """Virtual coils the network reads."""

    def __post_init__(self) -> None:
        self.matrix = (int(self.matrix[0]), int(self.matrix[1]))
        self.fov_mm = (float(self.fov_mm[0]), float(self.fov_mm[1]))
        self.crop = (int(self.crop[0]), int(self.crop[1]))
        if min(self.matrix) < 2 or min(self.fov_mm) <= 0:
            raise InputError(
                f"ShotGrid: matrix >= 2 and fov_mm > 0 expected, got {self.matrix}, {self.fov_mm}"
            )
        if not (1 <= self.crop[0] <= self.matrix[0] and 1 <= self.crop[1] <= self.matrix[1]):
            raise InputError(f"ShotGrid.crop: expected within the matrix {self.matrix}, got {self.crop}")
        if self.motion_mm <= 0 or self.motion_deg <= 0 or self.n_virtual < 1:
            raise InputError(
                "ShotGrid: motion_mm, motion_deg > 0 and n_virtual >= 1 expected, got "
                f"{self.motion_mm}, {self.motion_deg}, {self.n_virtual}"
            )

    @property
    def pixel_spacing_mm(self) -> tuple[float, float]:
        """``(dy_mm, dx_mm)`` of the network's grid."""
        return self.fov_mm[0] / self.matrix[0], self.fov_mm[1] / self.matrix[1]

    def motion_range(self) -> torch.Tensor:
        """``(3,)`` trained range: dx [px], dy [px], phi [deg] of the network's grid."""
        dy_mm, dx_mm = self.pixel_spacing_mm
        return torch.tensor([self.motion_mm / dx_mm, self.motion_mm / dy_mm, self.motion_deg])

    def target_scale(self) -> torch.Tensor:
        """``(3,)`` divisor of the targets ``(dx_px, dy_px, phi_deg)``."""
        return self.motion_range() * self.target_margin

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShotGrid:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"ShotGrid: unknown fields {sorted(unknown)}")
        return cls(**d)


def virtual_coils(
    reference: torch.Tensor, shot: torch.Tensor, n_virtual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress ``(P, n_coils, s_y, s_x)`` crops to the ``n_virtual`` strongest virtual coils of each
    reference.

    The weights are the leading eigenvectors of the reference's coil Gram matrix (= its left singular vectors,
    as :func:`kmotion.simulation.study.compress_coils`, without the cost of an SVD of the samples); the same
    weights apply to the shot.  The arbitrary phase of each virtual coil is fixed by making its reference's
    ``ky = kx = 0`` sample real and positive.
    """
    p, c, h, w = reference.shape
    flat = reference.reshape(p, c, h * w)
    gram = flat @ flat.conj().transpose(1, 2)
    _, vec = torch.linalg.eigh(gram.to(torch.complex128))
    weights = vec[:, :, -n_virtual:].flip(-1).conj().transpose(1, 2).to(reference.dtype)  # (P, V, C)
    dc = (weights @ flat[:, :, (h // 2) * w + w // 2 : (h // 2) * w + w // 2 + 1])[..., 0]
    phase = torch.where(dc.abs() > 0, dc.conj() / dc.abs().clamp_min(1e-30), torch.ones_like(dc))
    weights = weights * phase[..., None]
    return (
        (weights @ flat).reshape(p, n_virtual, h, w),
        (weights @ shot.reshape(p, c, h * w)).reshape(p, n_virtual, h, w),
    )


def shot_inputs(
    reference: torch.Tensor, shot: torch.Tensor, mask: torch.Tensor, n_virtual: int
) -> torch.Tensor:
    """The network's input from crops on its grid.

    Parameters
    ----------
    reference, shot
        ``(P, n_coils, s_y, s_x)`` complex k-space: the reference on every row, the shot's samples (values on
        rows outside ``mask`` are ignored).
    mask
        ``(P, s_y)`` bool or 0/1: the rows of the shot.
    n_virtual
        Virtual coils (SVD of each reference crop; zero coils are added when there are fewer coils).

    Returns
    -------
    ``(P, 4 * n_virtual + 1, s_y, s_x)`` float32.
    """
    if reference.shape != shot.shape or reference.ndim != 4:
        raise InputError(
            f"shot_inputs: reference and shot must both be (P, n_coils, s_y, s_x), got "
            f"{tuple(reference.shape)} and {tuple(shot.shape)}"
        )
    p, n_c, s_y, s_x = reference.shape
    if tuple(mask.shape) != (p, s_y):
        raise InputError(f"shot_inputs: mask must be ({p}, {s_y}), got {tuple(mask.shape)}")
    m = mask.to(reference.device, torch.float32)
    ref = reference.to(torch.complex64)
    mov = shot.to(torch.complex64) * m[:, None, :, None]
    if n_c > n_virtual:
        ref, mov = virtual_coils(ref, mov, n_virtual)
    elif n_c < n_virtual:
        pad = torch.zeros((p, n_virtual - n_c, s_y, s_x), dtype=ref.dtype, device=ref.device)
        ref, mov = torch.cat([ref, pad], 1), torch.cat([mov, pad], 1)
    scale = ref.abs().square().mean(dim=(1, 2, 3)).sqrt().clamp_min(1e-30).reshape(-1, 1, 1, 1)
    x = to_channels(ref / scale, mov / scale).to(torch.float32)
    return torch.cat([x, m[:, None, :, None].expand(p, 1, s_y, s_x)], 1)


def _central_rows(x: torch.Tensor, s_y: int) -> torch.Tensor:
    """The central ``s_y`` rows of ``(..., n_rows, n_kx)`` (row ``n_rows // 2`` to row ``s_y // 2``); with
    fewer rows, zero rows are added (k-space beyond the data's is empty)."""
    n_rows = x.shape[-2]
    if n_rows < s_y:
        lo = s_y // 2 - n_rows // 2
        return torch.nn.functional.pad(x, (0, 0, lo, s_y - n_rows - lo))
    r0 = n_rows // 2 - s_y // 2
    return x[..., r0 : r0 + s_y, :]


def crop_shot_grid(
    reference: torch.Tensor,
    shots: torch.Tensor,
    masks: torch.Tensor,
    fov_mm: tuple[float, float],
    grid: ShotGrid,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[float, float]]:
    """Bring ``(P, n_coils, n_rows, n_kx)`` reference/shot k-space (row ``n_rows // 2`` the centre, every row,
    all readout samples) and ``(P, n_rows)`` masks to the network's crop (fewer rows than the crop: zero rows
    are added).  Returns the crops, the cropped masks and the mm per network pixel ``(y, x)``."""
    s_y = grid.crop[0]
    reference, shots = _central_rows(reference, s_y), _central_rows(shots, s_y)
    m = _central_rows(masks.to(torch.float32)[:, :, None], s_y)[:, :, 0]
    ref_n, shot_n, gmap = to_network_grid(reference, shots, fov_mm, grid.matrix, grid.crop)
    return ref_n, shot_n, m, gmap.mm_per_net_px


@dataclass
class ShotSeeds:
    """The network's estimate of ``P`` shots."""

    motion: torch.Tensor
    """``(P, 3)`` float64: dx [px of the data's readout], dy [px of its phase encoding], phi [deg]; NaN for
    shots without a seed."""
    valid: torch.Tensor
    """``(P,)`` bool: the shot has rows in the network's crop (else no seed)."""
    at_range_edge: torch.Tensor
    """``(P,)`` bool: some parameter within 5 % of the trained range (the network saturates there)."""


class ShotNetworkEstimator:
    """A trained per-shot network (``gadgets/kmotion/models/shot.safetensors``); ``device``: auto, cpu, cuda.

    Raises
    ------
    InputError
        On :meth:`load` of a file that is not a per-shot network (no ``shot_grid`` or no mask channel).
    """

    def __init__(self, model: KMotionNet, grid: ShotGrid, device: str | torch.device = "auto") -> None:
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        cfg = model.config
        if not cfg.mask_channel or cfg.n_outputs != 3:
            raise InputError(
                f"per-shot network: expected mask_channel=True and n_outputs=3, got {cfg.mask_channel} and "
                f"{cfg.n_outputs}"
            )
        if cfg.in_channels != 4 * grid.n_virtual + 1 or tuple(cfg.crop) != grid.crop:
            raise InputError(
                f"per-shot network: input ({cfg.in_channels}, {cfg.crop}) does not match the grid "
                f"({4 * grid.n_virtual + 1}, {grid.crop})"
            )
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.grid = grid

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto") -> ShotNetworkEstimator:
        """Load weights and their ``shot_grid`` written by ``model_training.shot_train``."""
        model, info = load_model(path)
        if "shot_grid" not in info:
            raise InputError(f"{path}: not a per-shot network (field 'shot_grid' missing in its metadata)")
        try:
            grid = ShotGrid.from_dict(info["shot_grid"])
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path}: shot_grid: {exc}") from exc
        try:
            return cls(model, grid, device)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from exc

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """``(P, 3)`` network-grid pose ``(dx_px, dy_px, phi_deg)`` from :func:`shot_inputs`."""
        out = [
            self.model(inputs[i : i + batch].to(self.device)).float().cpu()
            for i in range(0, len(inputs), batch)
        ]
        return torch.cat(out) * self.grid.target_scale()

    @torch.no_grad()
    def estimate(
        self,
        reference: torch.Tensor,
        shots: torch.Tensor,
        masks: torch.Tensor,
        matrix: tuple[int, int],
        fov_mm: tuple[float, float],
        slice_index: torch.Tensor | None = None,
    ) -> ShotSeeds:
        """Seeds of ``P`` shots in the data's pixels.

        Parameters
        ----------
        reference
            ``(B, n_coils, n_rows, n_kx)`` complex reference k-space of ``B`` slices on every row of a central
            band (row ``n_rows // 2`` is ``ky = 0``; the whole grid or at least the network's crop) and all
            readout samples (``n_kx == matrix[1]``, oversampled readouts included as encoded).
        shots
            ``(P, n_coils, n_rows, n_kx)`` the shots' samples on the same rows (other rows ignored).
        masks
            ``(P, n_rows)`` bool: the rows of each shot.
        matrix, fov_mm
            ``(n_y, n_x)`` and ``(FOV_y, FOV_x)`` of the encoded grid (pixel sizes of the answer).
        slice_index
            ``(P,)`` the reference of each shot (default: 0 for all when ``B == 1``, else ``arange(P)``).

        Raises
        ------
        InputError
            For shapes that do not match (names the argument, expected vs got).
        """
        if reference.ndim != 4 or shots.ndim != 4 or reference.shape[1:] != shots.shape[1:]:
            raise InputError(
                f"estimate: reference (B, C, n_rows, n_kx) and shots (P, C, n_rows, n_kx) expected, got "
                f"{tuple(reference.shape)} and {tuple(shots.shape)}"
            )
        p, _, n_rows, n_kx = shots.shape
        if tuple(masks.shape) != (p, n_rows):
            raise InputError(f"estimate: masks must be ({p}, {n_rows}), got {tuple(masks.shape)}")
        if n_kx != matrix[1]:
            raise InputError(f"estimate: the k-space must hold all {matrix[1]} readout samples, got {n_kx}")
        if slice_index is None:
            slice_index = torch.zeros(p, dtype=torch.long) if len(reference) == 1 else torch.arange(p)
        if len(slice_index) != p or int(slice_index.max()) >= len(reference):
            raise InputError(
                f"estimate: slice_index must be ({p},) in [0, {len(reference)}), got {slice_index}"
            )
        ref_rows = _central_rows(reference, self.grid.crop[0])[slice_index.cpu()]
        ref_n, shot_n, mask_n, mm = crop_shot_grid(ref_rows, shots, masks, fov_mm, self.grid)
        x = shot_inputs(
            ref_n.to(self.device), shot_n.to(self.device), mask_n.to(self.device), self.grid.n_virtual
        )
        net = self.predict(x).double()
        rng = self.grid.motion_range().double()
        edge = (net.abs() >= 0.95 * rng).any(-1)
        dy_mm, dx_mm = fov_mm[0] / matrix[0], fov_mm[1] / matrix[1]
        to_px = torch.tensor([mm[1] / dx_mm, mm[0] / dy_mm, 1.0], dtype=torch.float64)
        motion = net * to_px
        valid = mask_n.cpu().sum(-1) > 0
        motion[~valid] = math.nan
        return ShotSeeds(motion=motion, valid=valid, at_range_edge=edge & valid)
