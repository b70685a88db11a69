"""kmotion: rigid in-plane motion estimation and correction in MRI k-space.

Sub-packages
------------
physics
    Pure math (no I/O): centred FFTs, phase ramps, rotations, the forward motion model and its
    inverse, sampling masks, crops and standardisation.  Conventions are in ``docs/conventions.md``.
simulation
    Base-image generators (phantoms, coils, noise) and the study's training-pair simulation.
io
    Loaders that turn users' raw data (ISMRMRD, fastMRI, Siemens twix) into base images.
"""

__version__ = "0.1.0"
