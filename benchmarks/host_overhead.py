"""Host overhead per block per step: what a training step costs where the arithmetic is negligible.

At widths 16 and 32 a block's arithmetic takes microseconds, so a step is host work (Python,
dispatch, autograd): what a GPU waiting on the host sees. For plain autograd, per-block
``torch.utils.checkpoint`` and bdia_fx (eager; with ``--compile`` also checkpointing and bdia_fx
under ``torch.compile``) on the benchmark model of ``memory.py``, it prints per block per step the
step time (medians of steps interleaved round robin in this process; the excess over plain and over
checkpointing from the paired per-round differences, and the paired ratio to checkpointing, which
the machine's speed does not move), and the aten operators dispatched in forward
and in backward (counted by a ``TorchDispatchMode`` in a separate step). Then where bdia_fx's host
time goes: the Python functions with the most own time per block per step (``cProfile``).

    python benchmarks/host_overhead.py [--widths 16 32] [--layers 12] [--steps 20] [--compile] [--json PATH]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bdia_fx.report import write_json

from memory import build, heads_of, paired_ratio, step

EAGER = ("plain", "checkpoint", "bdia")
COMPILED = ("checkpoint compiled", "bdia compiled")


class OpCount(TorchDispatchMode):
    """Counts the aten operators dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def models(methods: tuple[str, ...], layers: int, width: int) -> dict[str, tuple[Callable, nn.Module, torch.Tensor]]:
    """Each method's (callable, model, input); a compiled method compiles its eager model."""
    built = {}
    for method in methods:
        model, x = build(method.removesuffix(" compiled"), layers, width)
        built[method] = (torch.compile(model) if method.endswith(" compiled") else model, model, x)
    return built


def train_step(run: Callable, model: nn.Module, x: torch.Tensor) -> None:
    step(run, x.detach().clone()).backward()
    model.zero_grad(set_to_none=False)


def step_times(built: dict, steps: int) -> dict[str, list[float]]:
    """Each method's step seconds over ``steps`` rounds after 3 warm-up rounds (compiles included there)."""
    times: dict[str, list[float]] = {method: [] for method in built}
    for round_ in range(steps + 3):
        for method, (run, model, x) in built.items():
            start = time.perf_counter()
            train_step(run, model, x)
            if round_ >= 3:
                times[method].append(time.perf_counter() - start)
    return times


def dispatched_ops(run: Callable, model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """aten operators dispatched by one training step's forward and by its backward."""
    with OpCount() as forward:
        loss = step(run, x.detach().clone())
    with OpCount() as backward:
        loss.backward()
    model.zero_grad(set_to_none=False)
    return forward.count, backward.count


def paired_excess_ms(times: list[float], reference: list[float], layers: int) -> float:
    """Median over rounds of the per-round difference, in ms per block."""
    return statistics.median(a - b for a, b in zip(times, reference)) * 1000 / layers


def where_the_time_goes(run: Callable, model: nn.Module, x: torch.Tensor, layers: int, steps: int,
                        top: int) -> list[dict]:
    """The functions with the most own time (cProfile), in µs per block per step."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        train_step(run, model, x)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = [{"function": f"{path.split('site-packages/')[-1].split('/work/main/')[-1]}:{line}({name})",
             "own_us": own * 1e6 / steps / layers, "calls": calls / steps / layers}
            for (path, line, name), (_, calls, own, _, _) in stats.items()]
    return sorted(rows, key=lambda r: -r["own_us"])[:top]


def measure(width: int, layers: int, steps: int, compiled: bool, top: int) -> dict:
    methods = EAGER + (COMPILED if compiled else ())
    built = models(methods, layers, width)
    times = step_times(built, steps)
    rows = []
    for method, (run, model, x) in built.items():
        forward_ops, backward_ops = dispatched_ops(run, model, x)
        rows.append({"width": width, "method": method,
                     "step_ms": statistics.median(times[method]) * 1000,
                     "per_block_ms": statistics.median(times[method]) * 1000 / layers,
                     "over_plain_ms": paired_excess_ms(times[method], times["plain"], layers),
                     "over_checkpoint_ms": paired_excess_ms(times[method], times["checkpoint"], layers),
                     "vs_checkpoint": paired_ratio(times[method], times["checkpoint"])[0],
                     "forward_ops_per_block": forward_ops / layers, "backward_ops_per_block": backward_ops / layers})
    run, model, x = built["bdia"]
    profile = where_the_time_goes(run, model, x, layers, max(2, steps // 4), top)
    return {"rows": rows, "bdia_profile": profile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also checkpointing and bdia_fx under torch.compile")
    parser.add_argument("--top", type=int, default=12, help="functions shown from the bdia_fx profile")
    parser.add_argument("--json", help="write the tables here")
    args = parser.parse_args()
    for width in args.widths:
        try:
            heads_of(width)
        except ValueError as error:
            parser.error(str(error))
    torch.set_num_threads(2)
    results = {}
    for width in args.widths:
        result = measure(width, args.layers, args.steps, args.compile, args.top)
        results[width] = result
        print(f"\nd={width}, K={args.layers}, B=8 T=64, per block per step (medians of {args.steps} interleaved steps)")
        print(f"{'method':<22} {'step ms':>8} {'ms/block':>9} {'over plain':>11} {'over ckpt':>10} {'x ckpt':>7} "
              f"{'aten ops fwd':>13} {'aten ops bwd':>13}")
        for r in result["rows"]:
            print(f"{r['method']:<22} {r['step_ms']:>8.1f} {r['per_block_ms']:>9.3f} {r['over_plain_ms']:>+11.3f} "
                  f"{r['over_checkpoint_ms']:>+10.3f} {r['vs_checkpoint']:>7.2f} {r['forward_ops_per_block']:>13.1f} "
                  f"{r['backward_ops_per_block']:>13.1f}")
        print(f"where bdia_fx's host time goes (cProfile, own time per block per step, top {args.top}):")
        for r in result["bdia_profile"]:
            print(f"  {r['own_us']:>8.1f} µs {r['calls']:>6.1f} calls  {r['function'][:110]}")
    if args.json:
        write_json({"layers": args.layers, "steps": args.steps, "widths": results}, args.json)


if __name__ == "__main__":
    main()
