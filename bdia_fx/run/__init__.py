"""The run: how a converted chain trains (and evaluates) block call by block call.

:mod:`~bdia_fx.run.runtime` (one :class:`ChainRuntime` per chain: its one training path, its inference
form), :mod:`~bdia_fx.run.chain_step` (the update steps as autograd Functions, recomputed on
backward), :mod:`~bdia_fx.run.block_maps` (what a block kind computes, as data),
:mod:`~bdia_fx.run.frame` (one chain call's state and checks) and :mod:`~bdia_fx.run.guards`
(what must not change between forward and recompute).
"""

__all__: list[str] = []
