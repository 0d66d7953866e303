"""What a converted model carries (:class:`ConvertedState`), and how the other parts find it."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

from torch import fx, nn

from bdia_fx.config import BDIAConfig
from bdia_fx.errors import ConversionError
from bdia_fx.report import ChainReport

if TYPE_CHECKING:
    from bdia_fx.passes.plan import ModelPlan
    from bdia_fx.run.frame import ChainObserver
    from bdia_fx.run.runtime import ChainRuntime

__all__ = ["ConvertedRepr", "ConvertedState", "attach_state", "converted_state", "detach_state", "is_converted",
           "observing", "runtimes_of", "state_of"]

_STATE_ATTR = "_bdia_state"


@dataclasses.dataclass
class ConvertedState:
    """What a converted model carries: config, report, runtimes and checked call patterns."""

    config: BDIAConfig
    report: ChainReport | None = None
    plan: ModelPlan | None = None            # the first training call's plan: both passes read it
    graph: fx.GraphModule | None = None      # the rewritten graph (chains as BDIAChain nodes): it trains
    runtimes: dict[str, ChainRuntime] = dataclasses.field(default_factory=dict)
    patterns: set = dataclasses.field(default_factory=set)
    hook_id: int | None = None  # the root forward pre-hook that plans and checks call patterns
    takes_use_cache: bool = False  # an HF-style forward(use_cache=...): training calls get use_cache=False
    strict: bool = True  # refuse the model if any chain is refused (False: convert the others, keep those)
    warned: set[str] = dataclasses.field(default_factory=set)  # the one-time warnings already logged

    def __getstate__(self) -> dict:
        """Pickled without the captured graphs and checked call patterns: a loaded model captures and
        checks its call patterns again at its first call (the graphs' node marks do not pickle)."""
        state = dict(self.__dict__)
        state.update(plan=None, graph=None, patterns=set())
        return state


def converted_state(model: nn.Module) -> ConvertedState | None:
    """The :class:`ConvertedState` of a converted model, else None."""
    return model.__dict__.get(_STATE_ATTR)


def state_of(model: nn.Module) -> ConvertedState:
    """The :class:`ConvertedState` of a converted model; ConversionError if it was not converted."""
    state = converted_state(model)
    if state is None:
        raise ConversionError(f"{type(model).__name__} was not converted with bdia_fx.convert", module="")
    return state


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` came out of :func:`convert`."""
    return _STATE_ATTR in model.__dict__


class ConvertedRepr:
    """The ``extra_repr`` of a converted model: its class's own, then what bdia_fx made of it, so that
    ``print(model)`` says it is converted and how (an instance attribute: the class is unchanged)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self) -> str:
        state = converted_state(self.model)
        own = type(self.model).extra_repr(self.model)
        if state is None:
            return own
        config = state.config
        chains = ", ".join(f"{r.container} ({len(r.blocks)} blocks)" for r in state.runtimes.values())
        text = (f"bdia_fx: converted ({config.mode}, granularity={config.granularity}, frac_bits={config.frac_bits}, "
                f"gammas={config.gammas}, verify={config.verify}); "
                f"chains: {chains or 'found at the first training call'}")
        return f"{own}\n{text}" if own else text


def detach_state(clone: nn.Module) -> ConvertedState:
    """Remove the conversion state, its repr and the root hook from a structural copy of a converted model."""
    clone.__dict__.pop("extra_repr", None)
    state = clone.__dict__.pop(_STATE_ATTR)
    for hooks in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
        getattr(clone, hooks).pop(state.hook_id, None)
    return state


def attach_state(clone: nn.Module, state: ConvertedState) -> None:
    """Mark ``clone`` as converted, with ``state``, and let its repr say so."""
    clone.__dict__[_STATE_ATTR] = state
    clone.__dict__["extra_repr"] = ConvertedRepr(clone)


def runtimes_of(model: nn.Module) -> list[ChainRuntime]:
    """The chain runtimes of a converted model (empty for any other model)."""
    state = converted_state(model)
    return list(state.runtimes.values()) if state is not None else []


@contextlib.contextmanager
def observing(model: nn.Module, observer: ChainObserver) -> Iterator[ChainObserver]:
    """Attach ``observer`` to every chain of ``model`` for the chain calls started in the body."""
    runtimes = runtimes_of(model)
    for runtime in runtimes:
        runtime.observers.append(observer)
    try:
        yield observer
    finally:
        for runtime in runtimes:
            runtime.observers.remove(observer)
