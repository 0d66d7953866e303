"""What the chain-finding pass found: chains, their blocks and side inputs, and refusals."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SideInput:
    """A value a block reads besides the stream (mask, rotary table, encoder memory, ...)."""

    node: str
    shape: tuple[int, ...] | None
    dtype: str | None

    def __str__(self) -> str:
        shape = "x".join(str(s) for s in self.shape) if self.shape is not None else "?"
        return f"{self.node}[{shape}]"


@dataclass(frozen=True)
class BlockInfo:
    """One step of a chain: a block module and its place in the captured graph."""

    path: str
    stream_in: str
    stream_out: str
    side_inputs: tuple[SideInput, ...]
    random: bool
    n_nodes: int


@dataclass(frozen=True)
class ChainInfo:
    """A residual chain: consecutive blocks whose outputs feed the next block's stream."""

    container: str
    blocks: tuple[BlockInfo, ...]

    @property
    def block_paths(self) -> tuple[str, ...]:
        return tuple(b.path for b in self.blocks)

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

    def __str__(self) -> str:
        lines = [f"BDIA chain report for {self.model}"]
        if not self.chains:
            lines.append("  no convertible chain")
        for chain in self.chains:
            lines.append(f"  chain '{chain.container}': {len(chain.blocks)} blocks")
            rows = [("block", "stream in -> out", "side inputs", "random", "nodes")]
            for b in chain.blocks:
                sides = ", ".join(str(s) for s in b.side_inputs) or "-"
                rows.append((b.path, f"{b.stream_in} -> {b.stream_out}", sides, "yes" if b.random else "no", str(b.n_nodes)))
            lines.extend("    " + line for line in _table(rows))
        if self.rejections:
            lines.append("  rejected:")
            for r in self.rejections:
                node = f", node '{r.node}'" if r.node else ""
                lines.append(f"    '{r.container}' (module '{r.module}'{node}): {r.reason}")
        if self.ignored:
            lines.append("  not chains (left as they are):")
            lines.extend(f"    '{name}': {why}" for name, why in self.ignored)
        return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out
