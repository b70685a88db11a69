"""The motion-correction pipeline: reference -> estimate -> correct -> re-emit (stages 3-6 of the gadget).

:class:`MotionCorrector` is one callable ``Iterable[object] -> Iterator[object]`` over ISMRMRD objects,
built on :func:`kmotion.gadget.stages.buffer_slices` and :func:`~kmotion.gadget.stages.assemble`; every
way of running the gadget (Gadgetron, replay, MRD stream, FIRE server) wraps it.  See ``docs/gadget.md``.

Output contract: every input item leaves exactly once (acquisitions corrected or untouched, with their
headers, waveforms and anything else untouched); for each imaging slice group one :class:`MotionReport` is
yielded immediately before that slice's acquisitions, which keep their arrival order.  Data problems never
raise: the slice passes through untouched with a reason in its report and a WARNING on ``kmotion.gadget``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import ismrmrd
import ismrmrd.xsd
import numpy as np
import torch

from kmotion.estimation.network import NetworkEstimator
from kmotion.gadget.stages import (
    AssembledSlice,
    SliceBuffer,
    SliceGeometry,
    SliceKey,
    assemble,
    buffer_slices,
)
from kmotion.io.ismrmrd_h5 import centred_length, readout_grid
from kmotion.physics.fft import fft1c, ifft1c
from kmotion.physics.sense import MotionSense, calibration_block, coil_maps_lowres, sense_reconstruct
from kmotion.physics.validate import InputError

__all__ = [
    "DEFAULT_MODEL",
    "CalibrationStore",
    "GadgetParams",
    "MotionCorrector",
    "MotionReport",
    "motion_correct",
]

_REFINE_ROWS = 128
"""Acquired rows about the centre given to the estimator when the data hold them (the network reads its own
64; the data-consistency refinement uses up to ``refine_crop`` rows of them)."""

log = logging.getLogger("kmotion.gadget")

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "default.safetensors"
"""The shipped estimator weights, used when ``GadgetParams.model`` is None."""

MIN_CALIBRATION_ROWS = 8
"""Fewest consecutive fully sampled centre rows from which coil maps are estimated."""

SENSE_LAMBDA = 1e-2
"""Tikhonov weight of the cartesian correction and of :func:`~kmotion.gadget.recon.reconstruct_slice`
(absolute; maps have unit RSS, see ``physics/sense.py``).  1e-2 rather than 1e-3: with 20 CG iterations it
stops the fit of coil-map errors (semi-convergence), halving the correction error (``docs/gadget.md``)."""

_DEVICES = ("auto", "cpu", "cuda")
_OUTPUTS = ("cartesian", "trajectory")
_NONE_WORDS = ("", "none", "null", "default", "auto")


def _is_calibration_only(item: object) -> bool:
    return (
        isinstance(item, ismrmrd.Acquisition)
        and item.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
        and not item.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
        and int(item.encoding_space_ref) == 0
    )


# ------------------------------------------------------------------------------------------------------
# parameters


def _bad(name: str, expected: str, got: object) -> InputError:
    return InputError(f"gadget parameter '{name}': expected {expected}, got {got!r}")


def _as_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool):
        raise _bad(name, f"an integer >= {minimum}", value)
    try:
        out = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise _bad(name, f"an integer >= {minimum}", value) from None
    if out < minimum:
        raise _bad(name, f"an integer >= {minimum}", value)
    return out


@dataclass(frozen=True)
class GadgetParams:
    """Gadget parameters (every one documented in ``docs/gadget.md``)."""

    model: str | None = None
    """Path to ``.safetensors`` weights; None: the shipped ``kmotion/models/default.safetensors``."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda`` (also ``cuda:N``)."""
    output: str = "cartesian"
    """``cartesian`` (SENSE-type correction on the acquired lines) or ``trajectory`` (ramp + rotated traj)."""
    min_correction: float = 0.1
    """Skip correction when |dx|, |dy| < this [px] and |phi| < this [deg]."""
    reference_repetition: int | None = None
    """None: the first complete, correctable repetition per (slice, contrast, set)."""
    batch_slices: int = 8
    """Slices estimated together when several complete back to back."""
    sense_iterations: int = 20
    """Conjugate-gradient iterations of the cartesian correction."""

    def __post_init__(self) -> None:
        if self.model is not None and not isinstance(self.model, str | Path):
            raise _bad("model", "a path or None", self.model)
        if not isinstance(self.device, str) or not (
            self.device in _DEVICES or self.device.startswith("cuda:") and self.device[5:].isdigit()
        ):
            raise _bad("device", "auto, cpu, cuda or cuda:N", self.device)
        if self.output not in _OUTPUTS:
            raise _bad("output", "cartesian or trajectory", self.output)
        mc = self.min_correction
        if isinstance(mc, bool) or not isinstance(mc, int | float) or not math.isfinite(mc) or mc < 0:
            raise _bad("min_correction", "a finite number >= 0", mc)
        if self.reference_repetition is not None:
            _as_int("reference_repetition", self.reference_repetition, 0)
        _as_int("batch_slices", self.batch_slices, 1)
        _as_int("sense_iterations", self.sense_iterations, 1)

    @classmethod
    def from_properties(cls, props: Mapping[str, object] | str) -> GadgetParams:
        """Parameters from ``<property name=.. value=..>`` strings (a mapping) or a JSON object text.

        Values may be strings (XML) or JSON values.  ``model`` and ``reference_repetition`` accept
        ``""``/``none``/``default``/``auto`` for None.  Unknown names or bad values raise
        :class:`InputError` naming the parameter, expected vs got.
        """
        if isinstance(props, str):
            try:
                loaded = json.loads(props) if props.strip() else {}
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"gadget parameters: expected a JSON object, got {props[:80]!r} ({exc})"
                ) from exc
            if not isinstance(loaded, dict):
                raise InputError(f"gadget parameters: expected a JSON object, got {type(loaded).__name__}")
            props = loaded
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, object] = {}
        for name, value in props.items():
            if name not in names:
                raise InputError(f"gadget parameter '{name}': unknown; expected one of {sorted(names)}")
            text = "" if value is None else str(value).strip()
            if name in ("model", "reference_repetition") and text.lower() in _NONE_WORDS:
                kwargs[name] = None
            elif name == "model":
                kwargs[name] = text
            elif name in ("device", "output"):
                kwargs[name] = text.lower()
            elif name == "min_correction":
                try:
                    kwargs[name] = float(text)
                except ValueError:
                    raise _bad(name, "a finite number >= 0", value) from None
            else:
                minimum = 0 if name == "reference_repetition" else 1
                kwargs[name] = _as_int(name, value if isinstance(value, int) else text, minimum)
        return cls(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------
# reports


@dataclass
class MotionReport:
    """The estimate of one slice group relative to its reference repetition.

    ``dx_px``/``dy_px`` in pixels of the data's encoded grid (x = readout, y = phase encode), ``rot_deg`` in
    degrees (positive: from +x towards +y, see ``docs/conventions.md``), ``dx_mm``/``dy_mm`` in mm,
    ``patient_mm`` the translation ``dx_mm * read_dir + dy_mm * phase_dir`` in the patient frame.  NaN where
    nothing was estimated.
    """

    key: SliceKey
    reference_repetition: int
    dx_px: float
    dy_px: float
    rot_deg: float
    dx_mm: float
    dy_mm: float
    patient_mm: tuple[float, float, float]
    flagged: bool
    corrected: bool
    reason: str

    def as_dict(self) -> dict[str, object]:
        """JSON-able dict (NaN becomes None)."""

        def num(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None

        return {
            "slice": int(self.key.slice),
            "contrast": int(self.key.contrast),
            "repetition": int(self.key.repetition),
            "set": int(self.key.set),
            "reference_repetition": int(self.reference_repetition),
            "dx_px": num(self.dx_px),
            "dy_px": num(self.dy_px),
            "rot_deg": num(self.rot_deg),
            "dx_mm": num(self.dx_mm),
            "dy_mm": num(self.dy_mm),
            "patient_x_mm": num(self.patient_mm[0]),
            "patient_y_mm": num(self.patient_mm[1]),
            "patient_z_mm": num(self.patient_mm[2]),
            "flagged": bool(self.flagged),
            "corrected": bool(self.corrected),
            "reason": self.reason,
        }

    def log_line(self) -> str:
        """One line: counters, px, mm, deg, patient mm, flags and the reason."""
        k = self.key
        p = self.patient_mm
        line = (
            f"slice {k.slice} contrast {k.contrast} rep {k.repetition} set {k.set} "
            f"(ref rep {self.reference_repetition}): dx {self.dx_px:+.2f} px ({self.dx_mm:+.2f} mm) "
            f"dy {self.dy_px:+.2f} px ({self.dy_mm:+.2f} mm) rot {self.rot_deg:+.2f} deg; "
            f"patient ({p[0]:+.2f}, {p[1]:+.2f}, {p[2]:+.2f}) mm; flagged {self.flagged}, "
            f"corrected {self.corrected}"
        )
        return f"{line}; {self.reason}" if self.reason else line


_NAN3 = (math.nan, math.nan, math.nan)


def _report(key: SliceKey, ref_rep: int, reason: str, zeros: bool = False) -> MotionReport:
    v = 0.0 if zeros else math.nan
    return MotionReport(key, ref_rep, v, v, v, v, v, (v, v, v), False, False, reason)


# ------------------------------------------------------------------------------------------------------
# calibration data


class CalibrationStore:
    """Calibration-only lines (``ACQ_IS_PARALLEL_CALIBRATION``) per (slice, contrast, set).

    Only the lines of the first repetition seen for a group are kept.
    """

    def __init__(self, geometry: SliceGeometry) -> None:
        self.geometry = geometry
        self._lines: dict[tuple[int, int, int], list[ismrmrd.Acquisition]] = {}
        self._rep: dict[tuple[int, int, int], int] = {}

    def note(self, item: object) -> bool:
        """Keep ``item`` if it is a calibration-only line; True if it is one."""
        if not _is_calibration_only(item):
            return False
        assert isinstance(item, ismrmrd.Acquisition)
        i = item.idx
        g = (int(i.slice), int(i.contrast), int(i.set))
        rep = self._rep.setdefault(g, int(i.repetition))
        if int(i.repetition) == rep:
            self._lines.setdefault(g, []).append(item)
        return True

    def kspace_for(self, ref: AssembledSlice) -> tuple[np.ndarray, tuple[int, int]] | str:
        """The calibration k-space of a reference slice and its fully sampled centre block ``[lo, hi)``.

        Calibration lines of the reference's own repetition fill the rows the reference lacks.  Lines of
        another repetition (the object may have moved in between) are not mixed with the reference: they
        are used alone when they hold a block (coil sensitivities do not move), else the reference alone.
        Returns a reason string when fewer than :data:`MIN_CALIBRATION_ROWS` centre rows are fully sampled.
        """
        kspace = ref.kspace
        mask = ref.mask.copy()
        g = (ref.key.slice, ref.key.contrast, ref.key.set)
        lines = self._lines.get(g, [])
        if lines:
            try:
                cal = assemble(SliceBuffer(ref.key, list(lines), self.geometry, True), quiet=True)
                if cal.kspace.shape != kspace.shape:
                    log.info(
                        "calibration lines of %s on another grid %s than the slice %s: ignored",
                        tuple(ref.key),
                        cal.kspace.shape,
                        kspace.shape,
                    )
                elif self._rep[g] == ref.key.repetition:
                    kspace = np.where(cal.mask[None, :, None] & ~mask[None, :, None], cal.kspace, kspace)
                    mask = mask | cal.mask
                else:
                    lo, hi = calibration_block(cal.mask)
                    if hi - lo >= MIN_CALIBRATION_ROWS:
                        kspace, mask = cal.kspace, cal.mask
            except InputError as exc:
                log.info("calibration lines of %s unusable: %s", tuple(ref.key), exc)
        rows = calibration_block(mask)
        if rows[1] - rows[0] < MIN_CALIBRATION_ROWS:
            return (
                f"no calibration data (need >= {MIN_CALIBRATION_ROWS} fully sampled centre rows in the "
                f"reference or ACS lines, got {rows[1] - rows[0]})"
            )
        return kspace, rows


def coil_maps_for(ref: AssembledSlice, store: CalibrationStore, device: torch.device) -> torch.Tensor | str:
    """Coil maps ``(n_coils, n_y, n_x)`` of a reference slice, or the reason why there are none."""
    got = store.kspace_for(ref)
    if isinstance(got, str):
        return got
    kspace, rows = got
    n_c = kspace.shape[0]
    if n_c < ref.acceleration:
        return f"ill-posed: {n_c} coils for acceleration {ref.acceleration}"
    aspect = ref.fov_mm[1] / ref.fov_mm[0]  # same k-extent in cycles/mm along x as the row block
    return coil_maps_lowres(torch.from_numpy(kspace).to(device), rows, aspect=aspect)


# ------------------------------------------------------------------------------------------------------
# write-back helpers (inverse of the placement in ``stages.assemble``)


@dataclass
class _Line:
    acq: ismrmrd.Acquisition
    row: int
    col: int  # grid column (readout grid of n_ro samples) of sample ``pre``
    pre: int
    n: int  # samples kept (after discard_pre / discard_post)
    centre: int  # centre sample index in the raw line (center_sample, 0 -> n_samples // 2)


def _layout(buffer: SliceBuffer) -> tuple[int, int, list[_Line]]:
    """Readout grid length ``n_ro``, returned ``n_x`` and each line's place, exactly as ``assemble``."""
    geo = buffer.geometry
    enc = geo.encoding
    n_ky = enc.encoded_matrix[1]
    c_ky = geo.step1_range[2]
    lines = []
    lengths = []
    for a in buffer.acquisitions:
        n_s, pre, post = int(a.number_of_samples), int(a.discard_pre), int(a.discard_post)
        n = n_s - post - pre
        raw_centre = int(a.center_sample) or n_s // 2
        centre = raw_centre - pre
        if 0 <= centre < n:
            lengths.append(centred_length(n, centre))
        lines.append((a, n_s, pre, n, centre, raw_centre))
    n_ro, n_x, _ = readout_grid(enc, max(lengths, default=enc.encoded_matrix[0]))
    out = []
    for a, _n_s, pre, n, centre, raw_centre in lines:
        row = int(a.idx.kspace_encode_step_1) - c_ky + n_ky // 2
        out.append(_Line(a, row, n_ro // 2 - centre, pre, n, raw_centre))
    return n_ro, n_x, out


def _upsample_readout(k: np.ndarray, n_ro: int) -> np.ndarray:
    """Inverse of the readout crop of ``assemble``: zero-pad the image along x from ``n_x`` to ``n_ro``."""
    n_x = k.shape[-1]
    if n_ro == n_x:
        return k
    img = ifft1c(torch.from_numpy(k), -1)
    pad = torch.zeros((*img.shape[:-1], n_ro), dtype=img.dtype)
    start = n_ro // 2 - n_x // 2
    pad[..., start : start + n_x] = img
    return fft1c(pad, -1).numpy()


def _add_delta(buffer: SliceBuffer, delta: np.ndarray) -> list[tuple[ismrmrd.Acquisition, np.ndarray]]:
    """New data of every line: raw line + ``delta`` (assembled grid) placed back on its samples."""
    n_ro, _, lines = _layout(buffer)
    d = _upsample_readout(delta.astype(np.complex64), n_ro)
    out = []
    for ln in lines:
        data = np.array(ln.acq.data, dtype=np.complex64, copy=True)
        if 0 <= ln.row < d.shape[1] and ln.col >= 0 and ln.col + ln.n <= n_ro:
            data[:, ln.pre : ln.pre + ln.n] += d[:, ln.row, ln.col : ln.col + ln.n]
        out.append((ln.acq, data))
    return out


def _ramp_lines(
    buffer: SliceBuffer, n_ky: int, dx_px: float, dy_px: float
) -> list[tuple[ismrmrd.Acquisition, np.ndarray, np.ndarray, np.ndarray]]:
    """Each line with the exact inverse translation ramp applied, and its k positions in cycles/FOV.

    Returns ``(acq, new_data, kx, ky)``: ``kx`` per sample in cycles per FOV_x of the assembled grid
    (fractional steps ``n_x / n_ro`` for an oversampled readout), ``ky`` (scalar array) in cycles per FOV_y.
    """
    n_ro, n_x, lines = _layout(buffer)
    out = []
    for ln in lines:
        n_s = int(ln.acq.number_of_samples)
        kx = (np.arange(n_s) - ln.centre) * (n_x / n_ro)
        ky = np.array(float(ln.row - n_ky // 2))
        phase = 2 * np.pi * (kx * dx_px / n_x + ky * dy_px / n_ky)
        data = np.array(ln.acq.data, dtype=np.complex64) * np.exp(1j * phase).astype(np.complex64)
        out.append((ln.acq, data, kx, ky))
    return out


# ------------------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class _Reference:
    slice: AssembledSlice
    maps: torch.Tensor | str | None = None  # None: not computed yet; str: why there are none


@dataclass
class _Work:
    buffer: SliceBuffer
    report: MotionReport | None = None
    assembled: AssembledSlice | None = None
    reference: _Reference | None = None
    crops: tuple[torch.Tensor, torch.Tensor] | None = None
    new_data: list[tuple[ismrmrd.Acquisition, np.ndarray]] | None = None
    traj: list[np.ndarray] | None = None


class _Tick:
    """Marker fed after every input item: it passes through ``buffer_slices`` untouched."""


_TICK = _Tick()


class _Source:
    """The input items, each followed by :data:`_TICK`; an exception of the source ends the stream and is
    kept in ``error`` (so the held slices are still emitted before it is re-raised)."""

    def __init__(self, items: Iterable[object]) -> None:
        self.items = items
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[object]:
        try:
            for item in self.items:
                yield item
                yield _TICK
        except Exception as exc:
            self.error = exc


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise _bad("device", "auto or cpu (CUDA is not available on this machine)", device)
    return torch.device(device)


class MotionCorrector:
    """Streaming rigid motion estimation and correction (see the module docstring and ``docs/gadget.md``).

    Parameters
    ----------
    header
        The stream's ``ismrmrd.xsd`` header (first encoding, Cartesian).
    params
        Gadget parameters.

    Raises
    ------
    InputError
        For a header without a usable Cartesian encoding, a missing or corrupt model, or an unusable device.
    """

    def __init__(self, header: ismrmrd.xsd.ismrmrdHeader, params: GadgetParams | None = None) -> None:
        self.params = GadgetParams() if params is None else params
        self.header = header
        self.geometry = SliceGeometry.from_header(header)
        self.device = _resolve_device(self.params.device)
        path = Path(self.params.model) if self.params.model else DEFAULT_MODEL
        self.estimator = NetworkEstimator.load(path, self.device)
        self.net_crop: tuple[int, int] = tuple(self.estimator.model.config.crop)  # type: ignore[assignment]
        self.net_acceleration = int(self.estimator.study.acceleration)
        self.calibration = CalibrationStore(self.geometry)
        self.references: dict[tuple[int, int, int], _Reference] = {}

    # -- driver ----------------------------------------------------------------------------------------
    def __call__(self, items: Iterable[object]) -> Iterator[object]:
        """Run the pipeline over ``items`` (see the module docstring for the output contract).

        Batching: completed slices wait while the following input items each complete another slice (up to
        ``batch_slices``); any other item (a line that completes nothing, a pass-through item, the end of
        the stream) flushes them first, so no slice waits for more than the next input item.

        An exception raised by ``items`` itself (e.g. a broken connection) ends the stream: the slices held
        so far (incomplete ones included) are emitted first, then the exception is re-raised.

        Each call is one stream: references and calibration lines of an earlier call are forgotten (the
        estimator stays loaded), so one corrector can serve several streams in a row, not at once.
        """
        self.calibration = CalibrationStore(self.geometry)
        self.references = {}
        pending: list[SliceBuffer] = []
        produced = False
        source = _Source(items)
        for out in buffer_slices(source, self.header):
            if out is _TICK:
                if not produced and pending:
                    yield from self._flush(pending)
                    pending = []
                produced = False
                continue
            produced = True
            if isinstance(out, SliceBuffer):
                pending.append(out)
                if len(pending) >= self.params.batch_slices:
                    yield from self._flush(pending)
                    pending = []
                continue
            if pending:
                yield from self._flush(pending)
                pending = []
            self.calibration.note(out)
            yield out
        if pending:
            yield from self._flush(pending)
        if source.error is not None:
            log.warning(
                "input stream failed (%s: %s): everything received was emitted, then the error is re-raised",
                type(source.error).__name__,
                source.error,
            )
            raise source.error

    def _flush(self, buffers: list[SliceBuffer]) -> Iterator[object]:
        t0 = time.perf_counter()
        work = [_Work(b) for b in buffers]
        try:
            self._process(work)
        except Exception as exc:  # never raise out of the stream for a data problem
            log.warning("motion correction of %d slice(s) failed: %s: %s", len(work), type(exc).__name__, exc)
            for w in work:
                if w.report is None or w.report.corrected:
                    ref_rep = w.reference.slice.key.repetition if w.reference else -1
                    w.report = _report(w.buffer.key, ref_rep, f"failed: {type(exc).__name__}: {exc}")
                w.new_data = w.traj = None
        dt = time.perf_counter() - t0
        for w in work:
            assert w.report is not None
            if w.new_data is not None:
                for i, (acq, data) in enumerate(w.new_data):
                    if w.traj is not None:
                        acq.resize(int(acq.number_of_samples), int(acq.active_channels), 2)
                        acq.traj[:] = w.traj[i]
                    acq.data[:] = data
            normal = w.report.corrected or w.report.reason in ("reference", "below min_correction")
            log.log(logging.INFO if normal else logging.WARNING, "%s", w.report.log_line())
            yield w.report
            yield from w.buffer.acquisitions
        log.debug("%d slice(s) in %.3f s", len(work), dt)

    # -- stages ----------------------------------------------------------------------------------------
    def _process(self, work: list[_Work]) -> None:
        for w in work:
            self._classify(w)
        self._estimate([w for w in work if w.crops is not None])
        todo = [w for w in work if w.report is not None and w.report.corrected]
        sense: dict[tuple[object, ...], list[_Work]] = {}
        for w in todo:
            try:
                if self._correct(w):
                    assert w.assembled is not None
                    a = w.assembled
                    sense.setdefault((a.kspace.shape, a.pixel_spacing_mm), []).append(w)
            except Exception as exc:
                self._failed([w], exc)
        for group in sense.values():  # one batched SENSE solve per grid shape
            try:
                self._correct_sense(group)
            except Exception as exc:
                self._failed(group, exc)

    @staticmethod
    def _failed(work: list[_Work], exc: Exception) -> None:
        for w in work:
            log.warning("correction of %s failed: %s: %s", tuple(w.buffer.key), type(exc).__name__, exc)
            assert w.report is not None
            w.report.corrected = False
            w.report.reason = f"correction failed: {type(exc).__name__}: {exc}"
            w.new_data = w.traj = None

    def _classify(self, w: _Work) -> None:
        """Assemble, pick or store the reference, prepare the network crops (sets ``w.report`` or crops)."""
        key = w.buffer.key
        group = (key.slice, key.contrast, key.set)
        try:
            a = assemble(w.buffer)
        except InputError as exc:
            w.report = _report(key, -1, f"not assembled: {exc}")
            return
        w.assembled = a
        ref = self.references.get(group)
        want = self.params.reference_repetition
        if not a.correctable:
            w.report = _report(key, ref.slice.key.repetition if ref else -1, f"not correctable: {a.reason}")
            return
        if ref is None:
            if want is None or want == key.repetition:
                self.references[group] = _Reference(a)
                w.report = _report(key, key.repetition, "reference", zeros=True)
            else:
                w.report = _report(key, want, f"no reference yet (waiting for repetition {want})")
            return
        w.reference = ref
        ref_rep = ref.slice.key.repetition
        r = ref.slice
        if a.kspace.shape != r.kspace.shape:
            w.report = _report(
                key, ref_rep, f"grid {a.kspace.shape} differs from the reference's {r.kspace.shape}"
            )
            return
        rows = self._crop_rows(r, a)
        if isinstance(rows, str):
            w.report = _report(key, ref_rep, rows)
            return
        w.crops = (torch.from_numpy(r.kspace[:, rows]), torch.from_numpy(a.kspace[:, rows]))

    def _crop_rows(self, ref: AssembledSlice, mov: AssembledSlice) -> np.ndarray | str:
        """Grid rows of the network crop: ``s_y`` acquired rows ``n_ky//2 + parity + R_net * j``."""
        r_net = self.net_acceleration
        if ref.acceleration not in (1, r_net):
            return f"acceleration {ref.acceleration} not supported by the network (trained at {r_net})"
        parity = ref.parity if ref.acceleration == r_net else 0
        n_ky = ref.kspace.shape[1]
        # the network reads its s_y central rows; the refinement uses up to _REFINE_ROWS of them
        for s_y in range(max(self.net_crop[0], _REFINE_ROWS), self.net_crop[0] - 1, -8):
            j = np.arange(-(s_y // 2), s_y - s_y // 2)
            rows = n_ky // 2 + parity + r_net * j
            if rows[0] >= 0 and rows[-1] < n_ky and ref.mask[rows].all() and mov.mask[rows].all():
                return rows
        return (
            f"the network needs {self.net_crop[0]} acquired rows (every {r_net}nd) about the centre in the "
            f"reference and this slice; {n_ky} rows, acquired {int(mov.mask.sum())}"
        )

    def _estimate(self, work: list[_Work]) -> None:
        """Run the network on every prepared slice (one call per grid shape) and fill the reports."""
        groups: dict[tuple[object, ...], list[_Work]] = {}
        for w in work:
            assert w.crops is not None and w.assembled is not None
            groups.setdefault((tuple(w.crops[0].shape), w.assembled.fov_mm), []).append(w)
        for ws in groups.values():
            ref = torch.stack([w.crops[0] for w in ws if w.crops is not None])
            mov = torch.stack([w.crops[1] for w in ws if w.crops is not None])
            try:
                a0 = ws[0].assembled
                assert a0 is not None
                n_ky, n_kx = a0.kspace.shape[1:]
                est = self.estimator.estimate_data(
                    ref, mov, (int(n_ky), int(n_kx)), a0.fov_mm, self.net_acceleration
                )
            except (InputError, RuntimeError, ValueError) as exc:
                for w in ws:
                    assert w.reference is not None
                    w.report = _report(
                        w.buffer.key, w.reference.slice.key.repetition, f"not estimated: {exc}"
                    )
                continue
            for i, w in enumerate(ws):
                assert w.assembled is not None and w.reference is not None
                a = w.assembled
                dx_px, dy_px, phi = (float(v) for v in est.motion[i])
                dx_mm, dy_mm = dx_px * a.pixel_spacing_mm[1], dy_px * a.pixel_spacing_mm[0]
                patient = tuple(dx_mm * r + dy_mm * p for r, p in zip(a.read_dir, a.phase_dir, strict=True))
                finite = all(math.isfinite(v) for v in (dx_px, dy_px, phi))
                edge = bool(est.at_range_edge[i])
                unreliable = getattr(est, "unreliable", None)  # refinement and network disagree (or edge)
                disagree = unreliable is not None and bool(unreliable[i]) and not edge
                flagged = edge or disagree or not finite
                why = "at the edge of the trained motion range" if edge else ""
                if disagree:
                    why = "unreliable: network and refinement disagree by > 3 px/deg"
                rep = MotionReport(
                    w.buffer.key,
                    w.reference.slice.key.repetition,
                    dx_px,
                    dy_px,
                    phi,
                    dx_mm,
                    dy_mm,
                    patient,  # type: ignore[arg-type]
                    flagged,
                    True,
                    why if finite else "",
                )
                mc = self.params.min_correction
                if not finite:
                    rep.corrected, rep.reason = False, "estimate not finite"
                elif abs(dx_px) < mc and abs(dy_px) < mc and abs(phi) < mc:
                    rep.corrected, rep.reason = False, "below min_correction"
                elif abs(phi) > 90:
                    rep.corrected, rep.reason = False, f"rotation {phi:.1f} deg beyond +-90"
                w.report = rep

    def _correct(self, w: _Work) -> bool:
        """Correct one slice by the ramp (trajectory mode, translation-only fallback); True: needs SENSE."""
        assert w.report is not None and w.assembled is not None and w.reference is not None
        rep, a = w.report, w.assembled
        n_ky = a.kspace.shape[1]
        if self.params.output == "trajectory":
            lines = _ramp_lines(w.buffer, n_ky, rep.dx_px, rep.dy_px)
            w.new_data = [(acq, data) for acq, data, _, _ in lines]
            w.traj = [_rotated_traj(kx, ky, rep.rot_deg, a.fov_mm) for _, _, kx, ky in lines]
            return False
        ref = w.reference
        if ref.maps is None:
            ref.maps = coil_maps_for(ref.slice, self.calibration, self.device)
        if isinstance(ref.maps, str):
            lines = _ramp_lines(w.buffer, n_ky, rep.dx_px, rep.dy_px)
            w.new_data = [(acq, data) for acq, data, _, _ in lines]
            rep.reason = f"translation only: {ref.maps}" + (f"; {rep.reason}" if rep.reason else "")
            log.warning("slice %s: rotation not corrected, %s", tuple(a.key), ref.maps)
            return False
        return True

    def _correct_sense(self, work: list[_Work]) -> None:
        """SENSE with the motion in the model for slices on one grid, batched; new data on the same lines."""
        slices = [w.assembled for w in work]
        maps_list = [w.reference.maps for w in work if w.reference is not None]
        assert all(a is not None for a in slices) and all(isinstance(m, torch.Tensor) for m in maps_list)
        maps = torch.stack([m.to(self.device) for m in maps_list if isinstance(m, torch.Tensor)])
        y = torch.stack([torch.from_numpy(a.kspace) for a in slices if a is not None]).to(self.device)
        mask = torch.stack([torch.from_numpy(a.mask) for a in slices if a is not None]).to(self.device)
        motion = torch.tensor(
            [[w.report.dx_px, w.report.dy_px, w.report.rot_deg] for w in work if w.report is not None],
            dtype=torch.float64,
        )
        spacing = slices[0].pixel_spacing_mm if slices[0] is not None else (1.0, 1.0)
        x = sense_reconstruct(
            y, mask, maps, motion.to(self.device), spacing, self.params.sense_iterations, SENSE_LAMBDA
        )
        y_corr = MotionSense(maps, mask).forward(x)
        delta = ((y_corr - y) * mask[:, None, :, None]).cpu().numpy()
        if not np.isfinite(delta).all():
            raise ValueError("non-finite values in the SENSE correction")
        for w, d in zip(work, delta, strict=True):
            w.new_data = _add_delta(w.buffer, d)


def _rotated_traj(kx: np.ndarray, ky: np.ndarray, phi_deg: float, fov_mm: tuple[float, float]) -> np.ndarray:
    """``(n_samples, 2)`` float32 positions ``R(phi)^-1 k`` in cycles/FOV (x, y), rotation physical in mm."""
    fov_y, fov_x = fov_mm
    c, s = math.cos(math.radians(phi_deg)), math.sin(math.radians(phi_deg))
    kx_mm, ky_mm = kx / fov_x, np.broadcast_to(ky, kx.shape) / fov_y
    rx = c * kx_mm + s * ky_mm
    ry = -s * kx_mm + c * ky_mm
    return np.stack([rx * fov_x, ry * fov_y], axis=-1).astype(np.float32)


def motion_correct(
    items: Iterable[object], header: ismrmrd.xsd.ismrmrdHeader, params: GadgetParams | None = None
) -> Iterator[object]:
    """Convenience: ``MotionCorrector(header, params)(items)``."""
    return MotionCorrector(header, params)(items)
