"""What the chain-finding pass found: chains, their blocks and side inputs, and refusals."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import fx

__all__ = ["BlockInfo", "ChainInfo", "ChainReport", "Rejection", "SideInput", "graph_summary", "write_json"]


@dataclass(frozen=True)
class SideInput:
    """A value a block reads besides the stream (mask, rotary table, encoder memory, ...)."""

    node: str
    shape: tuple[int, ...] | None
    dtype: str | None

    def __str__(self) -> str:
        shape = "x".join(str(s) for s in self.shape) if self.shape is not None else "?"
        return f"{self.node}[{shape}]"

    def kind(self, stream: tuple[int, ...] | None) -> str:
        """What the value looks like next to the stream's shape (batch, tokens, width): a guess for reading."""
        if self.shape is None or stream is None or len(stream) < 2:
            return "side input"
        tokens, width = stream[-2], stream[-1]
        if self.dtype == "bool" or (len(self.shape) == 4 and self.shape[-1] == tokens):
            return "attention mask"
        if len(self.shape) >= 2 and self.shape[-1] == width:
            return "encoder memory" if self.shape[-2] != tokens else "stream-shaped state"
        if len(self.shape) >= 2 and self.shape[-2] == tokens:
            return "position table"
        return "side input"


@dataclass(frozen=True)
class BlockInfo:
    """One step of a chain: a block module and its place in the captured graph."""

    path: str
    stream_in: str
    stream_out: str
    side_inputs: tuple[SideInput, ...]
    random: bool
    n_nodes: int
    stream_shape: tuple[int, ...] | None = None
    step_ends: tuple[str, ...] = ()  # granularity="sublayer": the residual add ending each step
    branch: bool = False  # the module computes h(x) only; the residual add is in the parent's code
    pre: str | None = None  # a branch's module the stream passes through first (h(x) = branch(pre(x)))
    owner: str = ""  # a branch step's modules' holder: the layer of pre and branch, else the block ("": the block)
    outside: tuple[str, ...] = ()  # parameters and buffers the step reads from modules outside it (by name)


@dataclass(frozen=True)
class ChainInfo:
    """A residual chain: consecutive blocks whose outputs feed the next block's stream."""

    container: str
    blocks: tuple[BlockInfo, ...]

    @property
    def block_paths(self) -> tuple[str, ...]:
        return tuple(b.path for b in self.blocks)

    @property
    def branch(self) -> bool:
        """Whether the residual adds are in the parent's code (the blocks compute h(x) only)."""
        return self.blocks[0].branch

    @property
    def side_inputs(self) -> tuple[SideInput, ...]:
        seen: dict[str, SideInput] = {}
        for block in self.blocks:
            for side in block.side_inputs:
                seen.setdefault(side.node, side)
        return tuple(seen.values())


@dataclass(frozen=True)
class Rejection:
    """A candidate chain BDIA cannot apply to, with the module/node and the reason."""

    container: str
    module: str
    node: str | None
    reason: str


@dataclass
class ChainReport:
    """Result of :func:`bdia_fx.find_chains`; ``print(report)`` shows it as a table."""

    model: str
    chains: list[ChainInfo] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how chains were delimited (e.g. a first block left out)
    memory_plan: Any = None  # convert(..., memory_budget=...): the bdia_fx.budget.MemoryPlan applied

    def __str__(self) -> str:
        lines = [f"BDIA chain report for {self.model}"]
        if not self.chains:
            lines.append("  no convertible chain")
        for chain in self.chains:
            lines.append(f"  chain '{chain.container}': {len(chain.blocks)} blocks")
            rows = [("block", "stream in -> out", "side inputs", "random", "nodes")]
            for b in chain.blocks:
                sides = ", ".join(str(s) for s in b.side_inputs) or "-"
                path = f"{b.pre} -> {b.path}" if b.pre else b.path  # a layer called part by part: h = branch(pre)
                rows.append((path, f"{b.stream_in} -> {b.stream_out}", sides, "yes" if b.random else "no",
                             str(b.n_nodes)))
            lines.extend("    " + line for line in text_table(rows))
        if self.rejections:
            lines.append("  refused (not converted):")
            for r in self.rejections:
                node = f", node '{r.node}'" if r.node else ""
                lines.append(f"    '{r.container}' (module '{r.module}'{node}): {r.reason}")
        if self.notes:
            lines.append("  notes:")
            lines.extend(f"    {note}" for note in self.notes)
        if self.ignored:
            lines.append("  not chains (left as they are):")
            lines.extend(f"    '{name}': {why}" for name, why in self.ignored)
        if self.memory_plan is not None:
            lines.extend("  " + line for line in str(self.memory_plan).splitlines())
        return "\n".join(lines)


def text_table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as aligned lines, the first row a header underlined with dashes."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def graph_summary(report: ChainReport, captured: fx.Graph, rewritten: fx.Graph) -> str:
    """A readable account of the rewrite: node counts, each chain node, its blocks, steps and side
    inputs named by what they look like (the full graphs print with ``print(graph)``)."""
    chains = {c.container: c for c in report.chains}
    lines = [f"rewritten graph of {report.model}: {_ops(captured)} captured operations, {_ops(rewritten)} after the "
             "rewrite"]
    inputs = [n for n in rewritten.nodes if n.op == "placeholder" and n.users and "val" in n.meta
              and not n.name.startswith(("p_", "b_", "c_"))]
    lines.append("  inputs: " + ", ".join(f"{n.name} {_shape_of(n)}" for n in inputs))
    seen = 0
    for node in rewritten.nodes:
        chain = chains.get(getattr(node.meta.get("bdia_chain"), "container", None))
        if chain is None:
            seen += node.op == "call_function"
            continue
        lines.append(f"  {seen} operations before chain '{chain.container}'")
        steps = {len(b.step_ends) or 1 for b in chain.blocks}
        stream = chain.blocks[0].stream_shape
        lines.append(f"  {node.name}: BDIA chain '{chain.container}', blocks {chain.blocks[0].path} … "
                     f"{chain.blocks[-1].path} ({len(chain.blocks)}, {'/'.join(map(str, sorted(steps)))} step(s) each, "
                     f"{sum(b.n_nodes for b in chain.blocks)} operations folded in), stream "
                     f"{'x'.join(map(str, stream)) if stream else '?'}, input {node.args[0].name}")
        for side in chain.side_inputs:
            lines.append(f"    side input {side} ({side.kind(stream)})")
        seen = 0
    lines.append(f"  {seen} operations after the chains, then the output")
    return "\n".join(lines)


def _ops(graph: fx.Graph) -> int:
    return sum(n.op == "call_function" for n in graph.nodes)


def _shape_of(node: fx.Node) -> str:
    val = node.meta.get("val")
    return (f"[{', '.join(str(s) for s in val.shape)}] {str(val.dtype).replace('torch.', '')}"
            if hasattr(val, "shape") else "")


def write_json(data: Any, path: str | Path) -> None:
    """Write ``data`` as indented JSON to ``path``, creating its folder (paths and other objects are
    written as their text): the ``--json`` output of bdia-inspect, the benchmarks and the examples."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
