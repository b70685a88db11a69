"""kmotion: rigid in-plane motion estimation and correction in MRI k-space.

Sub-packages
------------
physics
    Pure math (no I/O): centred FFTs, phase ramps, rotations, the forward motion model and its
    inverse, sampling masks, crops and standardisation.  Conventions are in ``docs/conventions.md``.
simulation
    Base-image generators (phantoms, coils, noise), the study's training-pair simulation and simulated
    ISMRMRD raw data with known motion.
io
    Every file and wire format, readers and writers: users' raw data (ISMRMRD, fastMRI, Siemens twix) as
    base images, ISMRMRD ``.h5`` streams, kmotion's estimate tables, MRD v1 message framing.
network, estimation
    The network of the abstract and the estimators built on it.
gadget
    The streaming gadget: one module per stage (buffer, assemble, reference, estimate, correct, report),
    composed into ``MotionCorrector`` by ``gadget.pipeline``.
frontends
    The ways of running the gadget: offline replay, MRD stream, FIRE-style server, Gadgetron.
"""

__version__ = "0.1.0"
