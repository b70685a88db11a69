"""The ``kmotion`` command line.

Subcommands
-----------
demo        the streaming demo: simulate-raw -> replay -> PNG report, CSV, MAE and NRMSE (``--twix``: on the
            Siemens phantom; ``--pairs``: simulate the study's training pairs and draw a few)
simulate    simulate pairs and save them (``.npz``) with the study configuration
inspect     load users' raw data (ISMRMRD/fastMRI ``.h5``, Siemens ``.dat``) as base images and plot them
stream      MRD v1 or v2 stream on stdin through the motion-correction gadget to stdout
serve       FIRE-style MRD server answering with motion-corrected images
gadgetron   the Gadgetron external gadget, listening for a chain's <connect port=...>
simulate-raw  write a simulated multi-coil ISMRMRD acquisition with known rigid motion (``--intra-scan``:
            motion between the echo trains of one multi-shot scan)
replay      stream an ISMRMRD ``.h5`` (or MRD v2) file through the motion-correction gadget (corrected data,
            images, CSV)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger("kmotion")


def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--matrix", type=int, nargs=2, default=(448, 448), metavar=("N_Y", "N_X"))
    p.add_argument(
        "--fov",
        type=float,
        nargs=2,
        default=(220.0, 220.0),
        metavar=("FOV_Y", "FOV_X"),
        help="field of view in mm",
    )
    p.add_argument(
        "--crop",
        type=int,
        nargs=2,
        default=(64, 64),
        metavar=("S_Y", "S_X"),
        help="central crop: acquired rows x readout samples",
    )
    p.add_argument(
        "--range",
        type=float,
        nargs=3,
        default=(12.0, 12.0, 12.0),
        metavar=("DX", "DY", "PHI"),
        dest="motion_range",
        help="motion half-ranges: px, px, degrees",
    )
    p.add_argument("--coils", type=int, default=1, help="receive coils of the synthetic objects")
    p.add_argument("--snr", type=float, default=None, help="add complex noise at this SNR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def _config(args: argparse.Namespace):  # noqa: ANN202 - avoids importing torch at parse time
    from kmotion.simulation.study import StudyConfig

    return StudyConfig(
        matrix=tuple(args.matrix),
        fov_mm=tuple(args.fov),
        crop=tuple(args.crop),
        motion_range=tuple(args.motion_range),
        n_coils=args.coils,
        snr=args.snr,
    )


def _default_twix() -> Path:
    """``../shared/data/siemens_twix_gre_phantom.dat`` next to the repository."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "siemens_twix_gre_phantom.dat"


def cmd_demo(args: argparse.Namespace) -> int:
    if args.pairs:
        from kmotion.demo import run_demo

        args.matrix = args.matrix or (448, 448)
        args.coils = args.coils or 1
        out = run_demo(_config(args), Path(args.out), n_show=args.n_show, seed=args.seed, device=args.device)
        print(f"wrote {out}")
        return 0
    return _stream_demo(args)


def _stream_demo(args: argparse.Namespace) -> int:
    with _threads(args.threads):
        return _run_stream_demo(args)


def _run_stream_demo(args: argparse.Namespace) -> int:
    from kmotion.demo import run_stream_demo, run_twix_demo
    from kmotion.gadget.params import GadgetParams
    from kmotion.simulation.raw import RawConfig

    params = GadgetParams(device=args.device, threads=args.threads)
    progress = False if args.no_progress else None
    if args.intra_scan:
        return _intra_scan_demo(args, params, progress)
    if args.twix is not None:
        twix = Path(args.twix)
        if not twix.exists():
            print(
                f"kmotion demo --twix: {twix} not found; this demo needs the Siemens phantom raw data of "
                "../shared/data (see docs/data.md), or pass its path: kmotion demo --twix PATH",
                file=sys.stderr,
            )
            return 2
        res = run_twix_demo(
            twix,
            Path(args.out),
            n_repetitions=args.repetitions or 6,
            seed=args.seed,
            params=params,
            progress=progress,
        )
    else:
        cfg = RawConfig(
            matrix=tuple(args.matrix or (256, 256)),
            fov_mm=tuple(args.fov),
            n_coils=args.coils or 8,
            n_slices=args.slices,
            n_repetitions=args.repetitions or 12,
            snr=30.0 if args.snr is None else (None if args.snr <= 0 else args.snr),
            seed=args.seed,
        )
        res = run_stream_demo(Path(args.out), cfg, params, progress=progress)
    s = res.summary
    if "mae_dx_px" in s:
        print(
            f"estimates vs true motion ({s['n_moved_slices']} moved slices): MAE dx {s['mae_dx_px']:.3f} px, "
            f"dy {s['mae_dy_px']:.3f} px, phi {s['mae_rot_deg']:.3f} deg"
        )
    print(
        f"NRMSE vs the motion-free reference: uncorrected {s['nrmse_uncorrected']:.3f}, corrected "
        f"{s['nrmse_corrected']:.3f} (ratio {s['nrmse_ratio']:.3f}); {s['total_seconds']:.0f} s"
    )
    for path in (res.png, res.csv, res.summary_json, res.raw_h5, res.replay_h5):
        print(f"wrote {path}")
    return 0


def _intra_scan_demo(args: argparse.Namespace, params: object, progress: bool | None) -> int:
    from kmotion.demo_intra import run_intra_scan_demo
    from kmotion.simulation.intra_scan import IntraScanConfig

    cfg = IntraScanConfig(
        matrix=tuple(args.matrix or (256, 256)),
        fov_mm=tuple(args.fov),
        n_coils=args.coils or 8,
        ordering=args.ordering,
        echo_train_length=args.etl,
        pattern=args.pattern,
        snr=30.0 if args.snr is None else (None if args.snr <= 0 else args.snr),
        seed=args.seed,
    )
    res = run_intra_scan_demo(Path(args.out), cfg, args.reference, params, progress)  # type: ignore[arg-type]
    s = res.summary
    print(
        f"per-shot estimates vs true motion ({s['n_shots']} shots, {s['n_shots_corrected']} corrected, "
        f"reference: {s['reference']}): MAE dx {s['mae_dx_mm']:.3f} mm, dy {s['mae_dy_mm']:.3f} mm, phi "
        f"{s['mae_rot_deg']:.3f} deg"
    )
    print(
        f"NRMSE vs the motion-free image: uncorrected {s['nrmse_uncorrected']:.3f}, corrected "
        f"{s['nrmse_corrected']:.3f}; {s['total_seconds']:.0f} s"
    )
    for path in (res.png, res.csv, res.summary_json, res.raw_h5, res.replay_h5):
        print(f"wrote {path}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from kmotion.simulation.sources import BaseSource, ImageSource, PhantomSource, sample_pairs
    from kmotion.simulation.study import StudyConfig, StudySimulator

    cfg = _config(args)
    sim = StudySimulator(cfg, args.device)
    source: BaseSource
    if args.raw:
        from kmotion.io import load_base_images

        base = load_base_images(args.raw)
        if args.pad_fov > 1:
            base = base.padded(args.pad_fov)
        if tuple(base.images.shape[-2:]) != cfg.matrix:
            log.info(
                "resampling %s from %s to the study matrix %s (k-space crop/zero-pad, FOV kept)",
                args.raw,
                tuple(base.images.shape[-2:]),
                cfg.matrix,
            )
            base = base.resized(cfg.matrix)
        if base.fov_mm != cfg.fov_mm:
            log.info("using the data's FOV %s mm instead of %s mm", base.fov_mm, cfg.fov_mm)
            cfg = StudyConfig(**{**cfg.to_dict(), "fov_mm": base.fov_mm})
            sim = StudySimulator(cfg, args.device)
        source = ImageSource(base.as_tensor(), cfg)
    else:
        source = PhantomSource(cfg, device=args.device)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    batch = sample_pairs(sim, source, args.n_pairs, g)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        inputs=batch.inputs.cpu().numpy(),
        targets=batch.targets.cpu().numpy(),
        motion=batch.motion.cpu().numpy(),
        target_scale=cfg.target_scale().numpy(),
        config=json.dumps(cfg.to_dict()),
    )
    print(
        f"wrote {args.n_pairs} pairs to {out}: inputs {tuple(batch.inputs.shape)}, targets (dx, dy, dz, "
        f"phi_x, phi_y, phi_z) / target_scale, motion (dx px, dy px, phi deg)"
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from kmotion.demo import plot_base_images
    from kmotion.io import load_base_images

    base = load_base_images(args.path)
    print(
        f"{args.path}: {base.images.shape[0]} image(s), {base.images.shape[1]} coil(s), matrix "
        f"{base.images.shape[2]} x {base.images.shape[3]} (y x x), FOV {base.fov_mm[0]:.1f} x "
        f"{base.fov_mm[1]:.1f} mm, pixel {base.pixel_spacing_mm[0]:.3f} x {base.pixel_spacing_mm[1]:.3f} mm"
    )
    if args.out:
        plot_base_images(base, Path(args.out))
        print(f"wrote {args.out}")
    return 0


def _cmd_simulate_intra_scan(args: argparse.Namespace) -> int:
    from kmotion.physics.validate import InputError
    from kmotion.simulation.intra_scan import IntraScanConfig, simulate_intra_scan, write_intra_scan

    for flag, given in (("--repetitions", args.repetitions is not None), ("--waveforms", args.waveforms)):
        if given:
            raise InputError(f"{flag} is not an option of --intra-scan (use --reference-repetitions N)")
    cfg = IntraScanConfig(
        matrix=tuple(args.matrix),
        fov_mm=tuple(args.fov),
        n_coils=args.coils,
        n_slices=args.slices,
        ordering=args.ordering,
        echo_train_length=16 if args.echo_train_length is None else args.echo_train_length,
        calibration_lines=0 if args.no_calibration else args.calibration_lines,
        separate_calibration=args.separate_calibration,
        readout_oversampling=1 if args.no_oversampling else 2,
        snr=None if args.snr <= 0 else args.snr,
        t2_ms=None if args.t2_ms <= 0 else args.t2_ms,
        pattern=args.pattern,
        max_mm=args.max_mm,
        max_deg=args.max_deg,
        reference_repetitions=args.reference_repetitions,
        seed=args.seed,
    )
    acq = simulate_intra_scan(cfg)
    out = write_intra_scan(acq, args.out)
    cal = (
        f"{cfg.calibration_lines} calibration lines "
        + ("in a separate scan (encoding space 1)" if cfg.separate_calibration else "in the echo trains")
        if cfg.calibration_lines
        else "no calibration lines"
    )
    print(
        f"wrote {out}: {len(acq.acquisitions)} acquisitions ({cfg.n_coils} coils, {cfg.n_slices} slice(s), "
        f"matrix {cfg.matrix[0]} x {cfg.matrix[1]}, R = {cfg.acceleration}, {cal}), "
        f"{acq.sampling.n_shots} echo trains of up to {cfg.echo_train_length} ({cfg.ordering}), "
        f"{cfg.reference_repetitions} motion-free reference repetition(s) before the moved scan; "
        f"per-shot true motion in /dataset/kmotion_true_motion"
    )
    gauge = (
        "relative to the reference repetition 0"
        if cfg.reference_repetitions
        else f"relative to shot {acq.centre_shot}, the one reading the k-space centre (the scan's pose)"
    )
    print(f"moved repetition {cfg.n_repetitions - 1}, pattern {cfg.pattern}, motion {gauge}:")
    print("repetition,shot,dx_px,dy_px,phi_deg,dx_mm,dy_mm")
    for t in acq.truth:
        if t.slice == 0 and t.repetition == cfg.n_repetitions - 1:
            print(
                f"{t.repetition},{t.shot},{t.dx_px:.3f},{t.dy_px:.3f},{t.phi_deg:.3f},{t.dx_mm:.3f},"
                f"{t.dy_mm:.3f}"
            )
    return 0


def cmd_simulate_raw(args: argparse.Namespace) -> int:
    from kmotion.simulation.raw import RawConfig, simulate_raw, write_raw

    if args.intra_scan:
        return _cmd_simulate_intra_scan(args)
    cfg = RawConfig(
        matrix=tuple(args.matrix),
        fov_mm=tuple(args.fov),
        n_coils=args.coils,
        n_slices=args.slices,
        n_repetitions=12 if args.repetitions is None else args.repetitions,
        calibration_lines=0 if args.no_calibration else args.calibration_lines,
        readout_oversampling=1 if args.no_oversampling else 2,
        echo_train_length=8 if args.echo_train_length is None else args.echo_train_length,
        snr=None if args.snr <= 0 else args.snr,
        seed=args.seed,
        waveforms=args.waveforms,
    )
    raw = simulate_raw(cfg)
    out = write_raw(raw, args.out)
    n_acq = len(raw.acquisitions)
    print(
        f"wrote {out}: {n_acq} acquisitions ({cfg.n_coils} coils, {cfg.n_slices} slice(s), "
        f"{cfg.n_repetitions} repetitions, matrix {cfg.matrix[0]} x {cfg.matrix[1]}, FOV "
        f"{cfg.fov_mm[0]:g} x {cfg.fov_mm[1]:g} mm, R = {cfg.acceleration}, {cfg.calibration_lines} "
        f"calibration lines), true motion in /dataset/kmotion_true_motion:"
    )
    print("repetition,dx_px,dy_px,phi_deg,dx_mm,dy_mm")
    for t in raw.truth:
        if t.slice == 0:
            print(f"{t.repetition},{t.dx_px:.3f},{t.dy_px:.3f},{t.phi_deg:.3f},{t.dx_mm:.3f},{t.dy_mm:.3f}")
    return 0


def _simulate_raw_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "simulate-raw", help="write a simulated multi-coil ISMRMRD acquisition with known motion (.h5)"
    )
    r.add_argument("out", help="ISMRMRD .h5 file to write (replaced if present)")
    r.add_argument(
        "--matrix", type=int, nargs=2, default=(256, 256), metavar=("N_Y", "N_X"), help="recon matrix"
    )
    r.add_argument("--fov", type=float, nargs=2, default=(220.0, 220.0), metavar=("FOV_Y", "FOV_X"))
    r.add_argument("--coils", type=int, default=8)
    r.add_argument("--slices", type=int, default=2)
    r.add_argument("--repetitions", type=int, default=None, help="repetition 0 is motion-free (default 12)")
    r.add_argument("--snr", type=float, default=30.0, help="SNR of the complex noise (0: no noise)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--calibration-lines", type=int, default=24, help="fully sampled centre block")
    r.add_argument("--no-calibration", action="store_true", help="no calibration block")
    r.add_argument("--no-oversampling", action="store_true", help="no 2x readout oversampling")
    r.add_argument(
        "--echo-train-length", "--etl", type=int, default=None, help="default 8 (--intra-scan: 16)"
    )
    r.add_argument("--waveforms", action="store_true", help="add a respiratory waveform per repetition")
    m = r.add_argument_group("motion within the scan (--intra-scan)")
    m.add_argument(
        "--intra-scan",
        action="store_true",
        help="one multi-shot scan whose object moves between echo trains (per-shot truth)",
    )
    m.add_argument(
        "--ordering",
        default="interleaved",
        choices=("linear", "centric", "interleaved", "checkered", "linear_checkered"),
        help="which rows each echo train reads",
    )
    m.add_argument(
        "--pattern", default="steps", choices=("steps", "drift", "jerk", "random", "none"), help="motion"
    )
    m.add_argument("--max-mm", type=float, default=10.0, help="largest translation per axis [mm]")
    m.add_argument("--max-deg", type=float, default=10.0, help="largest rotation [deg]")
    m.add_argument("--t2-ms", type=float, default=0.0, help="T2 decay along the echo train (0: none)")
    m.add_argument(
        "--separate-calibration",
        action="store_true",
        help="calibration lines as a separate motion-free scan in encoding space 1",
    )
    m.add_argument(
        "--reference-repetitions",
        type=int,
        default=0,
        help="motion-free repetitions before the moved scan (0: the gauge is the shot reading the centre)",
    )
    r.set_defaults(func=cmd_simulate_raw)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch intra-op CPU threads inside the block (0: leave torch's setting); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_THREADS_HELP = (
    "torch CPU threads (default 1: the per-slice tensors are small, and on a shared 2-core machine two "
    "threads were ~25x slower than one; 0: torch's default)"
)


def cmd_replay(args: argparse.Namespace) -> int:
    with _threads(args.threads):
        return _run_replay(args)


def _run_replay(args: argparse.Namespace) -> int:
    from kmotion.frontends.replay import replay
    from kmotion.gadget.params import GadgetParams

    params = GadgetParams(
        model=args.model,
        device=args.device,
        output=args.output,
        min_correction=args.min_correction,
        reference_repetition=args.reference_repetition,
        motion_model=args.motion_model,
        threads=args.threads,
    )
    res = replay(
        args.input,
        args.out,
        params,
        motion_csv=args.motion_csv,
        dataset=args.dataset,
        progress=False if args.no_progress else None,
        out_format=args.format,
    )
    n_corr = sum(r["corrected"] for r in res.rows)
    print(
        f"wrote {res.out}: {res.n_acquisitions} acquisitions, {res.n_waveforms} waveforms, "
        f"{len(res.rows)} slice estimates ({n_corr} corrected), {res.n_images_uncorrected} + "
        f"{res.n_images_corrected} images (before + after the correction) in {res.seconds:.1f} s"
    )
    if args.motion_csv:
        print(f"wrote {args.motion_csv}")
    if res.summary:
        s = res.summary
        print(
            f"MAE vs the stored true motion over {int(s['n'])} moved slices: dx {s['mae_dx_px']:.3f} px, "
            f"dy {s['mae_dy_px']:.3f} px, rot {s['mae_rot_deg']:.3f} deg ({s['mae_dx_mm']:.3f} / "
            f"{s['mae_dy_mm']:.3f} mm)"
        )
    return 0


def _replay_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("replay", help="stream an ISMRMRD .h5 file through the motion-correction gadget")
    r.add_argument("input", help="ISMRMRD .h5 raw data, or an MRD v2 (mrd-python binary) file")
    r.add_argument("out", help="file to write: corrected acquisitions, images, estimates")
    r.add_argument(
        "--format",
        default="auto",
        choices=("auto", "mrd1", "mrd2"),
        help="output: mrd1 = ISMRMRD .h5, mrd2 = MRD v2 binary stream file (default auto: the input's)",
    )
    r.add_argument("--motion-csv", default=None, help="CSV of the estimates, one row per slice/repetition")
    r.add_argument("--model", default=None, help="estimator weights (.safetensors; default: shipped)")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r.add_argument("--output", default="cartesian", choices=("cartesian", "trajectory"))
    r.add_argument("--min-correction", type=float, default=0.1, help="skip smaller corrections [px, deg]")
    r.add_argument("--reference-repetition", type=int, default=None, help="default: first complete one")
    r.add_argument(
        "--motion-model",
        default="auto",
        choices=("auto", "repetition", "shot"),
        help="one pose per slice group or per echo train (auto: per echo train when the scan has one "
        "repetition and a slice group holds several trains; docs/intra_scan.md)",
    )
    r.add_argument("--dataset", default="dataset", help="ISMRMRD group in the file")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--threads", type=int, default=1, help=_THREADS_HELP)
    r.set_defaults(func=cmd_replay)


# ---- running the gadget: kmotion stream / serve / gadgetron ------------------------------------------


def _gadget_options(p: argparse.ArgumentParser) -> None:
    """Gadget parameters (``GadgetParams``); only the given ones are passed on."""
    g = p.add_argument_group("gadget parameters (default: the stream's own, else GadgetParams defaults)")
    g.add_argument("--model", default=None, help="weights (.safetensors); default: the shipped model")
    g.add_argument("--device", default=None, help="auto | cpu | cuda")
    g.add_argument("--output", default=None, help="cartesian | trajectory")
    g.add_argument("--min-correction", default=None, help="skip smaller corrections (px / degrees)")
    g.add_argument("--reference-repetition", default=None, help="reference repetition (default: first)")
    g.add_argument("--motion-model", default=None, help="auto | repetition | shot (docs/intra_scan.md)")
    g.add_argument("--threads", default=None, help="torch CPU threads (default 1; 0: torch's default)")
    g.add_argument("--batch-slices", default=None, help="slices estimated together")
    g.add_argument("--sense-iterations", default=None, help="iterations of the Cartesian correction")
    g.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="any gadget property (repeatable)"
    )
    p.add_argument("--max-message-mb", type=float, default=1024.0, help="largest accepted message (MiB)")


def _gadget_properties(args: argparse.Namespace) -> dict[str, str]:
    from dataclasses import fields

    from kmotion.gadget.params import GadgetParams
    from kmotion.physics.validate import InputError

    props: dict[str, str] = {}
    for name in (f.name for f in fields(GadgetParams)):  # the options mirror the gadget's parameters
        v = getattr(args, name, None)
        if v is not None:
            props[name] = str(v)
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InputError(f"--set: expected NAME=VALUE, got {item!r}")
        props[name.strip()] = value.strip()
    return props


def _limits(args: argparse.Namespace):  # noqa: ANN202
    from kmotion.io.mrd_v1 import Limits

    return Limits(max_bytes=int(args.max_message_mb * (1 << 20)))


def cmd_stream(args: argparse.Namespace) -> int:
    from kmotion.frontends.mrd_stream import run_stream

    props = _gadget_properties(args)
    return run_stream(
        sys.stdin.buffer,
        sys.stdout.buffer,
        props,
        images=args.images,
        limits=_limits(args),
        out_format=args.format,
        motion_csv=args.motion_csv,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from kmotion.frontends.fire_server import serve

    props = _gadget_properties(args)
    try:
        serve(
            args.port,
            args.host,
            props,
            max_connections=args.max_connections,
            idle_timeout=args.idle_timeout or None,
            limits=_limits(args),
        )
    except KeyboardInterrupt:
        log.info("kmotion serve: stopped")
    except OSError as exc:  # address in use, permission denied
        print(f"kmotion serve: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_gadgetron(args: argparse.Namespace) -> int:
    from kmotion.frontends.gadgetron import serve_gadgetron

    try:
        serve_gadgetron(args.port, args.host, max_connections=args.max_connections)
    except KeyboardInterrupt:
        log.info("kmotion gadgetron: stopped")
    except OSError as exc:  # address in use, permission denied
        print(f"kmotion gadgetron: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_gadget_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    st = sub.add_parser(
        "stream",
        help="MRD v1 or v2 stream on stdin -> motion-corrected stream on stdout (log on stderr)",
    )
    _gadget_options(st)
    st.add_argument("--images", action="store_true", help="also send the reconstructed images")
    st.add_argument(
        "--format",
        default="auto",
        choices=("auto", "mrd1", "mrd2"),
        help="output stream format (default auto: the input's, detected from its first bytes)",
    )
    st.add_argument("--motion-csv", default=None, help="also write the estimates to this CSV file")
    st.set_defaults(func=cmd_stream)

    sv = sub.add_parser("serve", help="FIRE-style MRD server (python-ismrmrd-server clients)")
    sv.add_argument("--port", type=int, default=9002)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    sv.add_argument("--idle-timeout", type=float, default=300.0, help="seconds of silence before giving up")
    sv.add_argument("--max-connections", type=int, default=None, help="stop after this many (default: never)")
    _gadget_options(sv)
    sv.set_defaults(func=cmd_serve)

    gt = sub.add_parser("gadgetron", help="the Gadgetron external gadget, listening for <connect port=...>")
    gt.add_argument("--port", type=int, default=18000)
    gt.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    gt.add_argument("--max-connections", type=int, default=None, help="stop after this many (default: never)")
    gt.set_defaults(func=cmd_gadgetron)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kmotion", description="Deep-learning rigid motion estimation in MRI k-space"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo",
        help="the streaming demo: simulate-raw -> replay -> report (--pairs: the study's training pairs)",
    )
    _study_args(d)
    d.set_defaults(matrix=None, coils=None)
    d.add_argument("--out", default="demo_out", help="output folder")
    d.add_argument("--pairs", action="store_true", help="the training-pairs demo instead (old default)")
    d.add_argument(
        "--twix",
        nargs="?",
        const=str(_default_twix()),
        default=None,
        metavar="PATH",
        help="the streaming demo on the Siemens phantom (default: the .dat in ../shared/data)",
    )
    d.add_argument("--slices", type=int, default=2, help="streaming demo: slices")
    d.add_argument(
        "--repetitions",
        type=int,
        default=None,
        help="streaming demo: repetitions, 0 = reference (12; --twix 6)",
    )
    d.add_argument("--no-progress", action="store_true")
    d.add_argument(
        "--intra-scan",
        action="store_true",
        help="the intra-scan demo: a multi-shot TSE with motion between echo trains, shot motion model",
    )
    d.add_argument(
        "--reference",
        choices=("repetition", "calibration"),
        default="repetition",
        help="--intra-scan: a motion-free repetition before the scan, or a separate calibration scan",
    )
    d.add_argument(
        "--ordering",
        choices=("linear", "centric", "interleaved", "checkered", "linear_checkered"),
        default="checkered",
        help="--intra-scan: echo-train ordering",
    )
    d.add_argument("--etl", type=int, default=16, help="--intra-scan: echo-train length")
    d.add_argument(
        "--pattern",
        choices=("steps", "drift", "jerk", "random", "none"),
        default="steps",
        help="--intra-scan: motion pattern",
    )
    d.add_argument("--threads", type=int, default=1, help="streaming demo: " + _THREADS_HELP)
    d.add_argument("--n-show", type=int, default=4, help="--pairs: pairs to draw")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("simulate", help="simulate training pairs and save them as .npz")
    _study_args(s)
    s.add_argument("--n-pairs", type=int, default=256)
    s.add_argument("--raw", default=None, help="use base images from this raw-data file instead of phantoms")
    s.add_argument(
        "--pad-fov",
        type=float,
        default=1.0,
        help="with --raw: zero-pad the images so the FOV grows by this factor (object inside the circle)",
    )
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_simulate)

    sub.add_parser("train", help="train the network (options: kmotion train --help)", add_help=False)

    i = sub.add_parser("inspect", help="load raw data as base images (and plot them)")
    i.add_argument("path")
    i.add_argument("--out", default=None, help="PNG to write")
    i.set_defaults(func=cmd_inspect)

    _simulate_raw_parser(sub)
    _replay_parser(sub)
    _add_gadget_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the training command owns its options
        from model_training.train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from kmotion.physics.validate import InputError

    try:
        return int(args.func(args))
    except (InputError, FileNotFoundError, IsADirectoryError) as exc:
        print(f"kmotion {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
