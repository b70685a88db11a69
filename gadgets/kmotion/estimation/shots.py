"""Rigid motion of each echo train (shot) by data consistency with a reference image (SAMER-type fit).

Pure math, no I/O; batched torch (CPU and CUDA).  Axes as in ``docs/conventions.md``.

Model
-----
Slice ``b`` was acquired in shots ``s``; shot ``s`` holds the k-space samples ``M_s`` and saw the object at
the rigid pose ``theta_s = (dx_px, dy_px, phi_deg)`` relative to the reference image ``x_ref`` (coils fixed
in the scanner frame, motion within a shot out of scope).  For every shot independently

``theta_s = argmin_theta ||M_s F C T(theta) x_ref - y_s||^2``

(Polak et al., SAMER, MRM 2022; Cordero-Grande et al., aligned SENSE, MRM 2016).  With one shot holding a
whole repetition this is the registration of that repetition to a reference one.

Method
------
1. **Global initialisation** (:func:`coarse_search`): for every angle of a grid the reference is rotated and
   encoded once per slice; each shot's coil-summed cross-spectrum with it (on the shot's rows only), inverse
   transformed once, is the correlation over all integer translations; its real part minus the shot energy
   of the rotated reference is the least-squares score.  The best angles (local maxima of the score over the
   grid) with their best translations (sub-pixel by a parabola, within ``max_translation_px``) are the
   candidates; each angle also gives a second translation apart along y (narrow-band shots of a linear
   ordering have near-equal minima along y: the phase of a band at ``|ky| = k0`` repeats every
   ``n_y / k0`` pixels).
2. **Local fit** (:func:`fit_shots`): Levenberg-Marquardt (damped Gauss-Newton) from every candidate, batched
   over shots and candidates.  Jacobian columns: ``-d/dx`` and ``-d/dy`` of the moved image (spectral, exact
   for the translation) and the rotation generator ``(y - t_y) d/dx - (x - t_x) d/dy`` (in mm), each encoded
   on the shot's rows only (partial DFT along y).  Data and maps may first be projected onto a few virtual
   coils (:func:`compress_coils`).
3. **Ambiguity**: of the converged candidates of a shot, those whose RSS is within ``ambiguity_chi2`` (in
   units of the noise) of the best are statistically equivalent; the one closest to its neighbouring shots'
   poses (median of the two trains before and after) is taken and the shot is marked ``ambiguous`` when
   they differ by more than 0.5 px/deg.
4. **Uncertainty and significance**: with complex white noise of variance ``noise_var`` per sample of the
   residual, ``cov(theta) = noise_var / 2 * inv(Re J^H J)`` at the optimum (Cramer-Rao bound of the
   linearised model) and, under "no motion", ``2 (RSS(0) - RSS(theta)) / noise_var`` follows a chi-square
   law with 3 degrees of freedom (likelihood-ratio test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kmotion.physics.fft import centered_indices, ifft1c
from kmotion.physics.rolled import RolledGrid, move_image
from kmotion.physics.validate import InputError

__all__ = [
    "ShotFit",
    "ShotProblems",
    "coarse_search",
    "compress_coils",
    "fit_shots",
    "move_image",
]

Spacing = tuple[float, float]

_Y_UPSAMPLE = 4
"""Translations along y are scored every ``1 / _Y_UPSAMPLE`` px in the global initialisation."""


def compress_coils(
    kspace: torch.Tensor, maps: torch.Tensor, n_virtual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project data and maps onto the ``n_virtual`` strongest virtual coils of each slice (SVD of the data).

    ``kspace`` ``(B, n_coils, n_ky, n_kx)``, ``maps`` ``(B, n_coils, n_y, n_x)``.  The projection is a
    partial unitary over coils, so the model ``y = M F C x`` and white noise keep their form
    (array compression, Buehrer et al., MRM 2007).
    """
    n_c = kspace.shape[1]
    if n_virtual >= n_c:
        return kspace, maps
    p = _coil_projection(kspace, n_virtual)
    k = (p @ kspace.reshape(kspace.shape[0], n_c, -1)).reshape(kspace.shape[0], n_virtual, *kspace.shape[2:])
    m = (p @ maps.reshape(maps.shape[0], n_c, -1).to(p.dtype)).reshape(
        maps.shape[0], n_virtual, *maps.shape[2:]
    )
    return k, m


def _coil_projection(kspace: torch.Tensor, n_virtual: int) -> torch.Tensor:
    """``(B, n_virtual, n_coils)`` rows: the dominant left singular vectors of each slice's coil data."""
    flat = kspace.reshape(kspace.shape[0], kspace.shape[1], -1).to(torch.complex64)
    u, _, _ = torch.linalg.svd(flat @ flat.conj().transpose(1, 2))
    return u[:, :, :n_virtual].conj().transpose(1, 2)


@dataclass
class ShotProblems:
    """The samples of every non-empty shot, gathered once (``P`` shots, ``R`` = most rows of a shot).

    Attributes
    ----------
    slice_index, shot_index
        ``(P,)`` slice ``b`` and shot ``s`` of each problem.
    rows
        ``(P, R)`` grid rows of the shot (padded with its first row, ``weight`` 0 there).
    weight
        ``(P, R, 1, n_kx)`` 1 on acquired samples of the shot, else 0.
    data
        ``(P, R, n_coils, n_kx)`` the measured samples (zero where ``weight`` is 0), centred k-space.
    n_samples
        ``(P,)`` complex samples of each shot over all coils, weighted: ``n_coils * sum(weight^2)`` (the
        expected ``RSS / noise variance`` of pure noise).
    """

    slice_index: torch.Tensor
    shot_index: torch.Tensor
    rows: torch.Tensor
    weight: torch.Tensor
    data: torch.Tensor
    n_samples: torch.Tensor

    @classmethod
    def from_masks(
        cls, kspace: torch.Tensor, shot_masks: torch.Tensor, sample_weights: torch.Tensor | None = None
    ) -> ShotProblems:
        """Gather from ``kspace`` ``(B, n_coils, n_ky, n_kx)`` and ``shot_masks`` ``(B, S, n_ky[, n_kx])``.

        ``sample_weights`` ``(B, n_ky, n_kx)`` (optional, >= 0) weight the residual of each sample (the fit
        minimises ``sum w^2 |y - prediction|^2``), e.g. a Wiener weighting of the reference's SNR.

        Raises
        ------
        InputError
            For masks of the wrong shape or without any acquired sample.
        """
        b, n_c, n_y, n_x = kspace.shape
        m = shot_masks.to(kspace.device, torch.bool)
        if m.ndim == 3:
            m = m[..., None].expand(*m.shape, n_x)
        if m.ndim != 4 or m.shape[0] != b or tuple(m.shape[2:]) != (n_y, n_x):
            raise InputError(
                f"shot masks: expected (B, S, n_ky[, n_kx]) = ({b}, S, {n_y}[, {n_x}]), "
                f"got {tuple(shot_masks.shape)}"
            )
        row_any = m.any(-1).cpu()  # (B, S, n_y)
        pairs = [(i, j) for i in range(b) for j in range(m.shape[1]) if bool(row_any[i, j].any())]
        if not pairs:
            raise InputError("shot masks: expected at least one acquired sample, got none")
        r_max = max(int(row_any[i, j].sum()) for i, j in pairs)
        p = len(pairs)
        rows = torch.zeros(p, r_max, dtype=torch.long)
        weight = torch.zeros(p, r_max, 1, n_x, dtype=torch.float32, device=kspace.device)
        for k, (i, j) in enumerate(pairs):
            r = torch.nonzero(row_any[i, j]).flatten()
            rows[k, :] = r[0]
            rows[k, : r.numel()] = r
            rd = r.to(m.device)
            weight[k, : r.numel(), 0] = m[i, j, rd].float()
            if sample_weights is not None:
                weight[k, : r.numel(), 0] *= sample_weights[i, rd].to(weight)
        rows = rows.to(kspace.device)
        bi = torch.tensor([i for i, _ in pairs], device=kspace.device)
        si = torch.tensor([j for _, j in pairs], device=kspace.device)
        data = kspace[bi[:, None], :, rows] * weight  # (P, R, C, n_x)
        return cls(bi, si, rows, weight, data.to(torch.complex64), weight.square().sum((1, 2, 3)) * n_c)

    def subset(self, index: torch.Tensor) -> ShotProblems:
        """The problems ``index`` (slice indices kept as they are)."""
        return ShotProblems(
            self.slice_index[index],
            self.shot_index[index],
            self.rows[index],
            self.weight[index],
            self.data[index],
            self.n_samples[index],
        )

    def compressed(
        self, kspace: torch.Tensor, maps: torch.Tensor, n_virtual: int
    ) -> tuple[ShotProblems, torch.Tensor]:
        """The same shots on ``n_virtual`` virtual coils of each slice, and the matching maps."""
        n_c = kspace.shape[1]
        if n_virtual >= n_c:
            return self, maps
        proj = _coil_projection(kspace, n_virtual)  # (B, V, C)
        vmaps = (proj @ maps.reshape(maps.shape[0], n_c, -1).to(proj.dtype)).reshape(
            maps.shape[0], n_virtual, *maps.shape[2:]
        )
        data = torch.einsum("pvc,prcx->prvx", proj[self.slice_index], self.data)
        n = self.weight.square().sum((1, 2, 3)) * n_virtual
        return ShotProblems(self.slice_index, self.shot_index, self.rows, self.weight, data, n), vmaps


class _Encoder:
    """``M_s F C`` of the problems: rolled images ``(Q, n_y, n_x)`` -> samples ``(Q, R, n_coils, n_kx)``.

    Few rows per shot: the coil images are transformed along y to the shot's rows only (one matrix product)
    and then along x.  Many rows (more than ``n_y / 8``): a full 2-D FFT and a gather.
    """

    def __init__(self, maps: torch.Tensor, problems: ShotProblems, grid: RolledGrid) -> None:
        self.pb = problems
        self.grid = grid
        self.maps = grid.roll(maps.to(torch.complex64)).permute(0, 2, 1, 3).contiguous()  # (B, n_y, C, n_x)
        n_y = grid.n_y
        self.full = problems.rows.shape[1] > n_y // 8
        if self.full:
            self.plain_rows = (problems.rows - n_y // 2) % n_y  # row index in plain FFT order
        else:
            ky = (problems.rows - n_y // 2).double()  # (P, R) centred frequency
            arg = (-2 * math.pi / n_y) * ky[:, :, None] * grid.fy.double()[None, None, :]
            self.dft = (torch.complex(torch.cos(arg), torch.sin(arg)) / math.sqrt(n_y)).to(torch.complex64)

    def __call__(self, img: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Rolled ``img`` ``(Q, n_y, n_x)`` of the problems ``index`` -> samples ``(Q, R, C, n_kx)``."""
        pb = self.pb
        slices = pb.slice_index[index]
        first = int(slices[0])
        if bool((slices == first).all()):  # one slice: broadcast its maps (no per-problem copy)
            coil = self.maps[first][None] * img[:, :, None, :]  # (Q, n_y, C, n_x)
        else:
            coil = self.maps[slices] * img[:, :, None, :]
        q, n_y, n_c, n_x = coil.shape
        if self.full:
            k = torch.fft.fft(coil, dim=1, norm="ortho")
            rows = self.plain_rows[index]
            k = torch.gather(k, 1, rows[:, :, None, None].expand(-1, -1, n_c, n_x))
        else:
            k = torch.matmul(self.dft[index], coil.reshape(q, n_y, n_c * n_x)).reshape(q, -1, n_c, n_x)
        k = torch.fft.fftshift(torch.fft.fft(k, dim=-1, norm="ortho"), dim=-1)
        return k * pb.weight[index]


@dataclass
class ShotFit:
    """Result of :func:`fit_shots` for ``P`` shots (order of :class:`ShotProblems`).

    ``motion`` ``(P, 3)`` ``(dx_px, dy_px, phi_deg)``; ``std`` ``(P, 3)`` standard errors (same units);
    ``rss``/``rss_zero`` ``(P,)`` residual sums of squares at the estimate and at zero motion;
    ``n_samples`` ``(P,)`` complex samples; ``hessian`` ``(P, 3, 3)`` ``Re J^H J``; ``statistic`` ``(P,)``
    ``2 (rss_zero - rss) / noise_var`` (chi-square with 3 dof under no motion); ``noise_var`` ``(P,)`` the
    noise variance used; ``ambiguous`` ``(P,)`` another, distinct pose explains the shot about as well.
    """

    motion: torch.Tensor
    std: torch.Tensor
    rss: torch.Tensor
    rss_zero: torch.Tensor
    n_samples: torch.Tensor
    hessian: torch.Tensor
    statistic: torch.Tensor
    noise_var: torch.Tensor
    ambiguous: torch.Tensor
    phase: torch.Tensor | None = None

    def with_noise_var(self, noise_var: torch.Tensor) -> ShotFit:
        """The same fit with another noise variance ``(P,)``: ``std`` scales with its square root, the
        statistic inversely."""
        nv = noise_var.to(self.noise_var)
        return ShotFit(
            self.motion,
            self.std * (nv / self.noise_var).sqrt()[:, None],
            self.rss,
            self.rss_zero,
            self.n_samples,
            self.hessian,
            self.statistic * self.noise_var / nv,
            nv,
            self.ambiguous,
            self.phase,
        )

    def residual_variance(self) -> torch.Tensor:
        """``(P,)`` ``rss / (n_samples - 1.5)``: the residual variance per complex sample at the estimate."""
        dim = 3 + (0 if self.phase is None else self.phase.shape[1])
        return self.rss / (self.n_samples - dim / 2).clamp_min(1.0)


def _rss(residual: torch.Tensor) -> torch.Tensor:
    return residual.abs().square().flatten(1).sum(1).double()


PHASE_TERMS = {0: "none", 1: "constant", 3: "constant + linear"}
"""Nuisance phase terms of the fit (see :func:`fit_shots`)."""


class _Objective:
    """Residuals, RSS and Gauss-Newton terms of the problems at given parameters (chunked).

    Parameters per problem: ``(dx_px, dy_px, phi_deg)`` and ``n_phase`` coefficients of a smooth phase
    ``psi(r) = a_0 + a_1 x / (n_x / 2) + a_2 y / (n_y / 2)`` [rad] in the scanner frame: the model image is
    ``exp(i psi) T(theta) x``.
    """

    def __init__(
        self,
        reference: torch.Tensor,
        maps: torch.Tensor,
        problems: ShotProblems,
        spacing: Spacing,
        chunk: int,
        n_phase: int = 0,
    ) -> None:
        self.grid = RolledGrid(reference.shape[-2], reference.shape[-1], spacing, reference.device)
        self.x = self.grid.roll(reference.to(torch.complex64))
        self.pb = problems
        self.enc = _Encoder(maps, problems, self.grid)
        self.chunk = chunk
        self.n_phase = n_phase
        g = self.grid
        ones = torch.ones(g.n_y, g.n_x, device=reference.device)
        xs = (g.fx / (g.n_x / 2))[None, :].expand(g.n_y, g.n_x)
        ys = (g.fy / (g.n_y / 2))[:, None].expand(g.n_y, g.n_x)
        self.basis = torch.stack([ones, xs, ys])[:n_phase].to(torch.float32)  # (n_phase, n_y, n_x)

    @property
    def n_params(self) -> int:
        """Parameters per problem."""
        return 3 + self.n_phase

    def _phase(self, theta: torch.Tensor) -> torch.Tensor | None:
        if self.n_phase == 0:
            return None
        psi = torch.einsum("qj,jyx->qyx", theta[:, 3:].to(torch.float32), self.basis)
        return torch.complex(torch.cos(psi), torch.sin(psi))

    def _model(self, theta: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = self.grid.move(self.x[self.pb.slice_index[q]], theta[:, :3])
        ph = self._phase(theta)
        return g, ph

    def rss(self, theta: torch.Tensor, q_all: torch.Tensor) -> torch.Tensor:
        """RSS ``(Q,)`` of the problems ``q_all`` at parameters ``theta`` ``(Q, n_params)``."""
        out = []
        for c in range(0, len(q_all), self.chunk):
            q = q_all[c : c + self.chunk]
            g, ph = self._model(theta[c : c + self.chunk], q)
            out.append(_rss(self.pb.data[q] - self.enc(g if ph is None else g * ph, q)))
        return torch.cat(out)

    def normal(
        self, theta: torch.Tensor, q_all: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``Re J^H J`` ``(Q, D, D)``, ``Re J^H r`` ``(Q, D)`` and RSS ``(Q,)`` (``D = n_params``)."""
        hs, bs, rs = [], [], []
        for c in range(0, len(q_all), self.chunk):
            q = q_all[c : c + self.chunk]
            th = theta[c : c + self.chunk]
            g, ph = self._model(th, q)
            derivs = list(self.grid.derivatives(g, th[:, :3], self.x[self.pb.slice_index[q]]))
            if ph is not None:
                h = g * ph
                derivs = [d * ph for d in derivs] + [1j * b[None] * h for b in self.basis]
            else:
                h = g
            pred = self.enc(h, q)
            r = (self.pb.data[q] - pred).flatten(1)
            cols = [self.enc(d, q) for d in derivs[:3]]
            if ph is not None:  # the constant phase's column is i * prediction: no extra encoding
                cols.append(1j * pred)
                cols += [self.enc(d, q) for d in derivs[4:]]
            js = torch.stack(cols, 1).flatten(2)
            hs.append(torch.einsum("qin,qjn->qij", js.conj(), js).real.double())
            bs.append(torch.einsum("qin,qn->qi", js.conj(), r).real.double())
            rs.append(_rss(r))
        return torch.cat(hs), torch.cat(bs), torch.cat(rs)


def _signal_hessian(h: torch.Tensor, h_noise: torch.Tensor, floor: float = 0.02) -> torch.Tensor:
    """``Re J^H J`` of the signal alone: that of the noisy reference minus that of a noise-only one.

    The Gauss-Newton matrix of a noisy reference counts the derivatives of its noise as information
    (white noise has much gradient energy), which makes steps too short and standard errors too small; the
    expected noise part is the same matrix on a reference of pure noise with the same statistics.  The
    difference is made positive definite: in the basis scaled by the noisy matrix's diagonal, its eigenvalues
    are at least ``floor`` (the noise takes at most ``1 - floor`` of any parameter's information).
    """
    diff = h - h_noise
    diff = (diff + diff.transpose(1, 2)) / 2
    # clamp in the basis scaled by the noisy matrix's diagonal (parameters of very different scales)
    scale = torch.diagonal(h, dim1=1, dim2=2).clamp_min(1e-30).sqrt()
    c = diff / (scale[:, :, None] * scale[:, None, :])
    w, v = torch.linalg.eigh(c)
    w = w.clamp_min(floor)
    c = v @ torch.diag_embed(w) @ v.transpose(1, 2)
    return c * (scale[:, :, None] * scale[:, None, :])


def _levenberg_marquardt(
    obj: _Objective,
    theta: torch.Tensor,
    prob: torch.Tensor,
    free: torch.Tensor,
    iterations: int,
    tolerance: float,
    rss: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    noise_obj: _Objective | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped Gauss-Newton from ``theta`` ``(N, D)`` for the problems ``prob`` ``(N,)``; only the parameters
    with ``free`` ``(D,)`` True move.  Returns the parameters and their RSS (``inf`` for inactive rows).

    With ``noise_obj`` (the same problems on a noise-only reference) the Gauss-Newton matrix is corrected by
    the part a noisy reference adds (:func:`_signal_hessian`), evaluated at the first iteration.
    """
    dev = theta.device
    n, d = theta.shape
    theta = theta.clone()
    act = torch.arange(n, device=dev) if active is None else active
    mu = torch.full((n,), 1e-3, dtype=torch.float64, device=dev)
    rss = torch.full((n,), math.inf, dtype=torch.float64, device=dev) if rss is None else rss.clone()
    hess = torch.zeros(n, d, d, dtype=torch.float64, device=dev)
    grad = torch.zeros(n, d, dtype=torch.float64, device=dev)
    fresh = torch.ones(n, dtype=torch.bool, device=dev)
    fixed = ~free.to(dev)
    eye = torch.eye(d, dtype=torch.float64, device=dev)
    noise_hess = torch.zeros(n, d, d, dtype=torch.float64, device=dev)
    noise_done = torch.zeros(n, dtype=torch.bool, device=dev)
    for _ in range(iterations):
        if act.numel() == 0:
            break
        need = act[fresh[act]]
        if need.numel():
            h, b, r = obj.normal(theta[need], prob[need])
            hess[need], grad[need], rss[need] = h, b, r
            fresh[need] = False
            if noise_obj is not None:
                first = need[~noise_done[need]]
                if first.numel():
                    noise_hess[first] = noise_obj.normal(theta[first], prob[first])[0]
                    noise_done[first] = True
                hess[need] = _signal_hessian(hess[need], noise_hess[need])
        h = hess[act].clone()
        g = grad[act].clone()
        h[:, fixed, :] = 0.0
        h[:, :, fixed] = 0.0
        h = h + eye[None] * fixed.double()  # fixed parameters: identity rows, zero gradient
        g[:, fixed] = 0.0
        diag = torch.diagonal(h, dim1=1, dim2=2).clamp_min(1e-30)
        step = torch.linalg.solve(h + torch.diag_embed(mu[act, None] * diag), g[..., None])[..., 0]
        trial = theta[act] + step
        trial[:, 2] = trial[:, 2].clamp(-89.0, 89.0)
        new_rss = obj.rss(trial, prob[act])
        better = new_rss < rss[act]
        acc = act[better]
        theta[acc], rss[acc], fresh[acc] = trial[better], new_rss[better], True
        mu[acc] = (mu[acc] / 3).clamp_min(1e-7)
        mu[act[~better]] *= 4
        small = (step[:, :3].abs() < tolerance).all(1) & (step[:, 3:].abs() < 10 * tolerance).all(1)
        done = (better & small) | (~better & (mu[act] > 1e5))
        act = act[~done]
    return theta, rss


def _neighbour_prior(motion: torch.Tensor, pb: ShotProblems) -> torch.Tensor:
    """Median pose of the (up to) two shots before and after each shot of the same slice, by shot index."""
    out = torch.zeros_like(motion)
    for p in range(motion.shape[0]):
        same = torch.nonzero(
            (pb.slice_index == pb.slice_index[p]) & (pb.shot_index != pb.shot_index[p])
        ).flatten()
        if same.numel() == 0:
            continue
        dist = (pb.shot_index[same] - pb.shot_index[p]).abs()
        near = same[dist.argsort()[:4]]
        out[p] = motion[near].median(0).values
    return out


def fit_shots(
    reference: torch.Tensor,
    maps: torch.Tensor,
    problems: ShotProblems,
    candidates: torch.Tensor,
    spacing: Spacing = (1.0, 1.0),
    noise_var: torch.Tensor | float | None = None,
    iterations: int = 15,
    tolerance: float = 1e-3,
    keep: int = 2,
    ambiguity_chi2: float = 10.0,
    use_neighbours: bool = True,
    chunk: int = 8,
    n_phase: int = 0,
    noise_reference: torch.Tensor | None = None,
) -> ShotFit:
    """Least-squares pose of every shot (module docstring, steps 2-4).

    Parameters
    ----------
    reference
        ``(B, n_y, n_x)`` reference images (reference pose).
    maps
        ``(B, n_coils, n_y, n_x)`` coil maps (the coils of ``problems.data``).
    problems
        The shots' samples (:meth:`ShotProblems.from_masks`).
    candidates
        ``(P, K, 3)`` starting poses per shot (e.g. :func:`coarse_search`, a network's seed, zero).
    spacing
        ``(dy_mm, dx_mm)``.
    noise_var
        Complex noise variance per sample of the residual, scalar or ``(P,)``; None: the residual variance
        ``rss / (n_samples - 1.5)`` of each shot.
    iterations, tolerance
        Levenberg-Marquardt iterations; a candidate stops when its step is below ``tolerance`` (px, deg).
    keep
        Only the ``keep`` candidates of lowest RSS of each shot are fitted (the others are ranked at their
        starting pose).
    ambiguity_chi2
        Candidates within ``ambiguity_chi2 * noise_var / 2`` of the best RSS are equivalent (step 3).
    use_neighbours
        Resolve equivalent candidates by the neighbouring shots' poses (else: the smaller motion).
    chunk
        Problems encoded together (memory ~ ``chunk * 5 * n_coils * n_y * n_x`` complex samples).
    noise_reference
        ``(B, n_y, n_x)`` images of pure noise with the statistics of the references' noise (e.g. the same
        SENSE reconstruction applied to simulated noise): the Gauss-Newton matrix (steps and standard
        errors) is corrected by the part the reference's noise adds (:func:`_signal_hessian`).  Without it a
        noisy reference (SNR 10) stops the fit early (0.2-0.3 deg off) and gives too small errors.
    n_phase
        Nuisance phase terms fitted with the pose (0, 1: a constant, 3: constant + linear in x and y): the
        model image is ``exp(i psi(r)) T(theta) x_ref``.  They absorb a phase drift between the reference and
        the shot and the part of the coil maps' phase convention that moves with the object (maps estimated
        from data carry the coils' phase relative to a virtual coil; under motion that relative phase is
        transported with the object, a smooth phase error); the statistic then compares against "no motion,
        phase free" (3 dof).

    Returns
    -------
    :class:`ShotFit`

    Raises
    ------
    InputError
        For candidates that do not match the problems.
    """
    pb = problems
    p, k = candidates.shape[:2]
    if p != pb.rows.shape[0] or candidates.shape[2] != 3:
        raise InputError(
            f"fit_shots: candidates must be ({pb.rows.shape[0]}, K, 3), got {tuple(candidates.shape)}"
        )
    dev = reference.device
    obj = _Objective(reference, maps, pb, spacing, chunk, n_phase)
    dim = obj.n_params
    theta = torch.zeros(p * k, dim, dtype=torch.float64, device=dev)
    theta[:, :3] = candidates.to(dev, torch.float64).reshape(p * k, 3)
    prob = torch.arange(p, device=dev).repeat_interleave(k)
    active = torch.arange(p * k, device=dev)
    rss = torch.full((p * k,), math.inf, dtype=torch.float64, device=dev)
    if k > keep:  # pre-screen: only the ``keep`` candidates of lowest RSS of every shot are fitted
        rss[:] = obj.rss(theta, prob)
        order = rss.reshape(p, k).argsort(1)[:, :keep]
        keep_mask = torch.zeros(p, k, dtype=torch.bool, device=dev)
        keep_mask.scatter_(1, order, True)
        active = active[keep_mask.flatten()]
    every_param = torch.ones(dim, dtype=torch.bool, device=dev)
    noise_obj = None
    if noise_reference is not None:
        blank = ShotProblems(
            pb.slice_index, pb.shot_index, pb.rows, pb.weight, torch.zeros_like(pb.data), pb.n_samples
        )
        noise_obj = _Objective(noise_reference, maps, blank, spacing, chunk, n_phase)
    if keep > 1 and active.numel() > p:  # a few steps for every candidate, then only the competitive ones
        theta, rss = _levenberg_marquardt(obj, theta, prob, every_param, 3, tolerance, rss, active, noise_obj)
        floor = torch.full((p,), math.inf, dtype=torch.float64, device=dev)
        floor = floor.scatter_reduce(0, prob[active], rss[active], "amin")
        scale = floor / pb.n_samples.double().to(dev).clamp_min(1.0)  # residual variance of the best
        margin = floor + 2 * ambiguity_chi2 * scale
        active = active[rss[active] <= margin[prob[active]]]
    theta, rss = _levenberg_marquardt(
        obj, theta, prob, every_param, iterations, tolerance, rss, active, noise_obj
    )
    rss_pk = rss.reshape(p, k)
    theta_pk = theta.reshape(p, k, dim)
    best = rss_pk.argmin(1)
    ar = torch.arange(p, device=dev)
    params = theta_pk[ar, best]
    every = ar
    h, _, r = obj.normal(params, every)
    if noise_obj is not None:
        h = _signal_hessian(h, noise_obj.normal(params, every)[0])
    # the null model: no motion, nuisance phase free
    zero = torch.zeros(p, dim, dtype=torch.float64, device=dev)
    if n_phase:
        phase_only = torch.zeros(dim, dtype=torch.bool, device=dev)
        phase_only[3:] = True
        _, rss0 = _levenberg_marquardt(obj, zero, every, phase_only, 4, tolerance)
        rss0 = torch.minimum(rss0, obj.rss(zero, every))
    else:
        rss0 = obj.rss(zero, every)
    n = pb.n_samples.double().to(dev)
    if noise_var is None:
        nv = r / (n - dim / 2).clamp_min(1.0)
    else:
        nv = torch.as_tensor(noise_var, dtype=torch.float64, device=dev).expand(p).clone()
    # step 3: statistically equivalent candidates, resolved by the neighbours' poses
    near = torch.isfinite(rss_pk) & (2 * (rss_pk - rss_pk[ar, best][:, None]) / nv[:, None] <= ambiguity_chi2)
    dist_best = (theta_pk[..., :3] - params[:, None, :3]).abs().amax(-1)
    ambiguous = (near & (dist_best > 0.5)).any(1)
    if bool(ambiguous.any()):
        for _ in range(2):
            prior = _neighbour_prior(params[:, :3], pb) if use_neighbours else torch.zeros_like(params[:, :3])
            d = (theta_pk[..., :3] - prior[:, None]).abs().sum(-1)
            d = torch.where(near, d, torch.full_like(d, math.inf))
            choice = d.argmin(1)
            params = torch.where(ambiguous[:, None], theta_pk[ar, choice], params)
        if bool((params != theta_pk[ar, best]).any()):
            h, _, r = obj.normal(params, every)
            if noise_obj is not None:
                h = _signal_hessian(h, noise_obj.normal(params, every)[0])
    motion = params[:, :3]
    eye = torch.eye(dim, dtype=torch.float64, device=dev)
    cov = torch.linalg.solve(h + 1e-12 * eye, eye.expand(p, dim, dim)) * (nv / 2)[:, None, None]
    std = torch.diagonal(cov, dim1=1, dim2=2)[:, :3].clamp_min(0).sqrt()
    stat = 2 * (rss0 - r).clamp_min(0) / nv
    return ShotFit(motion, std, r, rss0, n, h, stat, nv, ambiguous, params[:, 3:])


def coarse_search(
    reference: torch.Tensor,
    maps: torch.Tensor,
    problems: ShotProblems,
    angles_deg: torch.Tensor,
    spacing: Spacing = (1.0, 1.0),
    n_candidates: int = 2,
    n_translations: int = 4,
    max_translation_px: tuple[float, float] | None = None,
    chunk: int = 8,
) -> torch.Tensor:
    """Candidate poses of every shot from a rotation grid, one inverse FFT per (shot, angle) (module step 1).

    Parameters
    ----------
    reference, maps, problems, spacing
        As :func:`fit_shots`.
    angles_deg
        ``(J,)`` the rotation grid [deg].
    n_candidates
        Angles kept per shot (best local maxima of the score over the grid).
    n_translations
        Translations kept per kept angle: the best local maxima of the score's profile along y.
    max_translation_px
        ``(max |dx|, max |dy|)`` searched [px]; None: the whole field of view.

    Returns
    -------
    ``(P, n_candidates * n_translations, 3)`` poses ``(dx_px, dy_px, phi_deg)``, best first.
    """
    pb = problems
    dev = reference.device
    n_y, n_x = reference.shape[-2:]
    p, r_max = pb.rows.shape
    j = angles_deg.numel()
    angles = angles_deg.to(dev, torch.float64)
    lim_x, lim_y = max_translation_px if max_translation_px is not None else (n_x / 2, n_y / 2)
    xx = centered_indices(n_x, dev, torch.float64)
    x_keep = torch.nonzero(xx.abs() <= lim_x).flatten()
    xs = xx[x_keep]
    # translations along y on a fine grid (step 1/_Y_UPSAMPLE px): a narrow band's score oscillates with a
    # period of n_y / |ky| px, too fast for the pixel grid
    ys = torch.arange(
        -math.floor(lim_y * _Y_UPSAMPLE), math.floor(lim_y * _Y_UPSAMPLE) + 1, device=dev
    ).double()
    ys = ys / _Y_UPSAMPLE
    ky = (pb.rows - n_y // 2).double()  # (P, R)
    arg = 2 * math.pi * ys[None, :, None] * ky[:, None, :] / n_y
    idft = torch.complex(torch.cos(arg), torch.sin(arg)).to(torch.complex64)  # (P, n_ys, R)
    s_best = torch.full((p, j, n_translations), -math.inf, dtype=torch.float64, device=dev)
    t_best = torch.zeros(p, j, n_translations, 2, dtype=torch.float64, device=dev)
    grid = RolledGrid(n_y, n_x, spacing, dev)
    maps_r = grid.roll(maps.to(torch.complex64)).permute(0, 2, 1, 3)  # (B, n_y, C, n_x)
    ref_r = grid.roll(reference.to(torch.complex64))
    plain_rows = (pb.rows - n_y // 2) % n_y
    for b in torch.unique(pb.slice_index).tolist():
        probs = torch.nonzero(pb.slice_index == b).flatten()
        for a0 in range(0, j, chunk):
            ang = angles[a0 : a0 + chunk]
            na = len(ang)
            theta = torch.zeros(na, 3, dtype=torch.float64, device=dev)
            theta[:, 2] = ang
            rot = grid.move(ref_r[b].expand(na, n_y, n_x), theta)
            kref = torch.fft.fft2(maps_r[b][None] * rot[:, :, None, :], dim=(1, 3), norm="ortho")
            kr = kref[:, plain_rows[probs]]  # (A, Pb, R, C, n_x)
            kr = (
                torch.fft.fftshift(kr, dim=-1).transpose(0, 1) * pb.weight[probs][:, None]
            )  # (Pb, A, R, C, n_x)
            energy = kr.abs().square().sum((2, 3, 4)).double()  # (Pb, A)
            cross = (pb.data[probs][:, None] * kr.conj()).sum(3)  # (Pb, A, R, n_x)
            cx = (ifft1c(cross, -1) * math.sqrt(n_x))[..., x_keep]  # sum_kx X e^{+2 pi i kx x / n_x}
            corr = torch.matmul(idft[probs][:, None], cx).real.double()  # (Pb, A, n_ys, n_xs)
            score = 2 * corr - energy[..., None, None]
            best_x, arg_x = score.max(-1)  # (Pb, A, n_ys): the profile along y
            prof = torch.nn.functional.pad(best_x, (1, 1), value=-math.inf)
            peak = (best_x >= prof[..., :-2]) & (best_x >= prof[..., 2:])
            ranked_y = torch.where(peak, best_x, torch.full_like(best_x, -math.inf))
            order_y = ranked_y.argsort(-1, descending=True)[..., :n_translations]
            for t in range(order_y.shape[-1]):
                iy = order_y[..., t]
                ix = torch.gather(arg_x, -1, iy[..., None])[..., 0]
                val = torch.gather(ranked_y, -1, iy[..., None])[..., 0]
                s_best[probs, a0 : a0 + na, t] = val
                t_best[probs, a0 : a0 + na, t, 0] = xs[ix] + _parabola(score, iy, ix, axis=1)
                t_best[probs, a0 : a0 + na, t, 1] = ys[iy] + _parabola(score, iy, ix, axis=0) / _Y_UPSAMPLE
    top = s_best[..., 0]
    padded = torch.nn.functional.pad(top[:, None], (1, 1), value=-math.inf)[:, 0]
    is_max = (top >= padded[:, :-2]) & (top >= padded[:, 2:]) & torch.isfinite(top)
    ranked = torch.where(is_max, top, torch.full_like(top, -math.inf))
    n_keep = min(n_candidates, j)
    order = ranked.argsort(1, descending=True)[:, :n_keep]
    out = torch.zeros(p, n_keep * n_translations, 3, dtype=torch.float64, device=dev)
    ar = torch.arange(p, device=dev)
    for c in range(n_keep):
        a = order[:, c]
        for t in range(n_translations):
            i = c * n_translations + t
            out[:, i, :2] = t_best[ar, a, t]
            out[:, i, 2] = angles[a]
            bad = ~torch.isfinite(ranked[ar, a]) | ~torch.isfinite(s_best[ar, a, t])
            out[bad, i] = out[bad, 0]
    return out


def _parabola(score: torch.Tensor, iy: torch.Tensor, ix: torch.Tensor, axis: int) -> torch.Tensor:
    """Sub-pixel offset of the peak at ``(iy, ix)`` of ``score`` ``(..., n_y, n_x)`` along ``axis`` (0: y)."""
    n_y, n_x = score.shape[-2:]
    flat = score.flatten(-2)

    def at(dy: int, dx: int) -> torch.Tensor:
        idx = ((iy + dy) % n_y) * n_x + (ix + dx) % n_x
        return torch.gather(flat, -1, idx[..., None])[..., 0]

    lo, mid, hi = (at(-1, 0), at(0, 0), at(1, 0)) if axis == 0 else (at(0, -1), at(0, 0), at(0, 1))
    den = lo - 2 * mid + hi
    ok = torch.isfinite(lo) & torch.isfinite(hi) & (den < 0)
    off = torch.where(
        ok, 0.5 * (lo - hi) / torch.where(ok, den, torch.full_like(den, -1.0)), torch.zeros_like(den)
    )
    return off.clamp(-0.5, 0.5)
