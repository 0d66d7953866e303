"""Analysis pass: residual chains whose adds are written in the parent's loop.

Research code and x-transformers-style libraries write ``for attn, ff in self.layers:
x = attn(x) + x; x = ff(x) + x``: the modules compute only the branch h(x), the parent adds the
stream. The stream is still a path of adds in the graph. A *branch step* is one such add
``a = h + s`` (either order) whose operand h is the only value leaving one module call, a module
under a numbered container (``layers.0.0``, ``layers.3.ff``) that reads the stream s; consecutive
steps are linked when a step's stream is the previous step's add. A run of at least two linked
steps is a chain; each step is a block whose nodes are the module's and the parent's add.

Runs after the numbered-block search (:mod:`~bdia_fx.passes.chains`), on the adds that no block
found there owns; marks the nodes with the same ``BLOCK_META_KEY`` and reports chains with
``BlockInfo.branch = True``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import fx

from bdia_fx.passes.nodes import (
    is_mutating,
    is_random,
    module_calls,
    outside_state,
    shape_of,
    side_input,
    state_write,
    state_write_reason,
)
from bdia_fx.report import BlockInfo, ChainInfo, ChainReport, Rejection

__all__ = ["find_branch_chains"]

_ADD = torch.ops.aten.add.Tensor


@dataclass
class _Branch:
    path: str             # the module computing h
    nodes: list[fx.Node]  # its operations, then the parent's add
    stream_in: fx.Node
    add: fx.Node
    side_inputs: tuple[fx.Node, ...]
    pre: str | None = None  # a module the stream passes through first (x-transformers' pre-norm), else None
    owner: str = ""  # the module holding the step's modules: the branch, or the layer holding pre and branch


def _ordered_paths(node: fx.Node) -> list[str]:
    """The module paths of ``node``'s stack, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values()]


def _branch_module(add: fx.Node, h: fx.Node) -> str | None:
    """The outermost module that computed ``h`` and does not contain ``add``, if it sits under a
    numbered container below the module doing the add."""
    outer = set(_ordered_paths(add))
    path = next((p for p in _ordered_paths(h) if p not in outer), None)
    if path is None:
        return None
    owner = max((p for p in outer if path.startswith(p + ".")), key=len, default="")
    below = path[len(owner) + 1:] if owner else path
    return path if any(part.isdigit() for part in below.split(".")) else None


def _branch(add: fx.Node, h: fx.Node, s: fx.Node, members_of: dict[str, list[fx.Node]],
            params: dict[str, str]) -> _Branch | None:
    path = _branch_module(add, h)
    if path is None or path not in members_of:
        return None
    nodes = members_of[path]
    members = set(nodes)
    leaving = [n for n in nodes if any(user not in members for user in n.users)]
    if leaving != [h] or list(h.users) != [add] or not (shape_of(s) == shape_of(h) == shape_of(add)):
        return None
    inputs = _inputs(nodes, params)
    if s in inputs:
        return _Branch(path, [*nodes, add], s, add, tuple(n for n in inputs if n is not s), owner=path)
    pre = _pre_module(add, s, path, inputs, members, members_of, params)
    if pre is None:
        return None
    pre_path, pre_out = pre
    owner = _common_module(pre_path, path)
    return _Branch(path, [*members_of[pre_path], *nodes, add], s, add, tuple(n for n in inputs if n is not pre_out),
                   pre=pre_path, owner=owner)


def _inputs(nodes: list[fx.Node], params: dict[str, str]) -> list[fx.Node]:
    """The values ``nodes`` read from outside themselves, other than the model's own state."""
    members = set(nodes)
    return list(dict.fromkeys(arg for n in nodes for arg in n.all_input_nodes
                              if arg not in members and arg.op != "get_attr"
                              and not (arg.op == "placeholder" and arg.name in params)))


def _pre_module(add: fx.Node, s: fx.Node, branch_path: str, inputs: list[fx.Node], branch: set[fx.Node],
                members_of: dict[str, list[fx.Node]], params: dict[str, str]) -> tuple[str, fx.Node] | None:
    """A module call the stream ``s`` passes through on its way into the branch (``block(norm(x))``, with the
    norm a sibling of the block under one layer, as in x-transformers): its path and output, if its only input
    is ``s``, its only value leaving it is that output, and only the branch reads it."""
    for value in inputs:
        path = _branch_module(add, value)
        nodes = members_of.get(path or "", [])
        if not nodes or path is None or not _common_module(path, branch_path):
            continue
        members = set(nodes)
        leaving = [n for n in nodes if any(user not in members for user in n.users)]
        if (leaving == [value] and _inputs(nodes, params) == [s] and all(u in branch for u in value.users)
                and shape_of(value) == shape_of(s)):
            return path, value
    return None


def _common_path(paths: list[str]) -> str:
    """The deepest module path above (or equal to) all ``paths``."""
    return os.path.commonpath([p.replace(".", "/") for p in paths]).replace("/", ".")


def _common_module(a: str, b: str) -> str:
    """The deepest module path above (or equal to) both ``a`` and ``b`` that is numbered (``layers.3``)."""
    common = _common_path([a, b])
    return common if any(part.isdigit() for part in common.split(".")) else ""


def _members_by_module(graph: fx.Graph, owned: set[fx.Node]) -> tuple[dict[str, list[fx.Node]], dict[str, int]]:
    """Each module's nodes in its first call, and how often each module is called."""
    found: dict[str, list[fx.Node]] = {}
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node not in owned:
            for path, call in module_calls(node).items():
                calls[path] = max(calls.get(path, 0), call + 1)
                if call == 0:
                    found.setdefault(path, []).append(node)
    return found, calls


def find_branch_chains(graph: fx.Graph, params: dict[str, str], state: dict[str, str], owned: set[fx.Node],
                       report: ChainReport, block_key: str) -> None:
    """Add the parent-loop chains of ``graph`` to ``report`` (nodes in ``owned`` belong to blocks
    already found; ``params``: placeholder name → qualified name of the model's own state and constants,
    ``state``: of its parameters and buffers only), marking their nodes with
    ``node.meta[block_key] = (container, index)``."""
    members_of, calls = _members_by_module(graph, owned)
    steps: dict[fx.Node, _Branch] = {}  # by add node
    for add in graph.nodes:
        if add.op != "call_function" or add.target is not _ADD or add in owned or len(add.args) < 2:
            continue
        operands = [a for a in add.args[:2] if isinstance(a, fx.Node)]
        if len(operands) != 2:
            continue
        for h, s in (operands, operands[::-1]):
            branch = _branch(add, h, s, members_of, params)
            if branch is not None:
                steps[add] = branch
                break
    following = {branch.stream_in: branch for branch in steps.values()}
    for first in [b for b in steps.values() if b.stream_in not in steps]:
        chain = [first]
        while chain[-1].add in following:
            chain.append(following[chain[-1].add])
        if len(chain) >= 2:
            _report_chain(chain, params, state, calls, report, block_key)


def _report_chain(chain: list[_Branch], params: dict[str, str], state: dict[str, str], calls: dict[str, int],
                  report: ChainReport, block_key: str) -> None:
    container = _common_path([b.path for b in chain])
    problem = _chain_problem(chain, params, calls)
    if problem is not None:
        report.rejections.append(Rejection(container, *problem))
        return
    for index, branch in enumerate(chain):
        for node in branch.nodes:
            node.meta[block_key] = (container, index)
    report.chains.append(ChainInfo(container=container, blocks=tuple(
        BlockInfo(path=b.path, stream_in=b.stream_in.name, stream_out=b.add.name,
                  side_inputs=tuple(side_input(n) for n in b.side_inputs), random=any(is_random(n) for n in b.nodes),
                  n_nodes=len(b.nodes), stream_shape=shape_of(b.stream_in), branch=True, pre=b.pre, owner=b.owner,
                  outside=outside_state(b.nodes, state, b.owner))
        for b in chain)))


def _chain_problem(chain: list[_Branch], params: dict[str, str],
                   calls: dict[str, int]) -> tuple[str, str | None, str] | None:
    """(module, node, reason) of the first thing that keeps ``chain`` from being a BDIA chain."""
    for branch in chain:
        if calls.get(branch.path, 1) > 1:
            return branch.path, None, (f"module '{branch.path}' is called {calls[branch.path]} times in one forward "
                                       "(shared weights, or the parent runs its loop again); a chain needs one "
                                       "module per step, called once")
    for branch, after in zip(chain, chain[1:]):
        taps = [u for u in branch.add.users if u not in set(after.nodes)]
        if taps:
            return branch.path, branch.add.name, (
                f"stream value '{branch.add.name}' after '{branch.path}' is also used by "
                f"{', '.join(u.name for u in taps)} outside the chain; intermediate stream values are not kept by a "
                "reversible chain (output_hidden_states or a layer-wise tap: turn it off, or strict=False keeps "
                "this chain as it is)")
    for branch in chain:
        for node in branch.nodes:
            if is_mutating(node) and node.args and node.args[0] is branch.stream_in:
                return branch.path, node.name, f"in-place op {node.target} (node '{node.name}') on the residual stream"
        written = state_write(branch.nodes, params)
        if written is not None:
            return branch.path, written[0].name, state_write_reason(*written)
    return None
