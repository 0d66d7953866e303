"""torch.compile of a converted model against plain and checkpointed models, eager and compiled.

One training step (forward, loss, backward) of HF GPT-2 and Llama from small configs: plain, HF
gradient checkpointing (``torch.utils.checkpoint`` per block, non-reentrant) and converted, each eager
and under ``torch.compile``. Times are medians of per-round ratios to the compiled checkpointing step
(all methods of one model interleaved round robin in one process, compilation in the warm-up).
"saved MiB" is what autograd saved for backward in one step (saved-tensor hooks; the chain's own state
included), measured after the timing. "breaks" is dynamo's graph-break count for one compiled step; a
chain that cannot be traced runs eagerly behind one boundary (e.g. a chain with dropout in training).

    python benchmarks/compile.py [--families gpt2,llama] [--layers 6,12] [--width 256] [--seq 128] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import bdia_fx
from bdia_fx.memory import saved_activation_bytes
from bdia_fx.report import write_json

METHODS = ("plain eager", "plain compiled", "checkpoint eager", "checkpoint compiled", "bdia eager",
           "bdia compiled")
REFERENCE = "checkpoint compiled"


def build(family: str, layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64), vocab_size=512,
                            n_positions=512, bos_token_id=0, eos_token_id=0, use_cache=False,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(config)
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=width, intermediate_size=4 * width,
                         num_attention_heads=max(1, width // 64), num_key_value_heads=max(1, width // 64),
                         vocab_size=512, max_position_embeddings=512, use_cache=False)
    return LlamaForCausalLM(config)


def models_of(family: str, layers: int, width: int, ids: torch.Tensor, backend: str) -> dict[str, nn.Module]:
    plain, checkpointed = build(family, layers, width).train(), build(family, layers, width).train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    converted = bdia_fx.convert(build(family, layers, width), (ids,), {"use_cache": False}).train()
    return {"plain eager": plain, "plain compiled": torch.compile(plain, backend=backend),
            "checkpoint eager": checkpointed, "checkpoint compiled": torch.compile(checkpointed, backend=backend),
            "bdia eager": converted, "bdia compiled": torch.compile(converted, backend=backend)}


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, labels=ids, use_cache=False).loss


def step(model: nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    loss_of(model, ids).backward()
    return time.perf_counter() - start


def paired_median(times: list[float], reference: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(times, reference))


def measure(family: str, layers: int, args: argparse.Namespace, ids: torch.Tensor,
            progress: Callable[[str], None]) -> list[dict]:
    torch._dynamo.reset()
    models = models_of(family, layers, args.width, ids, args.backend)
    breaks = {}
    for name, model in models.items():  # warm-up: captures and compiles
        progress(f"{family} K={layers}: warming up {name}")
        counters.clear()
        for _ in range(2):
            step(model, ids)
            model.zero_grad(set_to_none=False)
        breaks[name] = sum(counters["graph_break"].values()) // 2 if "compiled" in name else 0
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(args.steps):
        for name in METHODS:
            times[name].append(step(models[name], ids))
            models[name].zero_grad(set_to_none=False)
    rows = []
    for name in METHODS:
        saved = saved_activation_bytes(models[name], lambda m=models[name]: loss_of(m, ids))
        rows.append({"family": family, "layers": layers, "method": name,
                     "ms": 1000 * statistics.median(times[name]),
                     "vs_checkpoint_compiled": paired_median(times[name], times[REFERENCE]),
                     "vs_plain_compiled": paired_median(times[name], times["plain compiled"]),
                     "saved_bytes": saved, "graph_breaks": breaks[name]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="gpt2,llama")
    parser.add_argument("--layers", default="6,12", help="comma-separated depths")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no code generation)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    torch.set_num_threads(2)
    hf_logging.set_verbosity_error()
    ids = torch.randint(0, 512, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    rows = []
    print(f"batch {args.batch} x {args.seq} tokens, d={args.width}, {args.steps} steps, backend {args.backend}, "
          f"{torch.get_num_threads()} threads; ratios: medians of per-round ratios")
    print(f"{'model':<10} {'method':<20} {'ms/step':>8} {'x ckpt compiled':>16} {'x plain compiled':>17} "
          f"{'saved MiB':>10} {'breaks':>7}")
    for family in args.families.split(","):
        for layers in (int(k) for k in args.layers.split(",")):
            for row in measure(family, layers, args, ids, lambda text: print(f"  ... {text}", flush=True)):
                rows.append(row)
                print(f"{family + ' K=' + str(layers):<10} {row['method']:<20} {row['ms']:>8.1f} "
                      f"{row['vs_checkpoint_compiled']:>16.2f} {row['vs_plain_compiled']:>17.2f} "
                      f"{row['saved_bytes'] / 2**20:>10.2f} {row['graph_breaks']:>7}", flush=True)
    if args.json:
        write_json({"config": vars(args), "rows": rows}, args.json)


if __name__ == "__main__":
    main()
