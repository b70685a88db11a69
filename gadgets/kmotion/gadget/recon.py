"""Images from an acquisition stream: the one reconstruction used for images "before" and "after" correction.

:func:`reconstruct_images` groups imaging lines into slices (:func:`~kmotion.gadget.buffer.buffer_slices`),
and reconstructs each with :func:`reconstruct_slice`: SENSE (CG, no motion) with coil maps from the
calibration data of the first slice of its (slice, contrast, phase, set) — ACS lines flagged
``ACQ_IS_PARALLEL_CALIBRATION`` (of encoding space 0, or of a separate reference scan in another encoding
space with the same geometry, :mod:`~kmotion.gadget.calibration`) or the fully sampled centre of that
slice — or, without calibration data,
the root-sum-of-squares of the zero-filled coil images (aliased at R > 1).  The maps come from data the
gadget never changes (calibration lines and the reference repetition), so a stream and its corrected
version are reconstructed with the same maps and their images compare directly (NRMSE in ``docs/gadget.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import ismrmrd
import ismrmrd.xsd
import numpy as np
import torch

from kmotion.gadget.assemble import AssembledSlice, assemble
from kmotion.gadget.buffer import SliceBuffer, SliceGeometry, SliceKey, buffer_slices
from kmotion.gadget.calibration import CalibrationStore, coil_maps_for
from kmotion.gadget.correct import SENSE_LAMBDA
from kmotion.gadget.report import MotionReport
from kmotion.physics.fft import ifft2c
from kmotion.physics.sense import sense_reconstruct

__all__ = ["reconstruct_images", "reconstruct_slice"]

log = logging.getLogger("kmotion.gadget")


def reconstruct_slice(
    kspace: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    maps: torch.Tensor | None,
    iterations: int = 20,
    lam: float = SENSE_LAMBDA,
) -> torch.Tensor:
    """Magnitude image ``(n_y, n_x)`` float32 of one slice ``(n_coils, n_ky, n_kx)`` with row ``mask``.

    With ``maps`` ``(n_coils, n_y, n_x)``: ``|x| * rss(C)`` with
    ``x = argmin ||M F C x - y||^2 + lam ||x||^2`` (CG, ``iterations``); the weight ``rss(C)`` (~1 on the
    object, decaying outside the calibration's support) keeps the noise amplified where the maps are small
    out of the image.  Without maps: the root-sum-of-squares of the zero-filled coil images.
    """
    k = torch.as_tensor(kspace).to(torch.complex64)
    m = torch.as_tensor(mask).to(torch.bool)
    if maps is None:
        return ifft2c(k * m[None, :, None]).abs().square().sum(0).sqrt().float()
    dev = maps.device
    x = sense_reconstruct(k[None].to(dev), m[None].to(dev), maps[None], None, (1.0, 1.0), iterations, lam)
    weight = maps.abs().square().sum(0).sqrt()
    return (x[0].abs() * weight).float().cpu()


def _image(
    a: AssembledSlice,
    acq: ismrmrd.Acquisition,
    magnitude: torch.Tensor,
    series_index: int,
    image_index: int,
    slice_thickness: float,
) -> ismrmrd.Image:
    img = ismrmrd.Image.from_array(
        np.ascontiguousarray(magnitude.numpy().astype(np.float32))[None],
        acquisition=acq,
        image_type=ismrmrd.IMTYPE_MAGNITUDE,
        image_series_index=series_index,
        image_index=image_index,
        field_of_view=(a.fov_mm[1], a.fov_mm[0], slice_thickness),
    )
    return img


def _meta(report: MotionReport) -> dict[str, object]:
    d = report.as_dict()
    out: dict[str, object] = {}
    keys = ("dx_px", "dy_px", "rot_deg", "dx_mm", "dy_mm", "reference_repetition", "flagged", "corrected")
    for k in (*keys, "dx_std_px", "dy_std_px", "rot_std_deg", "chi2", "p_value"):
        v = d[k]
        out[f"kmotion_{k}"] = "nan" if v is None else (int(v) if isinstance(v, bool) else v)
    patient = (d[f"patient_{c}_mm"] for c in "xyz")
    out["kmotion_patient_mm"] = ["nan" if v is None else v for v in patient]
    out["kmotion_reason"] = report.reason or "none"
    return out


def reconstruct_images(
    items: Iterable[object],
    header: ismrmrd.xsd.ismrmrdHeader,
    *,
    series_index: int = 1,
    iterations: int = 20,
    device: str | torch.device = "cpu",
) -> Iterator[object]:
    """One ``ismrmrd.Image`` (float32 magnitude) per slice group of ``items``.

    Acquisitions are consumed (calibration lines feed the coil maps; noise and other non-imaging lines are
    dropped), waveforms dropped, :class:`~kmotion.gadget.report.MotionReport` objects and anything else
    passed through.  Image headers: ``image_series_index`` = ``series_index``, ``image_index`` counting from
    1, counters (slice, contrast, repetition, set, ...), position, directions, table position and time
    stamps of the slice's first acquisition, ``field_of_view`` (x, y, z) mm, ``matrix_size`` (n_x, n_y, 1).
    When a report for that slice came before it, its values are meta attributes ``kmotion_*`` (the estimate,
    its standard errors ``kmotion_dx_std_px``/``kmotion_dy_std_px``/``kmotion_rot_std_deg``, the test's
    ``kmotion_chi2``/``kmotion_p_value``, the decision and the reason).
    A slice that cannot be assembled is logged and skipped (it has no image).
    """
    geometry = SliceGeometry.from_header(header)
    calib = CalibrationStore(geometry)
    maps: dict[tuple[int, int, int, int], torch.Tensor | None] = {}  # by (slice, contrast, phase, set)
    reports: dict[SliceKey, MotionReport] = {}
    enc = header.encoding[0]
    fov = getattr(getattr(enc, "encodedSpace", None), "fieldOfView_mm", None)
    thickness = float(fov.z) if fov is not None and fov.z is not None else 0.0
    dev = torch.device(device)
    index = 0
    for out in buffer_slices(items, header):
        if isinstance(out, SliceBuffer):
            try:
                a = assemble(out, quiet=True)
            except Exception as exc:
                log.warning("recon: %s not reconstructed: %s", out.key.label(), exc)
                continue
            group = (a.key.slice, a.key.contrast, a.key.phase, a.key.set)
            if group not in maps:
                got = coil_maps_for(a, calib, dev)
                if isinstance(got, str):
                    log.info("recon %s: root-sum-of-squares of zero-filled images (%s)", a.key.label(), got)
                maps[group] = None if isinstance(got, str) else got
            mag = reconstruct_slice(a.kspace, a.mask, maps[group], iterations)
            index += 1
            img = _image(a, out.acquisitions[0], mag, series_index, index, thickness)
            report = reports.pop(SliceKey(*out.key), None)
            if report is not None:
                img.meta = _meta(report)
            yield img
        elif isinstance(out, MotionReport):
            reports[SliceKey(*out.key)] = out
            yield out
        elif isinstance(out, ismrmrd.Acquisition):
            calib.note(out)
        elif isinstance(out, ismrmrd.Waveform):
            continue
        else:
            yield out
