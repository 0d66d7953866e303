"""``revert``: from a converted model back to the standard γ = 0 transformer."""

from __future__ import annotations

import dataclasses
import weakref

from torch import fx, nn

from bdia_fx.converted import detach_state, state_of
from bdia_fx.errors import ConversionError
from bdia_fx.hub_kernels import remove_unwrapped
from bdia_fx.module_tree import install_inference_proxy, remove_boundary, remove_proxy, shallow_clone
from bdia_fx.passes.revert import revert_chains

__all__ = ["RevertedInfo", "graph_of", "revert", "reverted_info"]


@dataclasses.dataclass(frozen=True)
class RevertedInfo:
    """How a model was reverted: the γ = 0 graph (None if no chain was ever planned) and options."""

    graph: fx.GraphModule | None
    quantize: bool
    frac_bits: int


_REVERTED: weakref.WeakKeyDictionary[nn.Module, RevertedInfo] = weakref.WeakKeyDictionary()


def revert(model: nn.Module, quantize: bool = False) -> nn.Module:
    """The standard γ = 0 model of a :func:`~bdia_fx.convert`-ed ``model``, sharing its parameters.

    The chain blocks run their original ``forward`` again; the reverse pass
    (:func:`bdia_fx.passes.revert.revert_chains`) turns every BDIA chain node of the converted model's
    rewritten graph back into the blocks' own operations, x_{k+1} = x_k + h_k(x_k) (see
    :func:`graph_of`). With ``quantize=True`` the chain keeps the quantization of the converted
    model's eval mode (x_0 = Q[x_in], x_{k+1} = Q[f_k(x_k)]). The result has the
    original class, call signature, outputs and ``state_dict()`` keys (with ``quantize=False`` it
    is an ordinary module of the original classes, so it pickles and ``save_pretrained`` works).
    A model that was never called (or was just loaded from a pickle) has no graph yet: its blocks
    are reverted all the same and :func:`graph_of` gives None. ``model`` is not changed. Raises
    :class:`ConversionError` if ``model`` was not converted.

    A chain converted with ``BDIAConfig(scheme=...)`` reverts to the scheme's inference form, not to
    the original blocks (the scheme changed the model): its blocks stay proxies of the scheme's step
    (on codes with ``quantize=True``, on floats otherwise) and :func:`graph_of` shows the float form
    (None with ``quantize=True``: that form runs on int64 codes).
    """
    state = state_of(model)
    if not state.runtimes and quantize:
        raise ConversionError(
            "revert(quantize=True) needs the model's chains, but this converted model has not been called "
            "yet; call it once or pass example inputs to bdia_fx.convert", module="")
    clone = shallow_clone(model)
    schemes = {r.container: r.scheme for r in state.runtimes.values()}
    graph = None  # an inference form that runs on codes has no graph (the model runs it)
    if state.plan is not None and all(s.traceable_inference(quantize) for s in schemes.values()):
        graph = revert_chains(state.graph, state.plan, quantize, state.config.frac_bits, schemes)
    detach_state(clone)
    modules = dict(clone.named_modules())
    path_of = {id(module): name for name, module in model.named_modules()}
    for runtime in state.runtimes.values():
        remove_boundary(modules[runtime.container.rpartition(".")[0]])
        remove_unwrapped(modules[path] for path, _ in runtime.kernel_wrapped)
        original = not quantize and runtime.scheme.original_at_inference  # the blocks as they were
        form = runtime.form.with_quantize(quantize)
        for index, path in enumerate(runtime.block_paths):
            remove_proxy(modules[path])
            if not original:
                install_inference_proxy(modules[path], index, form, path, runtime.slots[index], runtime.branch)
            elif runtime.pres[index] is not None:  # the form no longer needs its stream
                remove_proxy(modules[path_of[id(runtime.pres[index])]])
    _REVERTED[clone] = RevertedInfo(graph, quantize, state.config.frac_bits)
    return clone


def reverted_info(model: nn.Module) -> RevertedInfo | None:
    """The :class:`RevertedInfo` of a model made by :func:`revert`, else None."""
    return _REVERTED.get(model)


def graph_of(model: nn.Module) -> fx.GraphModule | None:
    """The graph of a converted model (chains as BDIA chain nodes) or of a reverted one (γ = 0 chain).

    Both are runnable GraphModules of the first captured training call (its call pattern, shapes
    and train-mode ops): the converted model's trains through the same chain runtime, with the
    model's own parameters. None while a lazily converted model has not been called in training.
    The model itself stays the general route (other shapes, call patterns, train/eval).
    """
    info = reverted_info(model)
    return info.graph if info is not None else state_of(model).graph
