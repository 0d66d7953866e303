"""``pam``: a copy of a model whose multiplications run as piecewise-affine multiplication (PAM).

Two front doors, one rule (docs/pam.md, "How the pass works"). The model is captured once
(``torch.export``, as convert does) and the PAM pass (:mod:`bdia_fx.passes.pam`) decides, node by
node, what is replaced and what is left (the report; refusals name the node), and rewrites the capture
into a runnable PAM graph. The model itself is a structural copy of the user's whose every module has
a PAM subclass of its own class (same name, parameters, ``state_dict()`` keys and ``forward``
signature) that runs its ``forward`` under :class:`PAMMode`: a ``TorchFunctionMode`` sending
``F.linear``, ``matmul``/``@``/``bmm``/``baddbmm``/``addmm``, ``F.scaled_dot_product_attention``,
``*`` and ``/`` (and ``*=``, ``/=``) to the same PAM functions, by the same rule
(:func:`bdia_fx.passes.pam.decide`). Since each module enters the mode itself, a block that
:func:`bdia_fx.convert`'s reversible backward recomputes runs PAM again, and a capture (convert's,
or an export) records the PAM operators (``torch.ops.bdia_pam.*``).
"""

from __future__ import annotations

import copyreg
import dataclasses
import functools
import types
from collections.abc import Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from bdia_fx.calls import example_args
from bdia_fx.converted import is_converted
from bdia_fx.errors import ConversionError
from bdia_fx.module_tree import shallow_clone
from bdia_fx.pam.ops import ALL_OPS, KNOWN_OPS, OPS, RULES
from bdia_fx.passes.capture import capture
from bdia_fx.passes.pam import PAMReport, analyse_pam, call_options, decide, rewrite_pam

__all__ = ["PAMConfig", "PAMMode", "PAMState", "TORCH_FUNCTIONS", "convert", "graph_of", "is_pam", "pam_class",
           "pam_state", "report_of"]

_STATE_ATTR = "_bdia_pam_state"
_CONFIG_ATTR = "_bdia_pam_config"


@dataclasses.dataclass(frozen=True)
class PAMConfig:
    """Which multiplications become PAM (``ops``, a subset of :data:`KNOWN_OPS`) and the backward rule
    (``"approx"``: the paper's PAM of the gradient; ``"exact"``: the piecewise-affine derivative)."""

    ops: tuple[str, ...] = ALL_OPS
    backward: str = "approx"

    def __post_init__(self) -> None:
        ops = tuple(dict.fromkeys(self.ops))
        unknown = [op for op in ops if op not in KNOWN_OPS]
        if unknown or isinstance(self.ops, str):
            raise ValueError(f"ops must be a collection of {KNOWN_OPS}, got {self.ops!r}")
        object.__setattr__(self, "ops", ops)
        if self.backward not in RULES:
            raise ValueError(f"backward must be one of {RULES}, got {self.backward!r}")


@dataclasses.dataclass
class PAMState:
    """What a PAM model carries: its config, the pass's report and the rewritten graph of the capture."""

    config: PAMConfig
    report: PAMReport | None = None
    graph: fx.GraphModule | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "graph": None}


_T = torch.Tensor
TORCH_FUNCTIONS: dict[Any, tuple[str, bool]] = {  # torch function -> (function name, operands swapped)
    F.linear: ("linear", False),
    **dict.fromkeys([torch.matmul, _T.matmul, _T.__matmul__], ("matmul", False)),
    _T.__rmatmul__: ("matmul", True),
    **dict.fromkeys([torch.mm, _T.mm], ("mm", False)),
    **dict.fromkeys([torch.bmm, _T.bmm], ("bmm", False)),
    **dict.fromkeys([torch.addmm, _T.addmm], ("addmm", False)),
    **dict.fromkeys([torch.baddbmm, _T.baddbmm], ("baddbmm", False)),
    F.scaled_dot_product_attention: ("scaled_dot_product_attention", False),
    **dict.fromkeys([torch.mul, torch.multiply, _T.mul, _T.multiply, _T.__mul__], ("mul", False)),
    _T.__rmul__: ("mul", True),
    **dict.fromkeys([_T.mul_, _T.__imul__], ("mul_", False)),
    **dict.fromkeys([torch.div, torch.divide, torch.true_divide, _T.div, _T.divide, _T.true_divide,
                     _T.__truediv__], ("div", False)),
    _T.__rtruediv__: ("div", True),
    **dict.fromkeys([_T.div_, _T.__itruediv__], ("div_", False)),
    **dict.fromkeys([torch.softmax, _T.softmax, F.softmax], ("softmax", False)),
    **dict.fromkeys([torch.exp, _T.exp], ("exp", False)),
    **dict.fromkeys([torch.rsqrt, _T.rsqrt], ("rsqrt", False)),
    F.layer_norm: ("layer_norm", False),
    **dict.fromkeys([torch.sigmoid, _T.sigmoid, F.sigmoid], ("sigmoid", False)),
    **dict.fromkeys([torch.tanh, _T.tanh, F.tanh], ("tanh", False)),
    F.gelu: ("gelu", False),
    F.silu: ("silu", False),
}


class PAMMode(TorchFunctionMode):
    """Runs the multiplying torch functions of :data:`TORCH_FUNCTIONS` as PAM (see the module docstring)."""

    model_scoped = True  # the chain runtime of bdia_fx.convert runs its own arithmetic outside it

    def __init__(self, config: PAMConfig, where: str):
        super().__init__()
        self.config, self.where = config, where

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        entry = TORCH_FUNCTIONS.get(func)
        if entry is None and _is_functional_composite(func):
            with self:  # the mode is off inside this method: its insides are to run under it
                return _transparent(func)(*args, **kwargs)
        if entry is None or "out" in kwargs or kwargs.get("rounding_mode") is not None:
            return func(*args, **kwargs)
        function, swapped = entry
        call = (args[1], args[0], *args[2:]) if swapped else args
        try:
            reason = decide(function, _result_dtype(function, call), self.config.ops)
        except ValueError as exc:
            raise ConversionError(f"at run time, {exc}", module=self.where) from None
        if reason is not None:
            return func(*args, **kwargs)
        return OPS[function].implementation(*call, **kwargs, **call_options(function, self.config.ops,
                                                                          self.config.backward))


def _is_functional_composite(func: Any) -> bool:
    """A Python function of ``torch.nn.functional`` (e.g. ``multi_head_attention_forward``): handed to
    the mode as a whole, it would run its own linear/bmm/mul calls outside the mode."""
    return isinstance(func, types.FunctionType) and func.__module__ == "torch.nn.functional"


@functools.cache
def _transparent(func: types.FunctionType) -> types.FunctionType:
    """``func`` with its ``has_torch_function*`` checks answering False, so that, run under the mode,
    it does not hand itself to the mode again and its inner calls are seen one by one."""
    names = {name: (lambda *args: False) for name in ("has_torch_function", "has_torch_function_unary",
                                                      "has_torch_function_variadic")}
    copy = types.FunctionType(func.__code__, {**func.__globals__, **names}, func.__name__, func.__defaults__,
                              func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    return copy


def _result_dtype(function: str, args: tuple) -> torch.dtype:
    tensors = [a for a in args[:3] if isinstance(a, (torch.Tensor, int, float, bool))]
    dtype = torch.result_type(*tensors[:2]) if len(tensors) >= 2 else tensors[0].dtype
    return torch.get_default_dtype() if function == "div" and not dtype.is_floating_point else dtype


def _pam_mode_active() -> bool:
    """Whether a PAMMode is on this thread's torch function mode stack (a parent module pushed it)."""
    return any(isinstance(mode, PAMMode) for mode in _get_current_function_mode_stack())


_PAM_CLASSES: dict[type, type] = {}


def pam_class(cls: type) -> type:
    """The PAM subclass of ``cls``: same name, its ``forward`` (signature included) run under PAMMode."""
    if cls not in _PAM_CLASSES:
        original_forward = cls.forward

        @functools.wraps(original_forward)
        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if _pam_mode_active():
                return original_forward(self, *args, **kwargs)
            with PAMMode(self.__dict__[_CONFIG_ATTR], type(self).__name__):
                return original_forward(self, *args, **kwargs)

        _PAM_CLASSES[cls] = _metaclass(type(cls))(cls.__name__, (cls,), {
            "forward": forward, "_bdia_pam_original": cls, "__module__": cls.__module__,
            "__qualname__": f"{cls.__qualname__}[pam]",
        })
    return _PAM_CLASSES[cls]


_METACLASSES: dict[type, type] = {}


def _metaclass(meta: type) -> type:
    """A subclass of ``meta`` for PAM classes, registered with copyreg: a PAM class pickles as
    ``pam_class(original)`` (so PAM models and convert's proxies of them pickle)."""
    if meta not in _METACLASSES:
        _METACLASSES[meta] = type(f"PAM{meta.__name__}", (meta,), {})
        copyreg.pickle(_METACLASSES[meta], _reduce_pam_class)
    return _METACLASSES[meta]


def _reduce_pam_class(cls: type) -> tuple:
    return pam_class, (cls._bdia_pam_original,)


def convert(model: nn.Module, example_inputs: tuple | torch.Tensor = (), example_kwargs: dict | None = None,
        ops: Collection[str] = ALL_OPS, backward: str = "approx") -> nn.Module:
    """Return a copy of ``model`` (sharing its parameters) whose multiplications run as PAM.

    ``ops`` selects the kinds replaced: ``"linear"``, ``"matmul"`` (matmul, @, mm, bmm, addmm,
    baddbmm), ``"attention"`` (both products and the scaling of scaled-dot-product attention),
    ``"mul"`` (elementwise ``*``, including by a Python number) and ``"div"`` (``/`` as PAM division): by
    default all five. ``"nonlinear"`` (not by default) adds piecewise-affine softmax (attention's too),
    exp, rsqrt, layer norm, sigmoid, tanh, GELU and SiLU (:mod:`bdia_fx.pam.ops`).
    ``backward`` is the gradient rule of every PAM operation. The result has ``model``'s classes (PAM
    subclasses of the same names), call signature, outputs and ``state_dict()`` keys; it converts with
    :func:`bdia_fx.convert`. With example inputs the model is captured now, the report
    (:func:`report_of`) lists what was replaced and what was left and why, and a selected
    multiplication on non-float32 floating-point operands raises :class:`ConversionError` naming the
    node, before anything is made. ``model`` itself is never modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if is_converted(model):
        raise ConversionError("the model is already converted with bdia_fx.convert: apply pam first, "
                              "bdia_fx.convert(bdia_fx.pam.convert(model, ...), ...)", module="")
    if is_pam(model):
        raise ConversionError("the model already runs PAM", module="")
    config = PAMConfig(tuple(ops), backward)
    state = PAMState(config)
    args = example_args(example_inputs)
    if args or example_kwargs:
        captured = capture(shallow_clone(model), args, dict(example_kwargs or {})).module()
        state.report = analyse_pam(captured, config.ops, config.backward, type(model).__name__)
        state.graph = rewrite_pam(captured, state.report)
    clone = shallow_clone(model)
    for module in clone.modules():
        module.__class__ = pam_class(type(module))
        module.__dict__[_CONFIG_ATTR] = config
    clone.__dict__[_STATE_ATTR] = state
    return clone


def is_pam(model: nn.Module) -> bool:
    """Whether ``model`` came out of :func:`convert` (or is a convert/revert of such a model)."""
    return _STATE_ATTR in model.__dict__


def pam_state(model: nn.Module) -> PAMState:
    if not is_pam(model):
        raise ConversionError(f"{type(model).__name__} was not made with bdia_fx.pam.convert", module="")
    return model.__dict__[_STATE_ATTR]


def report_of(model: nn.Module) -> PAMReport | None:
    """The PAM pass's report of a :func:`convert` model (None if it was made without example inputs)."""
    return pam_state(model).report


def graph_of(model: nn.Module) -> fx.GraphModule | None:
    """The captured call of a :func:`convert` model, rewritten by the PAM pass: a runnable GraphModule of
    the example call (its shapes, training-mode ops) with the model's parameters (None without
    example inputs)."""
    return pam_state(model).graph
