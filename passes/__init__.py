"""Graph passes of bdia_fx (installed as ``bdia_fx.passes``); they import no part of the runtime.

- :mod:`~bdia_fx.passes.capture`: capture a module as an ATen graph with ``torch.export``.
- :mod:`~bdia_fx.passes.chains`: analysis pass that finds residual block chains.
- :mod:`~bdia_fx.passes.sublayers`: analysis of a block's steps at its residual adds (``granularity="sublayer"``).
- :mod:`~bdia_fx.passes.plan`: the plan both passes read: chains, blocks, side inputs, steps as callable graphs.
- :mod:`~bdia_fx.passes.rewrite`: the rewritten graph, each chain one BDIA node.
- :mod:`~bdia_fx.passes.pam`: which multiplications become piecewise-affine (PAM), and the PAM rewrite.
- :mod:`~bdia_fx.passes.revert`: the reverse of ``rewrite``, the γ = 0 chain of the blocks' own operations.
"""

from bdia_fx.passes.capture import capture, training_mode
from bdia_fx.passes.chains import BLOCK_META_KEY, find_chains_in_graph
from bdia_fx.passes.plan import BlockPlan, ChainPlan, ModelPlan, StepGraph, plan_block_call, plan_model
from bdia_fx.passes.revert import REVERT_META_KEY, revert_chains
from bdia_fx.passes.rewrite import CHAIN_META_KEY, QUANT_META_KEY, rewrite_chains
from bdia_fx.passes.sublayers import check_sublayers, split_steps

__all__ = [
    "capture", "training_mode", "find_chains_in_graph", "plan_model", "plan_block_call", "rewrite_chains",
    "revert_chains", "check_sublayers", "split_steps", "BlockPlan", "ChainPlan", "ModelPlan", "StepGraph",
    "BLOCK_META_KEY", "CHAIN_META_KEY", "QUANT_META_KEY", "REVERT_META_KEY",
]
