"""Analysis pass: find residual block chains in a captured graph.

A chain is a run of sibling block modules (children ``prefix.0``, ``prefix.1``, ... of one
module) such that, in the graph, each block maps a stream value x to ``x + branch`` through
a path of add nodes, and each block's output is the next block's stream input. Nodes are
assigned to blocks by ``node.meta["nn_module_stack"]``. No model-specific code or class names.

The pass marks block nodes with ``node.meta[BLOCK_META_KEY] = (container, index)`` and returns a
:class:`~bdia_fx.report.ChainReport`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from bdia_fx.passes.branches import find_branch_chains
from bdia_fx.passes.nodes import (
    ADD_TARGETS,
    is_identity,
    is_mutating,
    is_random,
    module_calls,
    module_paths,
    outside_state,
    shape_of,
    side_input,
    state_write,
    state_write_reason,
)
from bdia_fx.report import BlockInfo, ChainInfo, ChainReport, Rejection

__all__ = ["BLOCK_META_KEY", "find_chains_in_graph"]

BLOCK_META_KEY = "bdia_block"

@dataclass
class _BlockScan:
    path: str
    nodes: list[fx.Node]
    stream_in: fx.Node | None = None
    stream_out: fx.Node | None = None
    side_inputs: tuple[fx.Node, ...] = ()
    skip_path: tuple[fx.Node, ...] = ()
    problem: tuple[str | None, str] | None = None  # (node name, reason)
    residual_like: bool = False  # a residual block BDIA refuses (post-LN, in-place), not a non-block
    shared: tuple[fx.Node, ...] = ()  # values made from side inputs only, passed out for later blocks


@dataclass(frozen=True)
class _Container:
    """A module with numbered children (ModuleList / Sequential style): a candidate chain."""

    name: str
    paths: list[str]
    shared: bool  # one module object under several numbers (shared weights)
    one_class: bool


def _candidate_containers(model: nn.Module) -> list[_Container]:
    """Modules with numbered children, shallowest first."""
    found = []
    for name, module in model.named_modules():
        numbered = sorted((int(child), child, sub) for child, sub in module._modules.items()
                          if child.isdigit() and sub is not None)
        if numbered:
            prefix = f"{name}." if name else ""
            found.append(_Container(name, [prefix + child for _, child, _ in numbered],
                                    len({id(sub) for *_, sub in numbered}) < len(numbered),
                                    len({type(sub) for *_, sub in numbered}) == 1))
    found.sort(key=lambda c: c.name.count(".") if c.name else -1)
    return found


def _find_skip_path(out: fx.Node, members: set[fx.Node], inputs: list[fx.Node], want: fx.Node | None):
    """Adds from ``out`` back to a block input of the same shape: the residual skip path."""
    shape = shape_of(out)

    def walk(node: fx.Node, path: tuple[fx.Node, ...]):
        if node not in members:
            ok = node is want if want is not None else (node in inputs and shape_of(node) == shape)
            return (node, path) if ok else None
        if is_identity(node):  # e.g. RMSNorm's hidden.to(float32), OPT's (x + h).view(shape)
            return walk(node.args[0], path + (node,))
        if node.target not in ADD_TARGETS:
            return None
        for arg in node.args[:2]:
            if isinstance(arg, fx.Node):
                hit = walk(arg, path + (node,))
                if hit is not None:
                    return hit
        return None

    return walk(out, ())


def _scan_block(path: str, nodes: list[fx.Node], params: dict[str, str], want: fx.Node | None,
                residual_only: bool = True) -> _BlockScan:
    scan = _BlockScan(path, nodes)
    members = set(nodes)
    inputs: list[fx.Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if (arg not in members and arg not in inputs and not (arg.op == "placeholder" and arg.name in params)
                    and arg.op != "get_attr"):
                inputs.append(arg)
    outputs = [n for n in nodes if any(user not in members for user in n.users)]
    mutated = [n for n in outputs if is_mutating(n) and n.args and n.args[0] in inputs]
    if len(outputs) > 1 and mutated:
        node = mutated[0]
        scan.problem = (node.name, f"block modifies its input '{node.args[0].name}' in place ({node.target}, node "
                        f"'{node.name}'); a recompute would read the modified value. Modify a copy inside the block")
        return scan
    if len(outputs) > 1:
        stream_out, others, independent = _split_outputs(outputs, members, inputs, want)
        if stream_out is not None and independent:
            scan.stream_out, scan.shared = stream_out, others
            scan.problem = (stream_out.name, "block computes values from side inputs only and passes them out to the "
                            f"later blocks ({', '.join(n.name for n in others)}; e.g. T5's position bias): only a "
                            "chain's first block may, and it then runs as it is. Compute them before the blocks")
            return scan
        scan.residual_like = stream_out is not None  # a residual block with a tap on its stream
        streams = [n for n in outputs if _find_skip_path(n, members, inputs, None) is not None]
        if stream_out is None and len(streams) > 1:
            names = ", ".join(n.name for n in streams)
            scan.problem = (streams[0].name, f"block carries {len(streams)} residual streams ({names}: each x + h "
                            "of its own input, as in a dual-stream MM-DiT or Flux block); a BDIA chain carries one")
            return scan
    if len(outputs) != 1:
        names = ", ".join(n.name for n in outputs) or "none"
        scan.problem = (
            outputs[-1].name if outputs else None,
            f"block passes {len(outputs)} values out ({names}); only the residual stream may leave a block "
            "(returned caches, attention weights or values computed from the stream)",
        )
        return scan
    out = outputs[0]
    scan.stream_out = out
    last = out
    while is_identity(last) and last.args[0] in members:
        last = last.args[0]
    hit = _find_skip_path(out, members, inputs, want) if last.target in ADD_TARGETS else None
    if hit is None and not residual_only:  # any block map f_k with the stream's shape (BDIAConfig.residual_only)
        same_shape = [n for n in inputs if shape_of(n) == shape_of(out)]
        stream_in = want if want in inputs else (same_shape[0] if len(same_shape) == 1 else None)
        if stream_in is not None and shape_of(stream_in) == shape_of(out):
            hit, scan.residual_like = (stream_in, ()), True
    if hit is None and last.target not in ADD_TARGETS:
        after_add = any(isinstance(a, fx.Node) and a.target in ADD_TARGETS and a in members for a in out.args)
        if after_add and "norm" in str(out.target):  # its own add: a final norm after the blocks is not
            why = ("a post-LN block (normalisation after the residual add) is not x + h(x), so BDIA cannot apply "
                   "(BDIAConfig(residual_only=False) accepts it, experimentally)")
            scan.residual_like = True
        else:
            why = "the block is not x + h(x)"
        scan.problem = (out.name, f"block output is {out.target} (node '{out.name}'), not a residual add: {why}")
        return scan
    if hit is None:
        scan.problem = (out.name, "block output is not x + h(x): no path of adds leads back to the stream input")
        return scan
    scan.stream_in, scan.skip_path = hit[0], hit[1]
    scan.side_inputs = tuple(n for n in inputs if n is not scan.stream_in)
    stream_values = set(scan.skip_path) | {scan.stream_in}
    for node in nodes:
        if is_mutating(node) and node.args and node.args[0] in stream_values:
            scan.problem = (node.name, f"in-place op {node.target} (node '{node.name}') on the residual stream")
            scan.residual_like = True
            return scan
    written = state_write(nodes, params)
    if written is not None:
        scan.problem = (written[0].name, state_write_reason(*written))
        scan.residual_like = True  # a residual block, refused for this reason
    return scan


def _split_outputs(outputs: list[fx.Node], members: set[fx.Node], inputs: list[fx.Node],
                   want: fx.Node | None) -> tuple[fx.Node | None, tuple[fx.Node, ...], bool]:
    """A block's several outputs as (the one residual add on a block input, or None; the others;
    whether none of the others depends on that input: values made for later blocks, not taps)."""
    streams = [(out, hit[0]) for out in outputs if (hit := _find_skip_path(out, members, inputs, want)) is not None]
    if len(streams) != 1:
        return None, tuple(outputs), False
    stream_out, stream_in = streams[0]
    others = tuple(out for out in outputs if out is not stream_out)
    return stream_out, others, not any(_depends_on(out, stream_in, members) for out in others)


def _depends_on(node: fx.Node, source: fx.Node, members: set[fx.Node]) -> bool:
    """Whether ``node`` is computed from ``source`` within ``members``."""
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop()
        if current is source:
            return True
        if current in seen or current not in members:
            continue
        seen.add(current)
        frontier.extend(current.all_input_nodes)
    return False


def _blocks_of(graph: fx.Graph, paths: list[str]) -> tuple[dict[str, list[fx.Node]], set[str], dict[str, int]]:
    """The nodes run inside each child ``path`` in its first call — its own call, or, for a child that is never
    called itself (a ModuleList of [norm, branch, residual helper] the parent loop calls one by one), its
    submodules' calls —, the paths of the latter kind, and how often each child is called."""
    wanted = set(paths)
    direct: dict[str, list[fx.Node]] = {p: [] for p in paths}
    nested: dict[str, list[fx.Node]] = {p: [] for p in paths}
    calls: dict[str, int] = dict.fromkeys(paths, 0)
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        own = module_calls(node)
        for path in own.keys() & wanted:
            calls[path] = max(calls[path], own[path] + 1)
            if own[path] == 0:
                direct[path].append(node)
        for path in {a for p in own for a in _ancestors(p)[1:] if a in wanted} - own.keys():
            nested[path].append(node)
    uncalled = {p for p in paths if not direct[p] and nested[p]}
    return {p: direct[p] or nested[p] for p in paths}, uncalled, calls


def _ancestors(path: str) -> list[str]:
    """``path`` and the paths of the modules above it ("a.b.c": "a.b.c", "a.b", "a")."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)] if path else []


def find_chains_in_graph(ep: torch.export.ExportedProgram, model: nn.Module,
                         residual_only: bool = True) -> ChainReport:
    """Find the residual chains of ``model`` in its exported program ``ep`` (training mode); with
    ``residual_only=False`` also chains of blocks that are any map of the stream (post-LN)."""
    graph = ep.graph
    sig = ep.graph_signature
    state = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}  # placeholder -> the module state's name
    params = {**state, **sig.inputs_to_lifted_tensor_constants,
              **getattr(sig, "inputs_to_lifted_custom_objs", {})}  # a block's own state, not a side input: its name
    report = ChainReport(model=type(model).__name__)
    claimed: list[str] = []  # block paths of accepted or rejected chains; nested containers skip
    pending: list[tuple[Rejection, set[str]]] = []  # layers called part by part, and their paths
    order = {node: i for i, node in enumerate(graph.nodes)}

    candidates = _candidate_containers(model)
    for candidate in candidates:
        container, paths = candidate.name, candidate.paths
        if any(container == p or container.startswith(p + ".") for p in claimed):
            continue
        if candidate.shared:
            if any(module_paths(n) & set(paths) for n in graph.nodes if n.op == "call_function"):
                report.rejections.append(Rejection(
                    container, paths[0], None,
                    f"the numbered children of '{container}' are one module object used {len(paths)} times (shared "
                    "weights, as in ALBERT or a universal transformer); a chain needs one module per block"))
                claimed.extend(paths)
            continue
        members, uncalled, calls = _blocks_of(graph, paths)
        called = [p for p in paths if members[p]]
        if not called:
            continue
        called.sort(key=lambda p: order[members[p][0]])
        scans: list[_BlockScan] = []
        nested = _has_nested_candidate(candidate, candidates)  # stages of blocks: searched deeper if not linked
        for path in called:
            want = scans[-1].stream_out if scans and (scans[-1].problem is None or scans[-1].shared) else None
            scan = _scan_block(path, members[path], params, want, residual_only)
            if want is not None and scan.stream_in is None and not nested:  # x + h(x) of another value? (a link)
                alone = _scan_block(path, members[path], params, None, residual_only)
                scan = alone if alone.stream_in is not None else scan
            scans.append(scan)
        residual = [s for s in scans if _residual(s)]
        if uncalled & set(called) and len(residual) < len(scans):
            continue  # parts the parent calls one by one that are not all residual: no candidate (their own may be)
        if not residual:
            report.ignored.append((container, f"its numbered children are not residual blocks ({_why_not(scans)})"))
            continue
        first = next(i for i, scan in enumerate(scans) if _residual(scan))
        last = max(i for i, scan in enumerate(scans) if _residual(scan)) + 1
        if (first, last) != (0, len(scans)) and last - first >= 2 and all(map(_residual, scans[first:last])):
            outside = [scan.path for scan in scans[:first] + scans[last:]]  # e.g. an embedding before the blocks
            report.notes.append(f"{', '.join(repr(p) for p in outside)} of '{container}' run as they are "
                                "(not residual blocks, before or after the chain)")
            claimed.extend(outside)
            called, scans, residual = called[first:last], scans[first:last], scans[first:last]
        if len(residual) < len(scans) and _has_nested_candidate(candidate, candidates):
            report.ignored.append((container, f"not all of its numbered children are residual blocks "
                                              f"({_why_not(scans)}): chains searched one level deeper (stages of "
                                              "blocks and downsampling?)"))
            continue
        if scans[0].shared and len(scans) > 1:  # block 0 makes what the others share: the chain starts after it
            report.notes.append(f"'{scans[0].path}' runs as it is (not in the chain): it computes "
                                f"{', '.join(n.name for n in scans[0].shared)} from side inputs for the later blocks")
            claimed.append(called[0])
            called, scans = called[1:], scans[1:]
        linked = [scans[i].stream_in is not None and scans[i].stream_in is scans[i - 1].stream_out
                  for i in range(1, len(scans))]
        if not candidate.one_class and len(residual) < len(scans):
            report.ignored.append((container, "its numbered children are of different classes "
                                              f"and not all residual blocks ({_why_not(scans)})"))
            continue
        if len(scans) > 1 and not any(linked) and not _feeds(scans):
            report.ignored.append((container, "its numbered children do not feed one another"))
            continue
        rejection = _repeated_call(container, called, calls) or _chain_problem(container, scans, linked)
        if rejection is not None and uncalled & set(called):
            continue  # as above: only a chain that is sound but for its calls is refused for them
        claimed.extend(called)
        if rejection is None and (parts := _uncalled_block(container, scans)) is not None:
            pending.append((parts, set(called)))  # unless the parent-loop search finds its steps (pre + branch)
            continue
        if rejection is not None:
            report.rejections.append(rejection)
            continue
        for index, scan in enumerate(scans):
            for node in scan.nodes:
                node.meta[BLOCK_META_KEY] = (container, index)
        report.chains.append(
            ChainInfo(
                container=container,
                blocks=tuple(
                    BlockInfo(
                        path=s.path,
                        stream_in=s.stream_in.name,
                        stream_out=s.stream_out.name,
                        side_inputs=tuple(side_input(n) for n in s.side_inputs),
                        random=any(is_random(n) for n in s.nodes),
                        n_nodes=len(s.nodes),
                        stream_shape=shape_of(s.stream_in),
                        outside=outside_state(s.nodes, state, s.path),
                    )
                    for s in scans
                ),
            )
        )
    owned = {n for n in graph.nodes if BLOCK_META_KEY in n.meta or module_paths(n) & set(claimed)}
    find_branch_chains(graph, params, state, owned, report, BLOCK_META_KEY)
    stepped = {a for c in report.chains if c.branch for b in c.blocks for a in _ancestors(b.path)}
    report.rejections.extend(rejection for rejection, paths in pending if not paths & stepped)
    branch_chains = [c.container for c in report.chains if c.branch]
    report.ignored = [(name, why) for name, why in report.ignored
                      if not any(name == c or name.startswith(c + ".") for c in branch_chains)]
    return report


def _why_not(scans: list[_BlockScan]) -> str:
    """Why the first child that is no residual block is not one: its path and reason."""
    scan = next(s for s in scans if not _residual(s))
    return f"'{scan.path}': {scan.problem[1] if scan.problem else 'not x + h(x)'}"


def _residual(scan: _BlockScan) -> bool:
    """Whether a scanned child is a residual block (convertible, or refused for a reason of its own)."""
    return scan.problem is None or scan.residual_like or bool(scan.shared)


def _has_nested_candidate(candidate: _Container, candidates: list[_Container]) -> bool:
    """Whether a module with numbered children lies inside one of ``candidate``'s children."""
    return any(other.name.startswith(path + ".") for other in candidates for path in candidate.paths)


def _feeds(scans: list[_BlockScan]) -> bool:
    """Whether any block's values reach the next block (even through other ops)."""
    for prev, nxt in zip(scans, scans[1:]):
        prev_nodes = set(prev.nodes)
        frontier = [a for n in nxt.nodes for a in n.all_input_nodes if a not in set(nxt.nodes)]
        seen: set[fx.Node] = set()
        while frontier:
            node = frontier.pop()
            if node in prev_nodes:
                return True
            if node in seen or node.op == "placeholder":
                continue
            seen.add(node)
            frontier.extend(node.all_input_nodes)
    return False


def _uncalled_block(container: str, scans: list[_BlockScan]) -> Rejection | None:
    """A residual block that is never called as one module (its parent calls its parts one by one, e.g.
    ``x = residual(branch(norm(x)), x)`` over a ModuleList per layer): the chain runs blocks by their
    calls, so it is refused, naming the parts and the fix."""
    for scan in scans:
        if any(scan.path in module_paths(node) for node in scan.nodes):
            continue
        parts = sorted({path.split(".")[scan.path.count(".") + 1] for node in scan.nodes for path in module_paths(node)
                        if path.startswith(scan.path + ".")}, key=lambda p: (len(p), p))
        adder = max((p for p in module_paths(scan.stream_out) if p.startswith(scan.path + ".")), key=len, default=None)
        where = f", the residual add in '{adder}'" if adder else ""
        return Rejection(
            container, scan.path, scan.stream_out.name,
            f"'{scan.path}' is x + h(x) but is never called as one module: the parent calls its parts one by one "
            f"({', '.join(repr(f'{scan.path}.{p}') for p in parts)}{where}), and a reversible chain runs each block "
            "by its call. Wrap each layer's parts in one module whose forward is the layer (e.g. "
            "x = residual(branch(norm(x)), x)) and convert that model")
    return None


def _repeated_call(container: str, paths: list[str], calls: dict[str, int]) -> Rejection | None:
    """A block called more than once in one forward (the parent loops over the blocks again)."""
    path = next((p for p in paths if calls[p] > 1), None)
    if path is None:
        return None
    return Rejection(container, path, None, f"'{path}' is called {calls[path]} times in one forward (the parent "
                     "runs the blocks more than once: weights shared across depth); a reversible chain runs each "
                     "block once per call")


def _chain_problem(container: str, scans: list[_BlockScan], linked: list[bool]) -> Rejection | None:
    for scan in scans:
        if scan.problem is not None:
            return Rejection(container, scan.path, scan.problem[0], scan.problem[1])
    if len(scans) < 2:
        return Rejection(container, scans[0].path, None,
                         f"fewer than 2 blocks ({len(scans)}): BDIA needs a chain of at least 2")
    for i, ok in enumerate(linked):
        if not ok:
            got = scans[i + 1].stream_in.name if scans[i + 1].stream_in is not None else "?"
            return Rejection(
                container, scans[i + 1].path, got,
                f"stream input '{got}' is not the previous block's output '{scans[i].stream_out.name}': "
                "the parent transforms the stream between blocks",
            )
    for prev, nxt in zip(scans, scans[1:]):
        taps = [u for u in prev.stream_out.users if u not in set(nxt.nodes)]
        if taps:
            names = ", ".join(u.name for u in taps)
            return Rejection(
                container, prev.path, prev.stream_out.name,
                f"stream value '{prev.stream_out.name}' between '{prev.path}' and '{nxt.path}' is also used by "
                f"{names} outside the chain (output_hidden_states or a layer-wise tap); "
                "intermediate stream values are not kept by a reversible chain (turn the tap off, or strict=False "
                "keeps this chain as it is)",
            )
    return None
