"""Graph passes of bdia_fx (installed as ``bdia_fx.passes``).

- :mod:`~bdia_fx.passes.capture`: capture a module as an ATen graph with ``torch.export``.
- :mod:`~bdia_fx.passes.chains`: analysis pass that finds residual block chains.
- :mod:`~bdia_fx.passes.rewrite`: the rewritten graph, each chain collapsed to one BDIA node.
- :mod:`~bdia_fx.passes.revert`: the reverse of ``rewrite``, the γ = 0 chain one node per block.
- :mod:`~bdia_fx.passes.sublayers`: a block's graph cut at its residual adds (``granularity="sublayer"``).
"""

from bdia_fx.passes.capture import capture, training_mode
from bdia_fx.passes.chains import BLOCK_META_KEY, find_chains_in_graph
from bdia_fx.passes.revert import REVERT_META_KEY, revert_chains
from bdia_fx.passes.rewrite import CHAIN_META_KEY, QUANT_META_KEY, rewrite_chains
from bdia_fx.passes.sublayers import SublayerPlan, check_sublayers, plan_block_call, split_steps

__all__ = [
    "capture", "training_mode", "find_chains_in_graph", "rewrite_chains", "revert_chains",
    "SublayerPlan", "check_sublayers", "plan_block_call", "split_steps",
    "BLOCK_META_KEY", "CHAIN_META_KEY", "QUANT_META_KEY", "REVERT_META_KEY",
]
