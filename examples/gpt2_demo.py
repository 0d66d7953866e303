"""Demo: convert a small HF GPT-2 (built from a config), train a few steps, compare memory.

    python examples/gpt2_demo.py [--layers 8] [--steps 5]
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging

import bdia_fx
from bdia_fx.memory import saved_activation_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=128, n_head=4, vocab_size=256, n_positions=args.seq,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    text = torch.randint(0, 256, (64, args.seq))
    example = text[: args.batch]

    print(bdia_fx.find_chains(model, (example,), {"labels": example, "use_cache": False}))
    converted = bdia_fx.convert(model, (example,), {"labels": example, "use_cache": False})
    converted.train()
    optimizer = torch.optim.AdamW(converted.parameters(), lr=3e-4)
    print(f"\ntraining {args.steps} steps of BDIA-GPT-2 ({args.layers} blocks, batch {args.batch}x{args.seq})")
    for step in range(args.steps):
        ids = text[torch.randint(0, len(text), (args.batch,))]
        loss = converted(ids, labels=ids, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"  step {step}: loss {loss.item():.4f}")

    model.train()
    plain = saved_activation_bytes(model, lambda: model(example, labels=example, use_cache=False).loss)
    bdia = saved_activation_bytes(converted, lambda: converted(example, labels=example, use_cache=False).loss)
    print(f"\nactivation memory kept for backward (one step, batch {args.batch}x{args.seq}):")
    print(f"  plain autograd : {plain / 2**20:8.2f} MiB")
    print(f"  bdia_fx        : {bdia / 2**20:8.2f} MiB  ({plain / max(bdia, 1):.1f}x less)")
    converted.eval()
    model.eval()
    with torch.no_grad():
        diff = (converted(example).logits - model(example).logits).abs().max().item()
    print(f"eval (γ = 0, quantized stream) vs original model: max |Δlogit| = {diff:.2e}")


if __name__ == "__main__":
    main()
