"""The PAM pass: which multiplications of a captured graph become piecewise-affine, and the rewrite.

Analysis (:func:`analyse_pam`) reads a graph captured by :func:`bdia_fx.passes.capture.capture` and
decides for every multiplying node: replaced by its PAM version (:data:`bdia_fx.pam.ops.OPS`),
left as it is (with the reason), or refused (a selected multiplication on float16/bfloat16/float64
operands: PAM is defined on float32 bit patterns). With ``"nonlinear"`` in ops, softmax (attention's
too), exp, rsqrt, layer norm, sigmoid, tanh, GELU and SiLU become their piecewise-affine versions.
The rewrite (:func:`rewrite_pam`) gives a runnable copy of the graph whose replaced nodes call the PAM
functions, marked with :data:`PAM_META_KEY`.
:func:`decide` is the one rule both the rewrite and the eager PAM model (``bdia_fx.pam``) apply.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import fx

from bdia_fx.errors import ConversionError
from bdia_fx.pam.ops import OPS

__all__ = ["ATEN_FUNCTIONS", "LEFT_REASONS", "PAMNode", "PAMReport", "PAM_META_KEY", "analyse_pam", "call_options",
           "decide", "rewrite_pam"]

PAM_META_KEY = "bdia_pam"  # node.meta key of a node the rewrite made: the function name it replaces
ATEN_FUNCTIONS = {overload: name for name, op in OPS.items() for overload in op.aten}  # -> OPS key
_NONLINEAR = "a nonlinearity without a piecewise-affine version here: it multiplies inside its kernel"
LEFT_REASONS = {  # other ATen ops that multiply inside, by name, and why they stay
    **dict.fromkeys(["log", "log_softmax", "_log_softmax", "sqrt", "pow", "erf", "cos", "sin", "reciprocal"],
                    _NONLINEAR),
    **dict.fromkeys(["native_layer_norm", "rms_norm", "group_norm", "batch_norm", "mean", "var", "var_mean"],
                    "normalisation: its mean, variance and scale multiply inside the kernel"),
    **dict.fromkeys(["conv1d", "conv2d", "conv3d", "convolution", "einsum", "addcmul", "addcdiv", "dot", "mv",
                     "outer", "tensordot"], "not supported by the PAM pass (write it as a linear/matmul)"),
    **dict.fromkeys(["dropout", "native_dropout", "dropout_"], "dropout scales by 1/(1 − p) inside its kernel"),
    **dict.fromkeys(["cross_entropy_loss", "nll_loss", "nll_loss_forward", "mse_loss"],
                    "a loss: its mean multiplies inside the kernel"),
}


@dataclass(frozen=True)
class PAMNode:
    """One multiplying node of the captured graph and what the pass did with it."""

    node: str
    target: str
    module: str               # the innermost module it ran in ('' for the root)
    kind: str | None = None   # the ops name it was replaced as; None if left
    reason: str | None = None  # why it was left; None if replaced
    products: int = 0         # scalar multiplications it makes in one forward at the captured shapes


@dataclass
class PAMReport:
    """What :func:`analyse_pam` found: the nodes replaced by PAM and those left multiplying."""

    model: str
    ops: tuple[str, ...]
    backward: str
    replaced: list[PAMNode] = field(default_factory=list)
    left: list[PAMNode] = field(default_factory=list)

    def forward_products(self) -> int:
        """Scalar multiplications one forward at the captured shapes makes in the replaced nodes (a
        nonlinear node counts one per output element)."""
        return sum(n.products for n in self.replaced)

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for node in self.replaced:
            counts[node.kind] = counts.get(node.kind, 0) + 1
        reasons: dict[str, list[str]] = {}
        for node in self.left:
            reasons.setdefault(f"{node.target}: {node.reason}", []).append(node.node)
        lines = [f"PAM report for {self.model} (ops={', '.join(self.ops)}, backward={self.backward})",
                 f"  replaced {len(self.replaced)} nodes: " + (", ".join(f"{k} {v}" for k, v in counts.items())
                                                             or "none"),
                 f"  {self.forward_products():,} scalar multiplications per forward made piecewise-affine"]
        lines += [f"  left {len(nodes)}× {why} ({', '.join(nodes[:3])}{', …' if len(nodes) > 3 else ''})"
                  for why, nodes in reasons.items()]
        return "\n".join(lines)


def decide(function: str, result_dtype: torch.dtype, ops: Collection[str]) -> str | None:
    """None if ``function`` (a key of OPS) with a ``result_dtype`` result is replaced under
    ``ops``, else the reason it is left. Raises ValueError for a selected floating-point function that is
    not float32 (callers turn it into a ConversionError naming where)."""
    kind = OPS[function].kind
    if kind not in ops:
        return (f"'{kind}' is not in ops" if kind != "nonlinear" else
                "multiplies inside its kernel; its piecewise-affine version needs 'nonlinear' in ops")
    if not result_dtype.is_floating_point:
        return "integer arithmetic (PAM is defined on float32)"
    if result_dtype != torch.float32:
        raise ValueError(f"a {function} on {result_dtype} operands: PAM is defined on float32 bit patterns; "
                         "run the model in float32 (no autocast), or leave this kind out of ops")
    return None


def call_options(function: str, ops: Collection[str], backward: str) -> dict:
    """The keyword arguments the PAM version of ``function`` takes besides the call's own."""
    options = {"rule": backward}
    if function == "scaled_dot_product_attention":
        options["pa_softmax"] = "nonlinear" in ops
    return options


def analyse_pam(graph_module: fx.GraphModule, ops: Collection[str], backward: str, model: str = "") -> PAMReport:
    """Classify every multiplying node of a captured graph (``node.meta['val']`` gives shapes and dtypes)."""
    report = PAMReport(model, tuple(ops), backward)
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        module = _module_of(node)
        target = str(node.target.overloadpacket.__name__)
        function = ATEN_FUNCTIONS.get(node.target)
        if function is None and target not in LEFT_REASONS and target not in OPS:
            continue  # not a multiplication
        out = node.meta.get("val")
        dtype = out.dtype if isinstance(out, torch.Tensor) else torch.float32
        if function is None:
            reason = LEFT_REASONS.get(target, "this overload is not supported (e.g. a rounding division)")
            report.left.append(PAMNode(node.name, target, module, reason=reason))
            continue
        try:
            reason = decide(function, dtype, ops)
        except ValueError as exc:
            raise ConversionError(str(exc), module=module, node=node.name) from None
        entry = PAMNode(node.name, target, module, OPS[function].kind if reason is None else None, reason,
                        _products(function, node))
        (report.replaced if reason is None else report.left).append(entry)
    return report


def rewrite_pam(graph_module: fx.GraphModule, report: PAMReport) -> fx.GraphModule:
    """A runnable copy of ``graph_module`` whose replaced nodes call their PAM function (same arguments,
    ``rule=report.backward``), each marked ``node.meta[PAM_META_KEY] = function name``."""
    from bdia_fx.passes.plan import owned_graph_module

    replaced = {n.node for n in report.replaced}
    graph = fx.Graph()
    graph.set_codegen(graph_module.graph._codegen)  # the capture's argument and output structure
    env: dict[fx.Node, fx.Node] = {}
    for node in graph_module.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        if node.name in replaced:
            function = ATEN_FUNCTIONS[node.target]
            new.target = OPS[function].implementation
            new.kwargs = {**new.kwargs, **call_options(function, report.ops, report.backward)}
            new.meta[PAM_META_KEY] = function
        env[node] = new
    graph.lint()
    return owned_graph_module(graph, "PAMGraph", graph_module)


def _module_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _products(function: str, node: fx.Node) -> int:
    """Scalar multiplications of one call at the captured shapes."""
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return 0
    if OPS[function].kind in ("mul", "div", "nonlinear"):  # a nonlinearity counts one per output element
        return out.numel()
    if function == "scaled_dot_product_attention":
        query, key = (a.meta["val"] for a in node.args[:2])
        scores = out.numel() // out.shape[-1] * key.shape[-2]  # (…, L, S)
        return scores * (query.shape[-1] + 1 + out.shape[-1])  # QKᵀ, the scaling, weights ⊛ V
    inner = {"linear": lambda a: a[0].shape[-1], "addmm": lambda a: a[1].shape[-1],
             "baddbmm": lambda a: a[1].shape[-1]}.get(function, lambda a: a[0].shape[-1])
    return out.numel() * int(inner([a.meta["val"] for a in node.args if isinstance(a, fx.Node)]))


