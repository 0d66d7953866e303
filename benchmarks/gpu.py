"""GPU benchmark: plain vs per-block torch.utils.checkpoint vs bdia_fx on a GPT-2-style model.

bf16 autocast, fp32 weights, AdamW; for each depth K: the peak memory of one training step over
the memory of parameters, gradients and optimizer state (``torch.cuda.max_memory_allocated``),
the step time (CUDA events, median of N steps after 3 warm-ups, the methods interleaved), and the
largest batch that fits a memory budget with its tokens/s — the throughput argument for
reversible training. Prints a table (the device named) and writes JSON.

    python benchmarks/gpu.py [--layers 12 24 48] [--width 1024] [--seq 1024] [--budget-gib 40] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import statistics

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import bdia_fx
from bdia_fx.memory import checkpoint_blocks
from bdia_fx.report import write_json

METHODS = ("plain", "checkpoint", "bdia")
GIB = 2**30


def build(method: str, layers: int, width: int, seq: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=width // 64, n_positions=seq, vocab_size=50257,
                        use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).cuda().train()
    ids = torch.randint(0, 50257, (1, seq), device="cuda")
    if method == "checkpoint":
        model = checkpoint_blocks(model, bdia_fx.find_chains(model, (ids,)))
    elif method == "bdia":
        model = bdia_fx.convert(model, (ids,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)


def peak_over_state(model, optimizer, batch: int, seq: int) -> int:
    """Peak bytes of one step beyond parameters, gradients and optimizer state (all allocated)."""
    ids = torch.randint(0, 50257, (batch, seq), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(model, optimizer, ids)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def fits(model, optimizer, batch: int, seq: int, budget: int) -> int | None:
    """The step's total peak at this batch if within ``budget`` (bytes), else None (also on OOM)."""
    try:
        total = peak_over_state(model, optimizer, batch, seq) + torch.cuda.memory_allocated()
    except torch.OutOfMemoryError:
        total = None
    gc.collect()
    torch.cuda.empty_cache()
    return total if total is not None and total <= budget else None


def largest_batch(model, optimizer, seq: int, budget: int) -> int:
    """The largest batch whose step stays within ``budget``: doubling, then bisection."""
    low, high = 0, 1
    while fits(model, optimizer, high, seq, budget) is not None:
        low, high = high, high * 2
        if high > 4096:
            return low
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(model, optimizer, middle, seq, budget) is not None else (low, middle)
    return low


def step_seconds(models: dict, batch: int, seq: int, steps: int) -> dict[str, float]:
    ids = torch.randint(0, 50257, (batch, seq), device="cuda")
    for model, optimizer in models.values():
        for _ in range(3):
            step(model, optimizer, ids)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(steps):
        for name, (model, optimizer) in models.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(model, optimizer, ids)
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24, 48])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4, help="batch of the peak and step-time columns")
    parser.add_argument("--budget-gib", type=float, default=40.0, help="memory budget of the largest-batch column")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device; on CPU run benchmarks/memory.py")
    hf_logging.set_verbosity_error()
    device = torch.cuda.get_device_name()
    print(f"{device}; GPT-2-style d={args.width}, T={args.seq}, bf16 autocast, fp32 AdamW; peak and time at batch "
          f"{args.batch}; largest batch within {args.budget_gib:g} GiB")
    print(f"{'K':>3} {'method':<11} {'peak GiB':>9} {'x plain':>8} {'step s':>8} {'x plain':>8} {'x ckpt':>7} "
          f"{'max batch':>10} {'tokens/s':>10}")
    rows = []
    for layers in args.layers:
        models = {m: build(m, layers, args.width, args.seq) for m in METHODS}
        for model, optimizer in models.values():  # gradients and optimizer state allocated, as in training
            step(model, optimizer, torch.randint(0, 50257, (1, args.seq), device="cuda"))
        peaks = {m: peak_over_state(*models[m], args.batch, args.seq) for m in METHODS}
        seconds = step_seconds(models, args.batch, args.seq, args.steps)
        for m in METHODS:
            batch = largest_batch(*models[m], args.seq, int(args.budget_gib * GIB))
            throughput = batch * args.seq / step_seconds({m: models[m]}, batch, args.seq, 3)[m] if batch else 0.0
            row = {"K": layers, "method": m, "peak_bytes": peaks[m], "peak_vs_plain": peaks[m] / peaks["plain"],
                   "step_s": seconds[m], "time_vs_plain": seconds[m] / seconds["plain"],
                   "time_vs_checkpoint": seconds[m] / seconds["checkpoint"], "max_batch": batch,
                   "tokens_per_s": throughput, "device": device}
            rows.append(row)
            print(f"{layers:>3} {m:<11} {peaks[m] / GIB:>9.2f} {row['peak_vs_plain']:>8.2f} {seconds[m]:>8.3f} "
                  f"{row['time_vs_plain']:>8.2f} {row['time_vs_checkpoint']:>7.2f} {batch:>10} {throughput:>10.0f}",
                  flush=True)
        del models
        gc.collect()
        torch.cuda.empty_cache()
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    main()
