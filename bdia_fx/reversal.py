"""``revert``: from a converted model back to the standard γ = 0 transformer."""

from __future__ import annotations

import dataclasses
import weakref

from torch import fx, nn

from bdia_fx.conversion import detach_state, state_of
from bdia_fx.errors import ConversionError
from bdia_fx.module_tree import install_gamma0_proxy, remove_boundary, remove_proxy, shallow_clone
from bdia_fx.passes.revert import revert_chains, reverted_blocks


@dataclasses.dataclass(frozen=True)
class RevertedInfo:
    """How a model was reverted: the γ = 0 graph (None if no chain was ever planned) and options."""

    graph: fx.GraphModule | None
    quantize: bool
    frac_bits: int


_REVERTED: weakref.WeakKeyDictionary[nn.Module, RevertedInfo] = weakref.WeakKeyDictionary()


def revert(model: nn.Module, quantize: bool = False) -> nn.Module:
    """The standard γ = 0 model of a :func:`~bdia_fx.convert`-ed ``model``, sharing its parameters.

    The reverse pass (:func:`bdia_fx.passes.revert.revert_chains`) turns every BDIA chain node of
    the converted model's graph back into x_{k+1} = x_k + h_k(x_k); the blocks it names run their
    original ``forward`` again. With ``quantize=True`` the chain keeps the quantization of the
    converted model's eval mode (x_0 = Q[x_in], x_{k+1} = Q[f_k(x_k)]). The result has the
    original class, call signature, outputs and ``state_dict()`` keys (with ``quantize=False`` it
    is an ordinary module of the original classes, so it pickles and ``save_pretrained`` works).
    A model that was never called (or was just loaded from a pickle) has no graph yet: its blocks
    are reverted all the same and :func:`graph_of` gives None. ``model`` is not changed. Raises
    :class:`ConversionError` if ``model`` was not converted.
    """
    state = state_of(model)
    if not state.runtimes and quantize:
        raise ConversionError(
            "revert(quantize=True) needs the model's chains, but this converted model has not been called "
            "yet; call it once or pass example inputs to bdia_fx.convert", module="")
    clone = shallow_clone(model)
    graph = revert_chains(state.graph, clone, quantize, state.config.frac_bits) if state.graph is not None else None
    proxied = {path: (runtime, index) for runtime in state.runtimes.values()
               for index, path in enumerate(runtime.block_paths)}
    if graph is not None and {path for *_, path in reverted_blocks(graph)} != set(proxied):
        raise ConversionError(f"the graph's chains {sorted(p for *_, p in reverted_blocks(graph))} do not match the "
                              f"model's converted blocks {sorted(proxied)}", module="")
    detach_state(clone)
    modules = dict(clone.named_modules())
    for runtime in state.runtimes.values():
        remove_boundary(modules[runtime.container.rpartition(".")[0]])
    for path, (runtime, index) in proxied.items():
        remove_proxy(modules[path])
        if quantize:
            install_gamma0_proxy(modules[path], index, state.config.frac_bits, path, runtime.slots[index])
    _REVERTED[clone] = RevertedInfo(graph, quantize, state.config.frac_bits)
    return clone


def reverted_info(model: nn.Module) -> RevertedInfo | None:
    """The :class:`RevertedInfo` of a model made by :func:`revert`, else None."""
    return _REVERTED.get(model)


def graph_of(model: nn.Module) -> fx.GraphModule | None:
    """The graph of a converted model (chains as BDIA nodes) or of a reverted one (γ = 0 chain).

    None while a lazily converted model has not been called yet. For reading and drawing; the
    model itself runs eagerly (see the README's design notes).
    """
    info = reverted_info(model)
    return info.graph if info is not None else state_of(model).graph
