"""Float vs piecewise-affine multiplication (PAM, ``bdia_fx.pam``) on the digits ViT and the character GPT.

Four variants per model, trained from the same initial weights on the same batches (paired seeds,
as examples/vit_digits.py and examples/char_lm.py pair plain and BDIA): ``float``; ``pam-matmuls``
(``ops=("linear", "matmul", "attention")``); ``pam-all`` (every multiplication the pass supports, also
elementwise ``*`` and ``/``, the default of ``bdia_fx.pam``); ``pam-nonlinear`` (that and the
piecewise-affine softmax, layer norm, GELU, tanh: ``"nonlinear"`` in ops). Prints, per model and
variant, the final validation metric (mean ± std over seeds), its paired difference from float with a
95 % t-interval, the median wall time of a training step relative to float on this CPU, and the
scalar multiplications per training step that PAM replaces (3 × those of the forward: the approximate
backward makes two PAM products per forward product; an upper bound where an operand needs no
gradient; a nonlinear node counts one per output element). Writes a JSON and a plot.

    python benchmarks/pam.py [--json results/pam.json] [--plot docs/pam.png]   # 3 seeds: 813 s (docs/pam.md)
    python benchmarks/pam.py --quick                                            # 2 seeds, short runs
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import bdia_fx
from bdia_fx.report import write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from char_lm import batches, build_gpt, encode, load_text, validation_loss  # noqa: E402
from vit_digits import accuracy, build_vit, load_digits_split  # noqa: E402

from paired import PairedDifference  # noqa: E402

VARIANTS = {"float": None, "pam-matmuls": ("linear", "matmul", "attention"),
            "pam-all": ("linear", "matmul", "attention", "mul", "div"),
            "pam-nonlinear": ("linear", "matmul", "attention", "mul", "div", "nonlinear")}


def variant(name: str, initial: nn.Module, args: tuple, kwargs: dict | None = None) -> nn.Module:
    model = copy.deepcopy(initial)
    ops = VARIANTS[name]
    return model if ops is None else bdia_fx.pam.convert(model, args, kwargs, ops=ops)


def step_products(model: nn.Module) -> int:
    """Scalar multiplications PAM replaces in one training step (see the module docstring)."""
    report = bdia_fx.pam.report_of(model) if "_bdia_pam_state" in model.__dict__ else None
    return 0 if report is None else 3 * report.forward_products()


def train_vit(seed: int, args: argparse.Namespace, data: tuple) -> dict:
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(seed)
    initial = build_vit(args.vit_layers, args.vit_width)
    order = torch.Generator().manual_seed(seed)
    epochs = [torch.randperm(len(y_train), generator=order).split(args.vit_batch) for _ in range(args.vit_epochs)]
    run = {}
    for name in VARIANTS:
        model = variant(name, initial, (x_train[: args.vit_batch],))
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.vit_lr, weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=sum(len(e) for e in epochs))
        torch.manual_seed(seed + 1000)
        curve, seconds = [], []
        for batches_of_epoch in epochs:
            model.train()
            for index in batches_of_epoch:
                start = time.perf_counter()
                loss = nn.functional.cross_entropy(model(pixel_values=x_train[index]).logits, y_train[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seconds.append(time.perf_counter() - start)
                schedule.step()
            curve.append(100 * accuracy(model, x_val, y_val))
        run[name] = {"curve": curve, "step_seconds": statistics.median(seconds), "products": step_products(model)}
        print(f"  vit seed {seed} {name}: accuracy {curve[-1]:.1f} %, step {1000 * run[name]['step_seconds']:.1f} ms",
              flush=True)
    return run


def train_char_lm(seed: int, args: argparse.Namespace, train: torch.Tensor, val_batches: list, vocab: int) -> dict:
    torch.manual_seed(seed)
    initial = build_gpt(vocab, args.lm_layers, args.lm_width, args.lm_context)
    train_batches = batches(train, args.lm_steps, args.lm_batch, args.lm_context, torch.Generator().manual_seed(seed))
    run = {}
    for name in VARIANTS:
        model = variant(name, initial, (train_batches[0],), {"labels": train_batches[0], "use_cache": False})
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lm_lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lm_lr, total_steps=args.lm_steps, pct_start=0.1)
        torch.manual_seed(seed + 1000)
        curve, seconds = [], []
        for step, ids in enumerate(train_batches, 1):
            model.train()
            start = time.perf_counter()
            loss = model(ids, labels=ids, use_cache=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seconds.append(time.perf_counter() - start)
            schedule.step()
            if step % args.lm_eval_every == 0 or step == args.lm_steps:
                curve.append(validation_loss(model, val_batches))
        run[name] = {"curve": curve, "step_seconds": statistics.median(seconds), "products": step_products(model)}
        print(f"  char-lm seed {seed} {name}: val loss {curve[-1]:.3f}, step {1000 * run[name]['step_seconds']:.1f} ms",
              flush=True)
    return run


def summarise(model: str, metric: str, unit: str, runs: list[dict]) -> list[dict]:
    """One row per variant: final metric, paired difference from float with its 95 % interval, time, products."""
    rows = []
    base = [r["float"]["curve"][-1] for r in runs]
    float_seconds = statistics.median(r["float"]["step_seconds"] for r in runs)
    for name in VARIANTS:
        values = [r[name]["curve"][-1] for r in runs]
        paired = PairedDifference(metric, base, values)
        low, high = paired.interval95()
        seconds = statistics.median(r[name]["step_seconds"] for r in runs)
        rows.append({"model": model, "variant": name, "metric": metric, "unit": unit, "values": values,
                     "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "difference": statistics.fmean(paired.differences), "ci95": [low, high],
                     "step_ms": 1000 * seconds, "time_vs_float": seconds / float_seconds,
                     "pam_products_per_step": runs[0][name]["products"]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | variant | validation (mean ± std) | paired Δ vs float [95 % CI] | step ms | × float | "
             "PAM products / step |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = ("—" if r["variant"] == "float" else
                 f"{r['difference']:+.2f} [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]")
        lines.append(f"| {r['model']} | {r['variant']} | {r['mean']:.2f} ± {r['std']:.2f} {r['unit']} | {delta} | "
                     f"{r['step_ms']:.1f} | {r['time_vs_float']:.1f} | {r['pam_products_per_step']:,} |")
    return "\n".join(lines)


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"float": "#457b9d", "pam-matmuls": "#e76f51", "pam-all": "#2a9d8f", "pam-nonlinear": "#8d6cab"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (title, (xlabel, ylabel, every, by_variant)) in zip(axes, curves.items()):
        for name, runs in by_variant.items():
            values = torch.tensor(runs, dtype=torch.float64)
            x = every * torch.arange(1, values.shape[1] + 1)
            mean, std = values.mean(0), values.std(0) if len(runs) > 1 else torch.zeros(values.shape[1])
            ax.plot(x, mean, color=colours[name], label=f"{name} (mean of {len(runs)})")
            ax.fill_between(x, mean - std, mean + std, color=colours[name], alpha=0.2)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 2 ViT epochs, 30 char-LM steps")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--vit-layers", type=int, default=4)
    parser.add_argument("--vit-width", type=int, default=32)
    parser.add_argument("--vit-batch", type=int, default=64)
    parser.add_argument("--vit-epochs", type=int, default=8)
    parser.add_argument("--vit-lr", type=float, default=2e-3)
    parser.add_argument("--lm-layers", type=int, default=2)
    parser.add_argument("--lm-width", type=int, default=32)
    parser.add_argument("--lm-context", type=int, default=32)
    parser.add_argument("--lm-batch", type=int, default=8)
    parser.add_argument("--lm-steps", type=int, default=150)
    parser.add_argument("--lm-eval-every", type=int, default=50)
    parser.add_argument("--lm-lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("results/pam/pam.json"))
    parser.add_argument("--plot", type=Path, default=Path("results/pam/pam.png"))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.vit_epochs, args.lm_steps, args.lm_eval_every = 2, 2, 30, 15
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.perf_counter()

    data = load_digits_split()
    vit_runs = [train_vit(seed, args, data) for seed in range(args.seeds)]
    text, chars = load_text()
    encoded = encode(text, chars)
    split = int(0.9 * len(encoded))
    val_batches = batches(encoded[split:], 8, args.lm_batch, args.lm_context, torch.Generator().manual_seed(12345))
    lm_runs = [train_char_lm(seed, args, encoded[:split], val_batches, len(chars)) for seed in range(args.seeds)]

    rows = (summarise(f"digits ViT ({args.vit_layers}×{args.vit_width})", "validation accuracy", "%", vit_runs)
            + summarise(f"char GPT ({args.lm_layers}×{args.lm_width})", "validation loss", "nats/char", lm_runs))
    print()
    print(table(rows))
    print(f"\n{args.seeds} paired seeds, {args.threads} thread(s), {time.perf_counter() - started:.0f} s in all")
    curves = {"digits ViT": ("epoch", "validation accuracy (%)", 1,
                             {n: [r[n]["curve"] for r in vit_runs] for n in VARIANTS}),
              "character GPT": ("step", "validation loss (nats/char)", args.lm_eval_every,
                                {n: [r[n]["curve"] for r in lm_runs] for n in VARIANTS})}
    plot(curves, args.plot)
    write_json({"args": vars(args), "rows": rows, "curves": {k: v[3] for k, v in curves.items()}}, args.json)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
