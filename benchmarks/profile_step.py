"""Where a BDIA training step spends its time, next to per-block checkpointing (torch.profiler).

Profiles N training steps of each method on the benchmark model of ``memory.py`` and prints the
operators whose self CPU time differs most between bdia_fx and a checkpoint variant, plus totals
by kind: the block's own arithmetic (matmuls, attention, norms, ...), the fixed-point work of
BDIA (rounding, range checks, integer updates, side bits) and autograd/recompute machinery.

    python benchmarks/profile_step.py [--layers 12] [--width 256] [--steps 3] [--method bdia]
                                      [--against checkpoint-full] [--json PATH]

``--method bdia-stored --against plain`` prices the stored mode's chain work against plain autograd.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bdia_fx.report import write_json

from memory import D, build, heads_of, step

FIXED_POINT_OPS = {
    "aten::round_", "aten::aminmax", "aten::__rshift__", "aten::__lshift__", "aten::bitwise_and_", "aten::bitwise_and",
    "aten::bitwise_or_", "aten::bitwise_right_shift_", "aten::bitwise_right_shift", "aten::bitwise_left_shift",
    "aten::addcmul_", "aten::mul_", "aten::_to_copy", "aten::to", "aten::lt", "aten::gt", "aten::ne", "aten::item",
    "aten::_local_scalar_dense", "aten::sub", "aten::mul", "aten::stack",
}
"""Operators only the chain's fixed-point code calls here (by name: ``aten::sum`` stays block arithmetic,
though bdia's extra ``sum`` calls are its checksums, and ``aten::copy_`` too, though some are its casts)."""
MACHINERY_PREFIXES = ("autograd::", "_Update", "_StreamUpdate", "_EnterChain", "CheckpointFunction", "torch::autograd")


def kind_of(op: str) -> str:
    if op in FIXED_POINT_OPS:
        return "fixed point"
    if op.startswith(MACHINERY_PREFIXES) or op.endswith("Backward0") or op.endswith("Backward"):
        return "autograd / recompute"
    return "block arithmetic"


def self_times(methods: list[str], layers: int, steps: int, width: int = D) -> dict[str, dict[str, tuple[float, int]]]:
    """Self CPU ms per step and calls per step of every operator, per method, after two warm-up
    steps; the methods' steps are profiled in turn (round robin) so machine drift hits all alike."""
    built = {m: build(m, layers, width) for m in methods}
    totals: dict[str, dict[str, list]] = {m: {} for m in methods}
    for round_ in range(steps + 2):
        for method, (model, x) in built.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(model, x.detach().clone()).backward()
            model.zero_grad(set_to_none=False)
            if round_ < 2:
                continue
            for event in prof.key_averages():
                entry = totals[method].setdefault(event.key, [0.0, 0])
                entry[0] += event.self_cpu_time_total / 1000
                entry[1] += event.count
    return {m: {op: (ms / steps, n // steps) for op, (ms, n) in ops.items()} for m, ops in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=D, help="the model width d (heads = d / 64)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--method", default="bdia", choices=["bdia", "bdia-no-verify", "bdia-stored"],
                        help="the bdia_fx variant profiled (its columns are headed 'bdia')")
    parser.add_argument("--against", default="checkpoint-full",
                        choices=["checkpoint", "checkpoint-full", "checkpoint-reentrant", "plain"])
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", help="write the per-operator table here")
    args = parser.parse_args()
    try:
        heads_of(args.width)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(2)
    times = self_times([args.against, args.method], args.layers, args.steps, args.width)
    base, bdia = times[args.against], times[args.method]
    rows = []
    for op in set(base) | set(bdia):
        (b_ms, b_n), (d_ms, d_n) = base.get(op, (0.0, 0)), bdia.get(op, (0.0, 0))
        rows.append({"op": op, "kind": kind_of(op), args.against: b_ms, "bdia": d_ms, "calls_base": b_n,
                     "calls_bdia": d_n, "diff_ms": d_ms - b_ms})
    rows.sort(key=lambda r: -abs(r["diff_ms"]))
    total_base, total_bdia = sum(r[args.against] for r in rows), sum(r["bdia"] for r in rows)
    print(f"self CPU time per training step, K={args.layers}, B=8 T=64 d={args.width}, {args.steps} profiled steps "
          f"each; 'bdia' is {args.method}")
    print(f"total: {args.against} {total_base:.1f} ms, bdia {total_bdia:.1f} ms ({total_bdia / total_base:.3f}x)")
    print(f"\n{'kind':<22} {args.against + ' ms':>18} {'bdia ms':>9} {'diff ms':>8}")
    for kind in ("block arithmetic", "fixed point", "autograd / recompute"):
        mine = [r for r in rows if r["kind"] == kind]
        b_ms, d_ms = sum(r[args.against] for r in mine), sum(r["bdia"] for r in mine)
        print(f"{kind:<22} {b_ms:>18.1f} {d_ms:>9.1f} {d_ms - b_ms:>+8.1f}")
    print(f"\n{'operator':<52} {'kind':<21} {'diff ms':>8} {'calls':>11}")
    for r in rows[:args.top]:
        print(f"{r['op'][:52]:<52} {r['kind']:<21} {r['diff_ms']:>+8.2f} {r['calls_base']:>5}/{r['calls_bdia']:<5}")
    if args.json:
        write_json({"layers": args.layers, "width": args.width, "method": args.method, "against": args.against,
                    "rows": rows}, args.json)


if __name__ == "__main__":
    main()
