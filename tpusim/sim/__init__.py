"""The simulation core: chips and their costs, topologies, collectives, the per-device program, the engine.

Nothing here knows what a Transformer is: compilers (:mod:`tpusim.compiler`) hand the engine a
:class:`~tpusim.sim.program.Program`, and the engine replays it on a topology with simpy.
"""
