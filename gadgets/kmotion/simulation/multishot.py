"""Multi-shot (echo-train) Cartesian sampling with rigid motion per shot: orderings, motion patterns, k-space.

Pure simulation, no I/O (the ISMRMRD stream is written by :mod:`kmotion.simulation.intra_scan`).  Axes and
signs as in ``docs/conventions.md``; rows are grid rows of the centred k-space (``ky = row - n_ky // 2``).

Orderings (which rows each echo train reads; ``n_shots = ceil(n_rows / echo_train_length)``)
--------------------------------------------------------------------------------------------
* ``linear``: the acquired rows in ascending ``ky``, cut into consecutive bands (shot ``s`` = rows
  ``s * ETL ... (s + 1) * ETL - 1`` of the sorted list).  Outer bands hold no centre: their translation
  along y is weakly determined (the phase of a band at ``|ky| = k0`` repeats every ``n_y / k0`` pixels).
* ``centric``: the rows sorted by ``|ky|`` (centre first, alternating sides), cut into consecutive chunks:
  shot 0 holds the centre, later shots two symmetric outer bands.
* ``interleaved``: shot ``s`` takes every ``n_shots``-th row of the sorted list, starting at ``s`` (each
  shot spans k-space).
* ``checkered``: the central ``2 * n_shots`` rows (or the calibration block when larger; at most
  ``echo_train_length // 2`` pairs per shot) go to the shots two adjacent rows each, round robin; the other
  rows are interleaved as above, dealt in turn to the shots that still have room (each shot spans
  k-space *and* holds a pair of central rows, after DISORDER's distributed orderings, Cordero-Grande et
  al., MRM 2020).
* ``linear_checkered``: like ``checkered`` but the outer rows in consecutive bands of near-equal size.

No shot holds more than ``echo_train_length`` rows; every acquired row is in exactly one shot.

Echo ``j`` of a train is its ``j``-th row in the order listed (ascending ``ky`` within a train; centric:
centre first).  Motion patterns (``steps``, ``drift``, ``jerk``, ``random``) are in :func:`motion_pattern`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kmotion.physics.fft import fft2c
from kmotion.physics.motion import apply_motion_image
from kmotion.physics.validate import InputError

__all__ = [
    "MOTION_PATTERNS",
    "ORDERINGS",
    "MultiShotSampling",
    "acquired_rows",
    "motion_pattern",
    "shot_kspace",
    "shot_sampling",
]

ORDERINGS = ("linear", "centric", "interleaved", "checkered", "linear_checkered")
MOTION_PATTERNS = ("steps", "drift", "jerk", "random", "none")


def acquired_rows(n_ky: int, acceleration: int, calibration_lines: int, parity: int = 0) -> np.ndarray:
    """Sorted grid rows of an R-fold pattern (``(row - n_ky // 2) % R == parity``) + a centred ACS block."""
    c = n_ky // 2
    rows = {r for r in range(n_ky) if (r - c) % acceleration == parity % acceleration}
    lo = c - calibration_lines // 2
    rows |= set(range(max(0, lo), min(n_ky, lo + calibration_lines)))
    return np.array(sorted(rows), dtype=np.int64)


@dataclass(frozen=True)
class MultiShotSampling:
    """Rows of every echo train: ``shots[s]`` the grid rows of shot ``s`` in echo order."""

    n_ky: int
    shots: tuple[tuple[int, ...], ...]
    ordering: str

    @property
    def n_shots(self) -> int:
        """Number of echo trains."""
        return len(self.shots)

    def shot_of_row(self) -> np.ndarray:
        """``(n_ky,)`` the shot of each row (-1: not acquired)."""
        out = np.full(self.n_ky, -1, dtype=np.int64)
        for s, rows in enumerate(self.shots):
            out[list(rows)] = s
        return out

    def echo_of_row(self) -> np.ndarray:
        """``(n_ky,)`` the echo index (position in its train) of each row (-1: not acquired)."""
        out = np.full(self.n_ky, -1, dtype=np.int64)
        for rows in self.shots:
            out[list(rows)] = np.arange(len(rows))
        return out

    def masks(self) -> torch.Tensor:
        """``(n_shots, n_ky)`` bool row masks."""
        m = torch.zeros(self.n_shots, self.n_ky, dtype=torch.bool)
        for s, rows in enumerate(self.shots):
            m[s, list(rows)] = True
        return m


def shot_sampling(
    n_ky: int,
    echo_train_length: int,
    ordering: str = "interleaved",
    acceleration: int = 1,
    calibration_lines: int = 0,
    parity: int = 0,
) -> MultiShotSampling:
    """The echo trains of an ``ordering`` (module docstring) over :func:`acquired_rows`.

    Raises
    ------
    InputError
        For an unknown ordering or a train length below 1.
    """
    if ordering not in ORDERINGS:
        raise InputError(f"ordering: expected one of {ORDERINGS}, got {ordering!r}")
    if echo_train_length < 1:
        raise InputError(f"echo_train_length: expected >= 1, got {echo_train_length}")
    rows = acquired_rows(n_ky, acceleration, calibration_lines, parity)
    n_shots = -(-rows.size // echo_train_length)
    c = n_ky // 2
    if ordering == "linear":
        shots = [rows[s * echo_train_length : (s + 1) * echo_train_length] for s in range(n_shots)]
    elif ordering == "centric":
        order = sorted(rows.tolist(), key=lambda r: (abs(r - c), r))
        chunks = [order[s * echo_train_length : (s + 1) * echo_train_length] for s in range(n_shots)]
        shots = [np.array(ch) for ch in chunks]
    elif ordering == "interleaved":
        shots = [rows[s::n_shots] for s in range(n_shots)]
    else:
        n_central = max(2 * n_shots, calibration_lines)
        # at most echo_train_length // 2 pairs per train (a train never exceeds the echo-train length)
        n_central = min(
            n_central - n_central % 2, rows.size - rows.size % 2, 2 * n_shots * (echo_train_length // 2)
        )
        dist = np.abs(rows - c)
        central = np.sort(rows[np.argsort(dist, kind="stable")[:n_central]])
        outer = np.setdiff1d(rows, central)
        pairs = [central[i : i + 2] for i in range(0, central.size, 2)]
        extra: list[list[int]] = [[] for _ in range(n_shots)]
        for i, pr in enumerate(pairs):
            extra[i % n_shots].extend(pr.tolist())
        room = [echo_train_length - len(e) for e in extra]
        if ordering == "checkered":
            outer_split = _round_robin(outer, room)
        else:
            outer_split = _bands(outer, room)
        shots = [np.array(sorted(outer_split[s].tolist() + extra[s]), dtype=np.int64) for s in range(n_shots)]
    if ordering != "centric":
        shots = [np.sort(s) for s in shots]
    shots = [s for s in shots if s.size]
    return MultiShotSampling(n_ky, tuple(tuple(int(r) for r in s) for s in shots), ordering)


def _round_robin(rows: np.ndarray, room: list[int]) -> list[np.ndarray]:
    """Deal ``rows`` to the trains in turn (row ``i`` to train ``i % n``), skipping trains without room."""
    n = len(room)
    out: list[list[int]] = [[] for _ in range(n)]
    s = 0
    for r in rows.tolist():
        while len(out[s]) >= room[s]:
            s = (s + 1) % n
        out[s].append(r)
        s = (s + 1) % n
    return [np.array(o, dtype=np.int64) for o in out]


def _bands(rows: np.ndarray, room: list[int]) -> list[np.ndarray]:
    """Cut ``rows`` into ``n`` consecutive bands of near-equal size, none larger than its train's ``room``
    (the excess of a full band goes to the nearest bands with room)."""
    n = len(room)
    sizes = np.diff(np.linspace(0, rows.size, n + 1).round().astype(int))
    for s in range(n):
        excess = int(sizes[s]) - room[s]
        if excess <= 0:
            continue
        sizes[s] = room[s]
        for t in sorted(range(n), key=lambda t: (abs(t - s), t)):
            take = min(excess, room[t] - int(sizes[t]))
            if take > 0:
                sizes[t] += take
                excess -= take
            if excess == 0:
                break
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [rows[bounds[s] : bounds[s + 1]] for s in range(n)]


def motion_pattern(
    n_shots: int,
    pattern: str = "steps",
    max_mm: float = 10.0,
    max_deg: float = 10.0,
    pixel_spacing_mm: tuple[float, float] = (1.0, 1.0),
    seed: int = 0,
    reference_shot: int | None = None,
) -> np.ndarray:
    """``(n_shots, 3)`` rigid poses ``(dx_px, dy_px, phi_deg)`` per echo train, within ``max_mm``/``max_deg``.

    * ``steps``: 2-4 abrupt changes at random trains, the pose constant in between;
    * ``drift``: a slow smooth drift (a random quarter to half sine period) from the first to the last train;
    * ``jerk``: still, one sudden move at a random train, still again (the new pose);
    * ``random``: an independent pose per train (worst case, no continuity);
    * ``none``: all zero.

    With ``reference_shot`` the poses are shifted so that that train is at zero (the gauge of a scan: the
    pose of the train that holds the k-space centre).
    """
    if pattern not in MOTION_PATTERNS:
        raise InputError(f"motion pattern: expected one of {MOTION_PATTERNS}, got {pattern!r}")
    rng = np.random.default_rng([seed, 31])
    dy_mm, dx_mm = pixel_spacing_mm
    lim = np.array([max_mm, max_mm, max_deg])

    def draw() -> np.ndarray:
        return rng.uniform(-1, 1, 3) * lim

    out = np.zeros((n_shots, 3))
    if pattern == "steps":
        n_steps = int(rng.integers(2, 5))
        at = np.sort(
            rng.choice(np.arange(1, max(2, n_shots)), size=min(n_steps, max(1, n_shots - 1)), replace=False)
        )
        pose = np.zeros(3)
        for s in range(n_shots):
            if s in at:
                pose = draw()
            out[s] = pose
    elif pattern == "drift":
        end = draw()
        frac = rng.uniform(0.25, 0.5)
        t = np.linspace(0, 1, n_shots)
        out = np.sin(t * 2 * math.pi * frac)[:, None] / math.sin(2 * math.pi * frac) * end[None]
    elif pattern == "jerk":
        start = int(rng.integers(1, max(2, n_shots)))
        out[start:] = draw()
    elif pattern == "random":
        out = np.stack([draw() for _ in range(n_shots)])
    out = np.clip(out, -lim, lim)
    if reference_shot is not None:
        out = out - out[reference_shot]
    out[:, 0] /= dx_mm
    out[:, 1] /= dy_mm
    return out


def shot_kspace(
    image: torch.Tensor,
    maps: torch.Tensor,
    sampling: MultiShotSampling,
    motion: np.ndarray | torch.Tensor,
    pixel_spacing_mm: tuple[float, float] = (1.0, 1.0),
    t2_decay: np.ndarray | None = None,
    readout_oversampling: int = 1,
) -> torch.Tensor:
    """Noise-free multi-coil k-space ``(n_coils, n_ky, n_kx)`` of one slice acquired shot by shot.

    ``n_kx = readout_oversampling * n_x``: with oversampling the coil images of the moved object are
    zero-padded along x (centred, as :mod:`kmotion.simulation.raw` does) before the FFT.

    Parameters
    ----------
    image
        ``(n_y, n_x)`` object in the reference pose.
    maps
        ``(n_coils, n_y, n_x)`` coil maps (scanner frame, they do not move).
    sampling
        The echo trains (rows not acquired stay zero).
    motion
        ``(n_shots, 3)`` pose of each train.
    t2_decay
        Optional ``(echo_train_length,)`` amplitude of each echo (e.g. ``exp(-TE_j / T2)``): row ``r`` read at
        echo ``j`` is scaled by ``t2_decay[j]``.
    readout_oversampling
        Readout oversampling factor (1 or 2).

    Raises
    ------
    InputError
        For a motion array that does not have one pose per shot, a ``t2_decay`` shorter than the longest
        train, or an oversampling factor below 1.
    """
    mot = torch.as_tensor(np.asarray(motion), dtype=torch.float64)
    if mot.shape != (sampling.n_shots, 3):
        raise InputError(f"motion: expected shape ({sampling.n_shots}, 3), got {tuple(mot.shape)}")
    longest = max((len(r) for r in sampling.shots), default=0)
    if t2_decay is not None and np.asarray(t2_decay).size < longest:
        raise InputError(f"t2_decay: expected >= {longest} echo amplitudes, got {np.asarray(t2_decay).size}")
    if readout_oversampling < 1:
        raise InputError(f"readout_oversampling: expected >= 1, got {readout_oversampling}")
    n_x = maps.shape[-1]
    n_ro = readout_oversampling * n_x
    x0 = n_ro // 2 - n_x // 2
    out = torch.zeros((*maps.shape[:-1], n_ro), dtype=torch.complex64)
    echo = sampling.echo_of_row()
    rows_of_pose: dict[tuple[float, float, float], list[int]] = {}  # shots sharing a pose: one FFT
    for s, rows in enumerate(sampling.shots):
        pose = (float(mot[s, 0]), float(mot[s, 1]), float(mot[s, 2]))
        rows_of_pose.setdefault(pose, []).extend(rows)
    for (dx, dy, phi), r in rows_of_pose.items():
        moved = (
            apply_motion_image(image[None], dx, dy, phi, pixel_spacing_mm)[0]
            if (dx, dy, phi) != (0, 0, 0)
            else image
        )
        coil_img = maps * moved[None]
        if n_ro != n_x:
            padded = torch.zeros((*coil_img.shape[:-1], n_ro), dtype=torch.complex64)
            padded[..., x0 : x0 + n_x] = coil_img
            coil_img = padded
        out[:, r] = fft2c(coil_img)[:, r]
    if t2_decay is not None:
        acquired = np.flatnonzero(echo >= 0)
        amp = torch.as_tensor(np.asarray(t2_decay)[echo[acquired]], dtype=torch.float32)
        out[:, acquired] *= amp[None, :, None]
    return out
