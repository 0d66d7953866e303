"""torch.compile of a converted model: step time against eager, graph breaks, and γ against eager.

One training step (forward, loss, backward) of an HF GPT-2 from a small config, plain and
converted, each eager and under ``torch.compile``; times are medians of N steps after warm-up
(compilation included in the warm-up), all four interleaved in one process, as ratios to eager
plain. Graph breaks are dynamo's count for one compiled step; "same γ" checks that the compiled
converted model gives eager's loss for the same seed (the chain runs eagerly behind a boundary; the
loss is compared within 1e-5 relative, since inductor's fused head rounds differently, as for plain).

    python benchmarks/compile.py [--layers 6] [--width 256] [--steps 10] [--backend inductor] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import bdia_fx
from bdia_fx.report import write_json

METHODS = ("plain eager", "plain compiled", "bdia eager", "bdia compiled")


def build(layers: int, width: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=512, n_positions=128,
                                      bos_token_id=0, eos_token_id=0, use_cache=False))


def step(model: torch.nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no code generation)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    hf_logging.set_verbosity_error()
    ids = torch.randint(0, 512, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    plain = build(args.layers, args.width).train()
    converted = bdia_fx.convert(build(args.layers, args.width), (ids,)).train()
    models = {"plain eager": plain, "plain compiled": torch.compile(plain, backend=args.backend),
              "bdia eager": converted, "bdia compiled": torch.compile(converted, backend=args.backend)}
    breaks = {}
    for name, model in models.items():  # warm-up: compiles
        counters.clear()
        for _ in range(2):
            step(model, ids)
            model.zero_grad(set_to_none=False)
        breaks[name] = sum(counters["graph_break"].values()) // 2 if "compiled" in name else 0
    losses = {}
    for name in ("bdia eager", "bdia compiled"):
        torch.manual_seed(7)
        losses[name] = float(models[name](ids, labels=ids).loss.detach())
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(args.steps):
        for name in METHODS:
            times[name].append(step(models[name], ids))
            models[name].zero_grad(set_to_none=False)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"GPT-2 K={args.layers} d={args.width}, batch {args.batch} x {args.seq} tokens, {args.steps} steps, "
          f"{torch.get_num_threads()} threads")
    print(f"{'method':<16} {'ms/step':>8} {'x plain eager':>14} {'graph breaks':>13}")
    rows = []
    for name in METHODS:
        row = {"method": name, "ms": 1000 * median[name], "vs_plain_eager": median[name] / median["plain eager"],
               "graph_breaks": breaks[name]}
        rows.append(row)
        print(f"{name:<16} {row['ms']:>8.1f} {row['vs_plain_eager']:>14.2f} {row['graph_breaks']:>13}")
    # inductor fuses the head's ops, which moves the loss by float roundings (plain models too); another
    # γ draw would move it by far more than this tolerance
    same = abs(losses["bdia eager"] - losses["bdia compiled"]) <= 1e-5 * abs(losses["bdia eager"])
    print(f"bdia compiled / eager: {median['bdia compiled'] / median['bdia eager']:.2f}; same γ as eager for the "
          f"same seed: {'yes' if same else 'NO'} (loss {losses['bdia compiled']:.7f} vs {losses['bdia eager']:.7f}, "
          "equal within 1e-5 relative)")
    if args.json:
        write_json({"config": vars(args), "rows": rows, "same_gamma": same}, args.json)


if __name__ == "__main__":
    main()
