"""The gadget's parameters (:class:`GadgetParams`), the shipped model and the device they name.

Every parameter is documented in ``docs/gadget.md``; :meth:`GadgetParams.from_properties` reads them from
the strings of a Gadgetron chain's ``<property>`` elements or from a JSON object (FIRE server, MRD stream).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from kmotion.physics.validate import InputError

__all__ = ["DEFAULT_MODEL", "GadgetParams", "resolve_device"]

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "default.safetensors"
"""The shipped estimator weights, used when ``GadgetParams.model`` is None."""

_DEVICES = ("auto", "cpu", "cuda")
_OUTPUTS = ("cartesian", "trajectory")
_MOTION_MODELS = ("repetition", "shot", "auto")
_FLOATS = {  # name: (minimum, exclusive maximum or None, words of the error)
    "min_correction": (0.0, None, "a finite number >= 0"),
    "false_alarm_rate": (0.0, 1.0, "a number in (0, 1)"),
    "max_translation_mm": (0.0, None, "a finite number > 0"),
    "max_rotation_deg": (0.0, 89.0, "a number in (0, 89)"),
}
_NONE_WORDS = ("", "none", "null", "default", "auto")


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
    false_alarm_rate: float = 1e-3
    """Nominal false-alarm rate of the significance test: a slice (or shot) is corrected only when its
    likelihood-ratio statistic exceeds the chi-square (3 dof) quantile ``1 - false_alarm_rate``."""
    max_translation_mm: float = 25.0
    """Capture range of the translation search [mm] (real head motion reaches +-20 mm); estimates beyond it
    are flagged and not corrected."""
    max_rotation_deg: float = 18.0
    """Capture range of the rotation search [deg] (real head motion reaches +-15 deg)."""
    motion_model: str = "auto"
    """``repetition`` (one pose per slice group, registered to a reference repetition), ``shot`` (one pose
    per echo train), ``auto`` (``shot`` when a slice group holds more than one echo train and no reference
    repetition is expected, see ``docs/intra_scan.md``)."""
    threads: int = 1
    """torch intra-op CPU threads, set when the gadget starts (0: leave torch's default).  The per-slice
    tensors are small: on a shared 2-core machine two threads made the FFTs many times slower than one
    (``docs/gadget.md``, Offline replay), and ``kmotion stream`` on a field case took 24-55 s with torch's
    default against 5 s with one thread."""

    def __post_init__(self) -> None:
        if self.model is not None and not isinstance(self.model, str | Path):
            raise _bad("model", "a path or None", self.model)
        if not isinstance(self.device, str) or not (
            self.device in _DEVICES or self.device.startswith("cuda:") and self.device[5:].isdigit()
        ):
            raise _bad("device", "auto, cpu, cuda or cuda:N", self.device)
        if self.output not in _OUTPUTS:
            raise _bad("output", "cartesian or trajectory", self.output)
        for name, (lo, hi, words) in _FLOATS.items():
            v = getattr(self, name)
            bad_type = isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            if bad_type or v < lo or (name != "min_correction" and v == lo) or (hi is not None and v >= hi):
                raise _bad(name, words, v)
        if self.motion_model not in _MOTION_MODELS:
            raise _bad("motion_model", "repetition, shot or auto", self.motion_model)
        if self.reference_repetition is not None:
            _as_int("reference_repetition", self.reference_repetition, 0)
        _as_int("batch_slices", self.batch_slices, 1)
        _as_int("sense_iterations", self.sense_iterations, 1)
        _as_int("threads", self.threads, 0)

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
            elif name in ("device", "output", "motion_model"):
                kwargs[name] = text.lower()
            elif name in _FLOATS:
                try:
                    kwargs[name] = float(text)
                except ValueError:
                    raise _bad(name, _FLOATS[name][2], value) from None
            else:
                minimum = 0 if name in ("reference_repetition", "threads") else 1
                kwargs[name] = _as_int(name, value if isinstance(value, int) else text, minimum)
        return cls(**kwargs)  # type: ignore[arg-type]


def resolve_device(device: str) -> torch.device:
    """The torch device of a ``GadgetParams.device`` value (``auto``: CUDA when available); raises
    :class:`InputError` for CUDA on a machine without it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise _bad("device", "auto or cpu (CUDA is not available on this machine)", device)
    return torch.device(device)
