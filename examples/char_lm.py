"""A GPT character language model on real English text: plain training vs bdia_fx, paired seeds.

The text is the Python reference-manual topics shipped with the standard library
(``pydoc_data.topics``, about 0.5 MB, no download). Per seed both variants start from the same
weights and see the same batches; the script prints validation loss (mean ± std and the paired
difference with a 95 % interval), writes the loss curves (PNG) and a JSON, and samples a few
lines from the reverted BDIA model (the ordinary GPT-2 class, generating with its KV cache).

    python examples/char_lm.py            # 3 seeds x 300 steps, about 5 minutes on 2 CPU cores
    python examples/char_lm.py --quick    # smoke test: 2 seeds x 20 steps
"""

from __future__ import annotations

import argparse
import math
import statistics
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import bdia_fx
from bdia_fx.report import write_json

from paired import VARIANTS, PairedDifference, make_variant, plot_curves, train_variants


def load_text() -> tuple[str, list[str]]:
    """The reference-manual text and its sorted character set."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return text, sorted(set(text))


def encode(text: str, chars: list[str]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long)


def build_gpt(vocab: int, layers: int, width: int, context: int, dropout: float = 0.1) -> nn.Module:
    """A GPT-2 character model, ``dropout`` on the residual branches and embeddings (none on attention)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=width, n_layer=layers, n_head=4,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                        pad_token_id=0)  # no end-of-text token: samples run their full length
    return GPT2LMHeadModel(config)


def batches(data: torch.Tensor, count: int, batch: int, context: int, generator: torch.Generator) -> list[torch.Tensor]:
    starts = torch.randint(0, len(data) - context, (count, batch), generator=generator)
    return [torch.stack([data[s: s + context] for s in row.tolist()]) for row in starts]


@torch.no_grad()
def validation_loss(model: nn.Module, val_batches: list[torch.Tensor]) -> float:
    model.eval()
    return statistics.fmean(float(model(ids, labels=ids, use_cache=False).loss) for ids in val_batches)


def one_cycle(lr: float, weight_decay: float):
    """An optimizer factory for :func:`paired.train_variants`: AdamW with a one-cycle schedule."""

    def make(model: nn.Module, total_steps: int) -> tuple:
        if total_steps < 20:  # OneCycleLR divides by zero when the 10 % warm-up is under 2 steps
            raise ValueError(f"the one-cycle schedule needs at least 20 training steps, got {total_steps}")
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=total_steps, pct_start=0.1)

    return make


def train_pair(seed: int, args: argparse.Namespace, train: torch.Tensor, val_batches: list, vocab: int,
               progress: tqdm) -> dict:
    """Train plain and BDIA from the same initial weights on the same batches; validate every
    ``args.eval_every`` steps and after the last."""
    torch.manual_seed(seed)
    initial = build_gpt(vocab, args.layers, args.width, args.context)
    train_batches = batches(train, args.steps, args.batch, args.context, torch.Generator().manual_seed(seed))
    rounds = [train_batches[i: i + args.eval_every] for i in range(0, args.steps, args.eval_every)]
    example = {"example_args": (train_batches[0],), "example_kwargs": {"labels": train_batches[0], "use_cache": False}}
    runs = train_variants(initial, {name: partial(make_variant, name, **example) for name in VARIANTS}, rounds,
                          lambda model, ids: model(ids, labels=ids, use_cache=False).loss,
                          lambda model: {"val_loss": validation_loss(model, val_batches)},
                          one_cycle(args.lr, 0.01), noise_seed=seed + 1000, progress=progress)
    return {name: {"curve": run["metrics"]["val_loss"], "model": run["model"]} for name, run in runs.items()}


def sample(model: nn.Module, chars: list[str], prompts: list[str], length: int) -> list[str]:
    index = {c: i for i, c in enumerate(chars)}
    lines = []
    for prompt in prompts:
        ids = torch.tensor([[index[c] for c in prompt]])
        torch.manual_seed(0)
        out = model.generate(ids, max_new_tokens=length, do_sample=True, top_k=10, temperature=0.8)
        lines.append("".join(chars[i] for i in out[0].tolist()))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 seeds x 20 steps")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=Path("results/char_lm"))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.eval_every = 2, 20, 10
    from transformers.utils import logging

    logging.set_verbosity_error()
    args.out.mkdir(parents=True, exist_ok=True)
    text, chars = load_text()
    data = encode(text, chars)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    val_batches = batches(val, 16, args.batch, args.context, torch.Generator().manual_seed(12345))
    print(f"text: {len(text) / 1e6:.2f} M characters ({len(chars)} distinct), last 10 % for validation; GPT "
          f"{args.layers} blocks, width {args.width}; {args.seeds} seeds x {args.steps} steps, plain vs BDIA (paired)")

    runs = []
    with tqdm(total=args.seeds * len(VARIANTS) * math.ceil(args.steps / args.eval_every),
              unit="round") as progress:
        for seed in range(args.seeds):
            runs.append(train_pair(seed, args, train, val_batches, len(chars), progress))

    final = PairedDifference("final validation loss (nats/char)", [r["plain"]["curve"][-1] for r in runs],
                             [r["bdia"]["curve"][-1] for r in runs])
    print()
    print(final.summary())
    print(f"  = {statistics.fmean(final.plain) / math.log(2):.3f} "
          f"vs {statistics.fmean(final.bdia) / math.log(2):.3f} bits/char")
    plot_curves({name: [r[name]["curve"] for r in runs] for name in VARIANTS}, "validation loss (nats/char)",
                f"character GPT ({args.layers} blocks), {args.seeds} paired seeds", args.out / "val_loss.png",
                xlabel="training step", every=args.eval_every)
    reverted = bdia_fx.revert(runs[-1]["bdia"]["model"]).eval()
    samples = sample(reverted, chars, ["The ", "A function "], 160 if not args.quick else 40)
    print("\nsamples from the reverted BDIA model:")
    for line in samples:
        print("  " + repr(line))
    write_json({"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "final_validation_loss": final.as_dict(), "samples": samples,
                "curves": {name: [r[name]["curve"] for r in runs] for name in VARIANTS}}, args.out / "results.json")
    print(f"wrote {args.out / 'val_loss.png'}, {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
