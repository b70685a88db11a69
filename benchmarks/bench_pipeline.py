"""Benchmark of the whole gadget pipeline: per-slice latency and slices/s.

The stream is ``kmotion.simulation.raw.simulate_raw``: one 448 x 448 slice (FOV 220 mm, 2x readout
oversampling), 8 coils, R = 2 with a 24-line calibration block, SNR 30, repetition 0 = reference and
``--repetitions - 1`` moved repetitions.  It is streamed through ``kmotion.gadget.pipeline.motion_correct``
(buffer -> assemble -> reference/estimate -> correct -> re-emit downstream) and fully consumed.

* latency: from the moment the pipeline pulls a slice's last line (``ACQ_LAST_IN_SLICE``) until it emits
  that slice's ``MotionReport`` (the report comes immediately before the slice's corrected lines);
* slices/s: moved slices divided by the sum of their latencies (steady state).

Each stream runs twice: with the gadget's estimator, and with stage 4 replaced by the true motion (an
oracle, through :func:`kmotion.gadget.estimate.report_for`): the difference is the estimation's share.

The first moved slice loads the model and warms up the kernels; it is reported separately and left out of
the statistics.  Runs on CPU, and on CUDA when available (``--device``).

    .venv/bin/python benchmarks/bench_pipeline.py                       # CPU (+ CUDA where present)
    .venv/bin/python benchmarks/bench_pipeline.py --repetitions 9 --output trajectory --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Iterable, Iterator

import ismrmrd
import torch
from common import cpu_name, use_true_motion

from kmotion.gadget import GadgetParams, MotionCorrector, MotionReport
from kmotion.io.ismrmrd_writer import TrueMotion
from kmotion.simulation.raw import RawConfig, simulate_raw


def run(
    items: list[object], header: object, params: GadgetParams, truth: dict[tuple[int, int], TrueMotion] | None
) -> dict[str, object]:
    """Stream ``items`` through the pipeline (with ``truth``: the oracle of :func:`_oracle` instead of the
    estimator); latency per slice and throughput."""
    pulled: dict[tuple[int, int], float] = {}

    def source(it: Iterable[object]) -> Iterator[object]:
        for item in it:
            if isinstance(item, ismrmrd.Acquisition) and item.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE):
                pulled[(int(item.idx.slice), int(item.idx.repetition))] = time.perf_counter()
            yield item

    latency: dict[tuple[int, int], float] = {}
    reports: list[MotionReport] = []
    n_out = 0
    t0 = time.perf_counter()
    mc = MotionCorrector(header, params)  # type: ignore[arg-type]
    if truth is not None:
        use_true_motion(mc, truth)
    for out in mc(source(items)):
        n_out += 1
        if isinstance(out, MotionReport):
            key = (int(out.key.slice), int(out.key.repetition))
            latency[key] = time.perf_counter() - pulled[key]
            reports.append(out)
    wall = time.perf_counter() - t0
    if params.device.startswith("cuda"):
        torch.cuda.synchronize()
    moved = [r for r in reports if r.key.repetition != r.reference_repetition]
    lat = [latency[(int(r.key.slice), int(r.key.repetition))] for r in moved]
    return {
        "n_items_out": n_out,
        "n_moved": len(moved),
        "n_corrected": sum(r.corrected for r in moved),
        "first_moved_s": lat[0] if lat else float("nan"),
        "latency_s": lat[1:],
        "wall_s": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrix", type=int, nargs=2, default=(448, 448))
    p.add_argument("--coils", type=int, default=8)
    p.add_argument("--repetitions", type=int, default=6, help="1 reference + N-1 moved slices")
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    p.add_argument("--output", choices=("cartesian", "trajectory"), default="cartesian")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1, as kmotion replay; 0: torch's)"
    )
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    cfg = RawConfig(matrix=tuple(args.matrix), n_coils=args.coils, n_slices=1, n_repetitions=args.repetitions)
    t = time.perf_counter()
    raw = simulate_raw(cfg)
    print(f"simulated {len(raw.items)} acquisitions in {time.perf_counter() - t:.1f} s")
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(
        f"stream: {cfg.matrix[0]}x{cfg.matrix[1]} recon (readout {2 * cfg.matrix[1]} oversampled), "
        f"{cfg.n_coils} coils, R={cfg.acceleration} + {cfg.calibration_lines} calibration lines, "
        f"output={args.output}, {cfg.n_repetitions - 1} moved slices"
    )
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    for dev in devices:
        if dev == "cuda" and not torch.cuda.is_available():
            print("cuda: not available on this machine (no CUDA numbers)")
            continue
        name = torch.cuda.get_device_name(0) if dev == "cuda" else cpu_name()
        truth = {(t.slice, t.repetition): t for t in raw.truth}
        for oracle in (False, True):
            res = run(
                raw.items, raw.header, GadgetParams(device=dev, output=args.output), truth if oracle else None
            )
            _print(dev, name, "true motion (no estimation)" if oracle else "estimated", res)


def _print(dev: str, name: str, what: str, res: dict[str, object]) -> None:
    """One result: corrected slices, the first moved slice's latency, then the steady state."""
    lat = res["latency_s"]
    assert isinstance(lat, list)
    print(
        f"{dev} ({name}), {what}: {res['n_corrected']}/{res['n_moved']} moved slices corrected; first moved "
        f"slice (model load + warm-up) {res['first_moved_s']:.2f} s"
    )
    if lat:
        print(
            f"  per-slice latency over {len(lat)} slices: median {statistics.median(lat):.3f} s, mean "
            f"{statistics.fmean(lat):.3f} s, max {max(lat):.3f} s -> {len(lat) / sum(lat):.2f} slices/s "
            f"(steady state); whole stream incl. warm-up {res['n_moved']} slices in {res['wall_s']:.1f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
