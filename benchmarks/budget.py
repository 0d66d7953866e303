"""The memory planner's (peak, time) points against the plans users have: checkpointing every n-th block or the
first m blocks (``torch.utils.checkpoint``, non-reentrant), torch.compile's ``activation_memory_budget``, and
every block reversible (bdia_fx without a budget); the plain model beside them.

For each model the budgets run from the smallest peak a plan reaches to the plain model's peak (evenly spaced).
Peaks are those of ``bdia_fx.peak`` (the most bytes allocated during a step above the parameters, their gradient
buffers and the inputs, from torch's profiler: byte-exact and repeatable on the same inputs), measured for each
method on the same inputs; the planner's "estimate" is its frontier point for the plan it chose. Step times are
medians over rounds in which every method of the model runs once (round robin, in one process), and "vs plain"
the median of the per-round ratios. "fastest fitting" is, for each budget, the fastest other method whose peak
fits in it, and "planner / it" the planner's time over that one's (≤ 1: the planner is at least as fast).

    python benchmarks/budget.py [--families gpt2,llama,encoder] [--layers 12 24] [--width 128] [--seq 64]
        [--budgets 8] [--steps 5] [--compile-budgets 0,0.5,1] [--backend inductor] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import bdia_fx
from bdia_fx.budget import format_bytes
from bdia_fx.memory import checkpoint_blocks, default_loss
from bdia_fx.peak import measure_step, preserved_training_state
from bdia_fx.report import write_json

sys.path.insert(0, str(Path(__file__).parent))
from compile import build as build_hf  # noqa: E402  (the same GPT-2 and Llama configs)


def build(family: str, layers: int, width: int, batch: int, seq: int) -> tuple[nn.Module, tuple, dict]:
    """The model in training mode and its example call (HF models take labels: their step's loss is theirs)."""
    torch.manual_seed(0)
    if family == "encoder":  # pre-LN blocks as nanoGPT's, in torch.nn
        layer = nn.TransformerEncoderLayer(width, max(1, width // 64), 4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        return model.train(), (torch.randn(batch, seq, width),), {}
    ids = torch.randint(0, 512, (batch, seq))
    return build_hf(family, layers, width).train(), (ids,), {"labels": ids, "use_cache": False}


def loss_of(model: nn.Module, args: tuple, kwargs: dict) -> Callable[[], torch.Tensor]:
    return lambda: default_loss(model(*args, **kwargs))


def baselines(model: nn.Module, args: tuple, kwargs: dict, layers: int, compile_budgets: list[float],
              backend: str) -> dict[str, nn.Module]:
    """The plain model, checkpointing plans, compile's budgets and all-reversible bdia_fx, by name."""
    report = bdia_fx.find_chains(model, args, kwargs)
    paths = [p for chain in report.chains for p in chain.block_paths]
    methods: dict[str, nn.Module] = {"plain": model}
    for n in sorted({1, 2, 3, 4, max(1, layers // 4)}):
        methods[f"checkpoint every {n}"] = checkpoint_blocks(model, report, only=set(paths[n - 1::n]))
    for m in sorted({layers // 4, layers // 2, 3 * layers // 4} - {0}):
        methods[f"checkpoint first {m}"] = checkpoint_blocks(model, report, only=set(paths[:m]))
    for fraction in compile_budgets:
        methods[f"compile budget {fraction:g}"] = _compiled_with_budget(model, fraction, backend)
    methods["bdia all reversible"] = bdia_fx.convert(model, args, kwargs)
    return methods


def _compiled_with_budget(model: nn.Module, fraction: float, backend: str) -> nn.Module:
    """``torch.compile`` of the model with its backward graph partitioned under ``activation_memory_budget``: a
    backend of its own per setting (dynamo keeps one compiled graph per backend, and graphs of one module
    structure are otherwise shared), which partitions under the setting with no compile cache (whose key
    leaves the setting out)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._dynamo.backends.registry import lookup_backend

    compiler = lookup_backend(backend)

    def budgeted(graph, example_inputs):
        with functorch_config.patch(activation_memory_budget=fraction, enable_autograd_cache=False), \
                inductor_config.patch(fx_graph_cache=False):
            return compiler(graph, example_inputs)

    return torch.compile(model, backend=budgeted)


def measure(family: str, layers: int, args: argparse.Namespace) -> dict:
    model, call_args, kwargs = build(family, layers, args.width, args.batch, args.seq)
    full = bdia_fx.report_of(bdia_fx.convert(model, call_args, kwargs, memory_budget=1.0)).memory_plan
    low, high = full.smallest_peak, full.plain_peak
    budgets = [low + (high - low) * i // (args.budgets - 1) for i in range(args.budgets)]
    methods = baselines(model, call_args, kwargs, layers, args.compile_budgets, args.backend)
    plans = {}
    for b in budgets:
        converted = bdia_fx.convert(model, call_args, kwargs, memory_budget=b)
        plans[f"planner {format_bytes(b)}"] = (b, bdia_fx.report_of(converted).memory_plan)
        methods[f"planner {format_bytes(b)}"] = converted
    peaks = {}
    for name, net in methods.items():
        with preserved_training_state(model):
            net.train()
            loss_of(net, call_args, kwargs)().backward()  # warm-up (compiles, captures)
            peaks[name] = measure_step(net, loss_of(net, call_args, kwargs), torch.device("cpu")).peak
    times: dict[str, list[float]] = {name: [] for name in methods}
    with preserved_training_state(model):
        for _ in range(args.steps):
            for name, net in methods.items():
                start = time.perf_counter()
                loss_of(net, call_args, kwargs)().backward()
                times[name].append(time.perf_counter() - start)
    rows = []
    for name in methods:
        ratios = [t / p for t, p in zip(times[name], times["plain"])]
        row = {"family": family, "layers": layers, "method": name, "peak": peaks[name],
               "ms": 1e3 * statistics.median(times[name]), "vs_plain": statistics.median(ratios)}
        if name in plans:
            b, plan = plans[name]
            row.update(budget=b, kept=plan.kept, estimate=plan.estimated_peak, planned_peak=plan.peak)
        rows.append(row)
    _compare(rows)
    return {"family": family, "layers": layers, "rows": rows, "smallest_peak": low, "plain_peak": high}


def _compare(rows: list[dict]) -> None:
    """Each planner row: the fastest other method whose peak fits in its budget, and the time ratio to it."""
    others = [r for r in rows if "budget" not in r]
    for row in rows:
        if "budget" in row:
            fitting = [r for r in others if r["peak"] <= row["budget"]]
            best = min(fitting, key=lambda r: r["vs_plain"], default=None)
            row["fastest_fitting"] = best["method"] if best else None
            row["vs_fastest_fitting"] = row["vs_plain"] / best["vs_plain"] if best else None


def print_table(result: dict) -> None:
    print(f"\n{result['family']}, {result['layers']} blocks: smallest planned peak "
          f"{format_bytes(result['smallest_peak'])}, plain {format_bytes(result['plain_peak'])}")
    print(f"{'method':24}{'peak':>11}{'ms':>9}{'vs plain':>10}{'budget':>11}{'estimate':>11}{'kept':>6}"
          f"  {'fastest fitting':24}{'planner / it':>13}")
    for r in result["rows"]:
        planner = "budget" in r
        print(f"{r['method']:24}{format_bytes(r['peak']):>11}{r['ms']:9.1f}{r['vs_plain']:10.3f}"
              + (f"{format_bytes(r['budget']):>11}{format_bytes(r['estimate']):>11}{r['kept']:6d}  "
                 f"{(r['fastest_fitting'] or 'none fits'):24}"
                 + (f"{r['vs_fastest_fitting']:13.3f}" if r["vs_fastest_fitting"] else f"{'-':>13}")
                 if planner else ""))


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5), squeeze=False)
    for ax, result in zip(axes[0], results):
        groups = {"planner": [], "checkpoint every n": [], "checkpoint first m": [], "compile budget": []}
        for r in result["rows"]:
            for prefix in ("planner", "checkpoint every", "checkpoint first", "compile budget"):
                if r["method"].startswith(prefix):
                    key = next(k for k in groups if k.startswith(prefix))
                    groups[key].append((r["peak"] / 2**20, r["vs_plain"]))
        for (name, points), style in zip(groups.items(), ("o-", "s", "^", "D")):
            if points:
                points.sort()
                ax.plot(*zip(*points), style, label=name)
        for r in result["rows"]:
            if r["method"] in ("plain", "bdia all reversible"):
                ax.plot(r["peak"] / 2**20, r["vs_plain"], "*" if r["method"] == "plain" else "X", markersize=11,
                        label=r["method"])
        ax.set(title=f"{result['family']}, {result['layers']} blocks", xlabel="peak above parameters (MiB)",
               ylabel="step time / plain")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="gpt2,llama,encoder")
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--budgets", type=int, default=8, help="planner budgets from the smallest peak to the plain")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds")
    parser.add_argument("--compile-budgets", default="0,0.5,1",
                        type=lambda text: [float(v) for v in text.split(",") if v],
                        help="torch.compile activation_memory_budget settings ('' for none)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="write the (peak, time) points as a PNG here")
    args = parser.parse_args(argv)
    if args.budgets < 2:
        parser.error("--budgets must be at least 2 (the smallest peak and the plain peak)")
    results = []
    for family in args.families.split(","):
        for layers in args.layers:
            results.append(measure(family, layers, args))
            print_table(results[-1])
    if args.json:
        write_json(results, args.json)
    if args.plot:
        plot(results, args.plot)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
