"""The thin ways of running the gadget's pipeline: each translates its transport into the pipeline's
``Iterable[object] -> Iterator[object]`` and back.

* :mod:`~kmotion.frontends.replay`: offline replay of an ISMRMRD ``.h5`` file (``kmotion replay``);
* :mod:`~kmotion.frontends.mrd_stream`: an MRD v1 stream on stdin to stdout (``kmotion stream``);
* :mod:`~kmotion.frontends.fire_server`: the FIRE-style server of python-ismrmrd-server clients
  (``kmotion serve``);
* :mod:`~kmotion.frontends.gadgetron`: the Gadgetron external Python gadget (``<execute>``) and its
  connect-mode server (``kmotion gadgetron``).

Shared: gadget properties from the transports and the pipeline they configure
(:mod:`~kmotion.frontends.properties`), the accept loop of the servers
(:mod:`~kmotion.frontends.connections`).
The file and wire formats are in :mod:`kmotion.io`.
"""
