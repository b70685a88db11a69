"""Pure k-space motion physics: no I/O, batched torch code that runs on CPU and CUDA.

Axis order everywhere: k-space ``(..., n_coils, n_ky, n_kx)``, images ``(..., n_coils, n_y, n_x)``,
complex64.  See ``docs/conventions.md``.
"""

from kmotion.physics.fft import centered_indices, fft2c, ifft2c
from kmotion.physics.motion import (
    RigidMotion,
    apply_motion_image,
    apply_motion_kspace,
    mm_to_px,
    phase_ramp,
    px_to_mm,
    rotate_image,
    rotate_kspace,
    to_six_vector,
    undo_motion_kspace,
)
from kmotion.physics.sampling import (
    acquired_rows,
    center_crop,
    crop_undersampled,
    remove_rows,
    row_mask,
)
from kmotion.physics.sense import (
    MotionSense,
    calibration_block,
    coil_maps_lowres,
    conjugate_gradient,
    sense_reconstruct,
)
from kmotion.physics.standardise import standardise_pair
from kmotion.physics.validate import InputError, check_complex

__all__ = [
    "InputError",
    "MotionSense",
    "RigidMotion",
    "acquired_rows",
    "apply_motion_image",
    "apply_motion_kspace",
    "calibration_block",
    "center_crop",
    "centered_indices",
    "check_complex",
    "coil_maps_lowres",
    "conjugate_gradient",
    "crop_undersampled",
    "fft2c",
    "ifft2c",
    "mm_to_px",
    "phase_ramp",
    "px_to_mm",
    "remove_rows",
    "rotate_image",
    "rotate_kspace",
    "row_mask",
    "sense_reconstruct",
    "standardise_pair",
    "to_six_vector",
    "undo_motion_kspace",
]
