"""The classical registration baseline (Fourier–Mellin + phase correlation, refined) and the shared metrics.

Small matrices (128 x 128, a few dozen pairs) keep every test at about a second.  Accuracy thresholds: on
noise-free 128 x 128 pairs with a (32, 64) or (48, 48) crop the method's median errors measured over three
seeds were <= 0.025 px and <= 0.11 deg (one coil; 0.23 deg with four fixed coils) and its largest errors
0.25 px and 0.8 deg (2.3 deg with four coils).  The thresholds below are about 4x those medians — far below
the issue's reference baseline (0.7 / 0.6 px, 1.2 deg at the full study size) — and the largest errors are
checked against the gross-failure limit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from kmotion.estimation.classical import register_classical
from kmotion.estimation.metrics import evaluate, motion_errors
from kmotion.physics.validate import InputError
from kmotion.simulation.sources import PhantomSource, sample_pairs
from kmotion.simulation.study import PairBatch, StudyConfig, StudySimulator

SMALL = StudyConfig(matrix=(128, 128), crop=(32, 64))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Many small tensor ops: one intra-op thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pairs(cfg: StudyConfig, n: int, seed: int) -> PairBatch:
    return sample_pairs(StudySimulator(cfg), PhantomSource(cfg), n, torch.Generator().manual_seed(seed))


def _given_motion(cfg: StudyConfig, motion: list[tuple[float, float, float]], seed: int = 3) -> PairBatch:
    """Pairs of one phantom moved by the given ``(dx, dy, phi)``."""
    base = PhantomSource(cfg).draw(1, torch.Generator().manual_seed(seed))
    m = torch.tensor(motion, dtype=torch.float64)
    return StudySimulator(cfg).simulate(base.objects, m, torch.zeros(len(m), dtype=torch.long))


def _check_accuracy(
    cfg: StudyConfig, batch: PairBatch, median_px: float, median_deg: float, max_err: float
) -> None:
    est = register_classical(batch.reference, batch.moved, cfg)
    assert est.shape == (len(batch.motion), 3) and est.dtype == torch.float32
    err = (est - batch.motion).abs()
    med = err.median(0).values
    assert med[0] < median_px and med[1] < median_px, f"median translation errors {med[:2].tolist()}"
    assert med[2] < median_deg, f"median rotation error {float(med[2]):.3f} deg"
    assert float(err.max()) < max_err, f"largest errors {err.max(0).values.tolist()}"


@pytest.fixture(scope="module")
def small_batch() -> PairBatch:
    return _pairs(SMALL, 32, 0)


def test_noise_free_accuracy(small_batch: PairBatch) -> None:
    _check_accuracy(SMALL, small_batch, median_px=0.1, median_deg=0.3, max_err=1.5)


def test_noise_free_accuracy_square_crop() -> None:
    cfg = StudyConfig(matrix=(128, 128), crop=(48, 48))
    _check_accuracy(cfg, _pairs(cfg, 24, 1), median_px=0.1, median_deg=0.3, max_err=1.5)


def test_multi_coil() -> None:
    cfg = StudyConfig(matrix=(128, 128), crop=(32, 64), n_coils=4)
    batch = _pairs(cfg, 24, 2)
    assert batch.reference.shape[1] == 4
    _check_accuracy(cfg, batch, median_px=0.1, median_deg=0.5, max_err=3.0)


@pytest.mark.parametrize(
    "matrix, fov",
    [((128, 108), (220.0, 186.0)), ((128, 96), (220.0, 220.0))],
    ids=["non-square-fov", "non-square-pixels"],
)
def test_non_square_geometry(matrix: tuple[int, int], fov: tuple[float, float]) -> None:
    cfg = StudyConfig(matrix=matrix, fov_mm=fov, crop=(32, 48))
    _check_accuracy(cfg, _pairs(cfg, 24, 0), median_px=0.1, median_deg=0.3, max_err=1.5)


def test_sign_conventions_and_zero_motion() -> None:
    motion = [(4.0, 0, 0), (-4.0, 0, 0), (0, 4.0, 0), (0, -4.0, 0), (0, 0, 6.0), (0, 0, -6.0), (0, 0, 0)]
    batch = _given_motion(SMALL, motion)
    est = register_classical(batch.reference, batch.moved, SMALL)
    truth = torch.tensor(motion, dtype=torch.float32)
    assert torch.allclose(est, truth, atol=0.3), est
    for i, j in ((0, 0), (2, 1), (4, 2)):  # +dx, +dy, +phi come out positive, their negatives negative
        assert est[i, j] > 3 and est[i + 1, j] < -3
    assert float(est[-1].abs().max()) < 0.05, f"zero motion estimated as {est[-1].tolist()}"


def test_search_range_is_respected(small_batch: PairBatch) -> None:
    ranges = (2.0, 3.0, 1.5)
    est = register_classical(small_batch.reference, small_batch.moved, SMALL, search_range=ranges)
    assert torch.all(est.abs() <= torch.tensor(ranges) + 1e-5), est.abs().max(0).values
    # a zero half-range fixes that parameter at 0, the others are still estimated
    inside = _given_motion(SMALL, [(1.0, -2.0, 3.0), (-2.5, 1.5, -2.0)])
    est = register_classical(inside.reference, inside.moved, SMALL, search_range=(3.0, 3.0, 0.0))
    assert torch.all(est[:, 2] == 0)
    est = register_classical(inside.reference, inside.moved, SMALL, search_range=(3.0, 3.0, 4.0))
    assert torch.allclose(est, inside.motion, atol=0.3)


def test_scale_invariance_and_batch_independence(small_batch: PairBatch) -> None:
    ref, mov = small_batch.reference[:4], small_batch.moved[:4]
    est = register_classical(ref, mov, SMALL)
    for scale in (1e-3, 1e4):
        assert torch.allclose(register_classical(ref * scale, mov * scale, SMALL), est, atol=1e-3)
    single = torch.cat([register_classical(ref[i : i + 1], mov[i : i + 1], SMALL) for i in range(4)])
    assert torch.allclose(single, est, atol=1e-4)
    assert register_classical(ref[:0], mov[:0], SMALL).shape == (0, 3)


def test_plain_fourier_mellin_variant(small_batch: PairBatch) -> None:
    est = register_classical(small_batch.reference, small_batch.moved, SMALL, refine=False)
    err = (est - small_batch.motion).abs()
    assert torch.all(est.abs() <= torch.tensor(SMALL.motion_range) + 1e-5)
    assert float(err[:, :2].median()) < 0.5 and float(err[:, 2].median()) < 1.5


def test_bad_input_raises(small_batch: PairBatch) -> None:
    ref, mov = small_batch.reference[:2], small_batch.moved[:2]
    with pytest.raises(InputError, match="same shape"):
        register_classical(ref, mov[..., :-1], SMALL)
    with pytest.raises(InputError, match="expected shape"):
        register_classical(ref[:, 0], mov[:, 0], SMALL)
    bad = mov.clone()
    bad[0, 0, 3, 3] = complex(math.nan, 0.0)
    with pytest.raises(InputError, match="non-finite"):
        register_classical(ref, bad, SMALL)
    with pytest.raises(InputError, match="complex"):
        register_classical(ref.real, mov.real, SMALL)
    with pytest.raises(InputError, match="search_range"):
        register_classical(ref, mov, SMALL, search_range=(1.0, -1.0, 2.0))
    with pytest.raises(InputError, match="search_range"):
        register_classical(ref, mov, SMALL, search_range=(1.0, 2.0))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="do not fit"):  # 80 acquired rows need 160 > 128 full rows
        register_classical(
            torch.ones(1, 1, 80, 8, dtype=torch.complex64), torch.ones(1, 1, 80, 8) + 0j, SMALL
        )


def test_metrics() -> None:
    truth = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 5.0, 2.0], [2.0, 2.0, 2.0]])
    offsets = torch.tensor([[0.5, 0.0, -1.0], [0.1, 0.2, 0.3], [4.0, 0.0, 0.0], [0.3, -0.4, 0.5]])
    m = motion_errors(truth + offsets, truth)
    assert m["mae_dx_px"] == pytest.approx(4.9 / 4) and m["mae_dy_px"] == pytest.approx(0.6 / 4)
    assert m["mae_phi_deg"] == pytest.approx(1.8 / 4)
    assert m["mean_inplane_mae"] == pytest.approx((4.9 + 0.6 + 1.8) / 12)
    assert m["gross_failure_rate"] == pytest.approx(0.25) and m["n_pairs"] == 4
    batch = PairBatch(
        inputs=torch.zeros(4, 4, 2, 2),
        targets=torch.zeros(4, 6),
        motion=truth,
        reference=torch.zeros(4, 1, 2, 2, dtype=torch.complex64),
        moved=torch.zeros(4, 1, 2, 2, dtype=torch.complex64),
        base_index=torch.zeros(4, dtype=torch.long),
    )
    calls = []

    def fake(ref: torch.Tensor, mov: torch.Tensor) -> torch.Tensor:
        calls.append(len(ref))
        return truth[sum(calls) - len(ref) : sum(calls)] + offsets[sum(calls) - len(ref) : sum(calls)]

    out = evaluate(fake, batch, chunk=3)
    assert calls == [3, 1]
    assert out["mae_dx_px"] == pytest.approx(m["mae_dx_px"]) and out["ms_per_pair"] >= 0
    with pytest.raises(InputError):
        motion_errors(truth[:, :2], truth[:, :2])
