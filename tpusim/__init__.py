"""tpusim: a discrete-event simulator of TPU clusters.

The layers, each importing only the ones before it:

* :mod:`tpusim.sim.chips` and :mod:`tpusim.sim.calibration`: datasheet numbers and fitted efficiencies.
* :mod:`tpusim.sim.topology`: slices as tori of chips, ICI links, hosts and DCN (a networkx graph).
* :mod:`tpusim.sim.collectives`: collectives lowered onto the links they use, and their uncontended time.
"""

from tpusim.errors import TpusimError

__all__ = ["TpusimError"]
__version__ = "0.1.0"
