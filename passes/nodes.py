"""Facts about single nodes of a captured ATen graph that the passes share: residual adds, ops
that keep the values (casts, copies, reshapes), module paths, shapes, in-place and random ops."""

from __future__ import annotations

import torch
from torch import fx

from bdia_fx.report import SideInput

__all__ = ["ADD_TARGETS", "CAST_TARGETS", "IDENTITY_TARGETS", "RESHAPE_TARGETS", "is_identity", "is_mutating",
           "is_random", "module_calls", "module_paths", "outside_state", "shape_of", "side_input", "state_write",
           "state_write_reason", "written_inputs"]

ADD_TARGETS = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
CAST_TARGETS = {torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype_layout,
                torch.ops.aten.contiguous.default, torch.ops.aten.clone.default, torch.ops.aten.alias.default}
RESHAPE_TARGETS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default}
IDENTITY_TARGETS = CAST_TARGETS | RESHAPE_TARGETS


def is_identity(node: fx.Node) -> bool:
    """An op that keeps the values and their row-major order: a cast to the dtype the input already
    has (RMSNorm's ``x.to(float32)``), a copy, or a reshape (OPT's ``x.view(-1, d)`` around its MLP
    residual). A skip path through reshapes that ends in the input's shape is the identity."""
    if node.target not in IDENTITY_TARGETS or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    before, after = node.args[0].meta.get("val"), node.meta.get("val")
    if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.dtype == after.dtype):
        return False
    return before.numel() == after.numel() if node.target in RESHAPE_TARGETS else before.shape == after.shape


def module_paths(node: fx.Node) -> set[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return {path for path, _ in stack.values()}


def module_calls(node: fx.Node) -> dict[str, int]:
    """The module paths of ``node``'s stack, each with which call of that module it runs in (0: the first;
    torch.export keys the n-th repeated call of a module ``...@n``)."""
    calls = {}
    for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
        _, at, count = str(key).rpartition("@")
        calls[path] = int(count) if at and count.isdigit() else 0
    return calls


def state_write(nodes: list[fx.Node], params: dict[str, str]) -> tuple[fx.Node, str] | None:
    """The first of ``nodes`` that writes a module's own state in place (a parameter or buffer, by its
    placeholder in ``params``: placeholder name → qualified name), and that state's name."""
    for node in nodes:
        state = [w for w in written_inputs(node) if w.op == "placeholder" and w.name in params]
        if state:
            return node, params[state[0].name]
    return None


def outside_state(nodes: list[fx.Node], params: dict[str, str], path: str) -> tuple[str, ...]:
    """The qualified names of the model state (parameters, buffers) that ``nodes`` read from outside the module
    at ``path``: a module passed in as an argument (x-transformers' relative position bias) or held elsewhere."""
    read = {params[a.name] for n in nodes for a in n.all_input_nodes if a.op == "placeholder" and a.name in params}
    return tuple(sorted(name for name in read if not name.startswith(f"{path}.")))


def state_write_reason(node: fx.Node, name: str) -> str:
    """Why a block writing its own state in its forward cannot be a reversible block (one rule, every chain)."""
    return (f"block updates its state '{name}' in place in its forward (node '{node.name}': BatchNorm statistics, "
            "an MoE's load counts or routing bias, a call counter tensor); a reversible recompute would update it "
            "again and read the new value. Keep such state outside the block (or update it after the step)")


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) if isinstance(s, int) else -1 for s in val.shape)
    return None


def side_input(node: fx.Node) -> SideInput:
    val = node.meta.get("val")
    dtype = str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else None
    return SideInput(node.name, shape_of(node), dtype)


def is_mutating(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


_REGION_OPS = ("wrap_with_set_grad_enabled", "wrap_with_autocast")  # (flag(s), submodule, *operands)


def written_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes ``node`` writes in place: its first argument if it is a mutating op, or, for a region
    captured as a higher-order op over a submodule (``torch.no_grad()`` code becomes
    ``wrap_with_set_grad_enabled(False, submod, *operands)``), the operands its submodule writes."""
    if is_mutating(node):
        return [node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else []
    if node.op != "call_function" or getattr(node.target, "__name__", None) not in _REGION_OPS:
        return []
    body = next((a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"), None)
    if body is None:
        return []
    submodule = getattr(node.graph.owning_module, body.target, None)
    if not isinstance(submodule, fx.GraphModule):
        return []
    operands = list(node.args[node.args.index(body) + 1:])
    inner = [n for n in submodule.graph.nodes if n.op == "placeholder"]
    written = {w for n in submodule.graph.nodes for w in written_inputs(n)}
    return [outer for placeholder, outer in zip(inner, operands)
            if placeholder in written and isinstance(outer, fx.Node)]


def is_random(node: fx.Node) -> bool:
    """Whether the op draws random numbers (a dropout with a literal p = 0 or train=False does not)."""
    tags = getattr(node.target, "tags", ())
    if torch.Tag.nondeterministic_seeded not in tags:
        return False
    name = str(getattr(node.target, "overloadpacket", ""))
    if "scaled_dot_product" in name:  # (q, k, v, attn_mask=None, dropout_p=0.0, ...)
        p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        return not (isinstance(p, (int, float)) and p == 0)
    if "dropout" in name:  # (input, p, train)
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return not ((isinstance(p, (int, float)) and p == 0) or train is False)
    return True
