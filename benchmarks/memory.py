"""Memory and time of one training step: plain vs checkpoint per block vs bdia_fx, side by side.

Method (shared/BENCHMARKS.md): saved-for-backward bytes via saved_tensors_hooks plus the BDIA
chain state; peak RSS in a fresh process per configuration (MALLOC_MMAP_THRESHOLD_=65536, VmHWM
reset through /proc/self/clear_refs) over the baseline after warm-up steps, with the gradient
buffers allocated and zeroed in place as in a training loop (so they are not counted as peak);
step time as the median of N steps after 2 warm-ups, all methods interleaved in this one
process (round robin), and each time ratio as the median over rounds of the ratio of the two
methods' steps in the same round, with its interquartile range (paired, so that the machine's
drift cancels; the range shows what is left of the noise): ratios to plain, to checkpoint (torch's
recommended non-reentrant form, early stop on) and to checkpoint-full (early stop off: every block
recomputed whole, the recompute BDIA needs);
checkpoint-reentrant (the classic form, also a whole recompute) is measured beside them, and
bdia-no-verify (``BDIAConfig(verify=False)``) prices the default per-step checksum.

    python benchmarks/memory.py [--layers 4 8 12 24] [--width 256] [--steps 10] [--methods ...] [--json PATH]

``--width`` sets d (heads = d / 64): the fixed-point and autograd work per block grows with d, the
block's matmuls with d², so the time ratios at one width do not carry over to another.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import bdia_fx
from bdia_fx.memory import checkpoint_blocks, saved_activation_bytes
from bdia_fx.report import write_json

METHODS = ("plain", "checkpoint", "checkpoint-full", "checkpoint-reentrant", "bdia", "bdia-no-verify", "bdia-stored")
B, T, D = 8, 64, 256


def heads_of(width: int) -> int:
    """Attention heads of 64 for a width ``d`` (one head below 64); ValueError for other widths."""
    if width >= 64 and width % 64:
        raise ValueError(f"--width {width}: use a multiple of 64 (heads of 64), or a width below 64 (one head)")
    return max(1, width // 64)


def build(method: str, layers: int, width: int = D) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(width, heads_of(width), 4 * width, dropout=0.0, batch_first=True,
                                       norm_first=True)
    model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    x = torch.randn(B, T, width)
    if method.startswith("checkpoint"):  # the block forms of bdia_fx.memory.checkpoint_blocks
        model = checkpoint_blocks(model, bdia_fx.find_chains(model, (x,)), method)
    elif method.startswith("bdia"):
        mode = "stored" if method == "bdia-stored" else "reversible"
        config = bdia_fx.BDIAConfig(mode=mode, verify=method != "bdia-no-verify")
        model = bdia_fx.convert(model, (x,), config=config)
    return model.train(), x


def step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x.requires_grad_()).pow(2).mean()


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found")


def measure_memory(method: str, layers: int, width: int) -> dict:
    """Run in a fresh process: saved bytes and peak RSS delta of one step."""
    model, x = build(method, layers, width)
    for _ in range(2):
        step(model, x.detach().clone()).backward()
    model.zero_grad(set_to_none=True)
    saved = saved_activation_bytes(model, lambda: step(model, x.detach().clone()))
    step(model, x.detach().clone()).backward()  # gradient buffers exist from here on, as in a training loop
    model.zero_grad(set_to_none=False)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _vm_hwm()
    step(model, x.detach().clone()).backward()
    return {"saved_bytes": saved, "peak_bytes": _vm_hwm() - base}


def measure_times(layers: int, steps: int, methods: tuple[str, ...] = METHODS,
                  width: int = D) -> dict[str, list[float]]:
    """Each method's step times over ``steps`` rounds (after 2 warm-up rounds), round robin."""
    built = {m: build(m, layers, width) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(steps + 2):
        for method, (model, x) in built.items():
            start = time.perf_counter()
            step(model, x.detach().clone()).backward()
            if i >= 2:
                times[method].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=False)
    return times


def paired_ratio(times: list[float], reference: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios ``times[i] / reference[i]``."""
    ratios = [a / b for a, b in zip(times, reference)]
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, q1, q3


def memory_in_fresh_process(method: str, layers: int, width: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--one", method, str(layers), str(width)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 12, 24])
    parser.add_argument("--width", type=int, default=D, help="the model width d (heads = d / 64)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="a subset (plain and checkpoint are always measured: the ratios need them)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "K", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        heads = heads_of(args.width)
    except ValueError as error:
        parser.error(str(error))
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    torch.set_num_threads(2)
    if args.one:
        print(json.dumps(measure_memory(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    methods = tuple(m for m in METHODS if m in {"plain", "checkpoint", "checkpoint-full", *args.methods})
    rows = []
    print(f"one training step, B={B} T={T} d={args.width} heads={heads} MLP 4d, fp32, "
          f"{torch.get_num_threads()} threads")
    print("time ratios: median over rounds of the paired per-round ratio (interquartile range)")
    print(f"{'K':>3} {'method':<20} {'saved MiB':>10} {'peak MiB':>9} {'peak/plain':>10} {'time/plain':>16} "
          f"{'time/ckpt':>16} {'time/ckpt-full':>16}")
    for layers in args.layers:
        times = measure_times(layers, args.steps, methods, args.width)
        mem = {m: memory_in_fresh_process(m, layers, args.width) for m in methods}
        for m in methods:
            row = {"K": layers, "d": args.width, "method": m, **mem[m], "step_s": statistics.median(times[m]),
                   "peak_vs_plain": mem[m]["peak_bytes"] / mem["plain"]["peak_bytes"]}
            cells = []
            for reference in ("plain", "checkpoint", "checkpoint-full"):
                median, q1, q3 = paired_ratio(times[m], times[reference])
                key = "time_vs_" + reference.replace("-", "_")
                row[key], row[key + "_iqr"] = median, [q1, q3]
                cells.append(f"{median:.2f} ({q1:.2f}-{q3:.2f})")
            rows.append(row)
            print(f"{layers:>3} {m:<20} {row['saved_bytes'] / 2**20:>10.2f} {row['peak_bytes'] / 2**20:>9.1f} "
                  f"{row['peak_vs_plain']:>10.2f} " + " ".join(f"{c:>16}" for c in cells), flush=True)
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    main()
