"""Does BDIA train post-LN models? Paired seeds, plain vs ``BDIAConfig(residual_only=False)``.

The BDIA update x_{k+1} = Q[γx_{k-1}] + Q[(1+γ)f_k(x_k) − 2γx_k] is exactly invertible for any
block map f_k, and at γ = 0 it is the original model, so a post-LN block f_k = LN(x + h(x)) can
train reversibly with its inference graph unchanged. Whether it trains *as well* is measured here
on two tasks, each with the same initial weights and batch order for both variants per seed:

- ``encoder-digits``: a post-LN ``nn.TransformerEncoder`` classifying scikit-learn's 8x8 digits
  (each image row one token); metric: validation accuracy on a fixed 500-image split.
- ``bert-counting``: a post-LN ``BertForSequenceClassification`` on generated sequences (label:
  does token 1 occur more often than token 2); metric: validation accuracy on 500 sequences.

Prints per task the final validation accuracy (mean ± std), the paired difference bdia − plain
with its 95 % interval, the validation loss of both with the interval of its paired difference
(it still resolves differences when both reach 100 %), and the final training loss of both
(does BDIA underfit?); writes the accuracy curves (PNG) and ``--json``.

    python benchmarks/post_ln.py [--seeds 6] [--epochs 15] [--layers 6] [--json results/post_ln.json]
    python benchmarks/post_ln.py --quick     # 2 seeds, 1 epoch, 2 layers: the test's run
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import bdia_fx
from bdia_fx.report import write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from vit_digits import load_digits_split  # noqa: E402

from paired import VARIANTS, PairedDifference, plot_curves  # noqa: E402

WIDTH = 32
Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class RowEncoder(nn.Module):
    """Post-LN encoder over the 8 rows of a digit image: embed, ``layers`` blocks, mean-pool, head."""

    def __init__(self, layers: int, width: int = WIDTH):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.position = nn.Parameter(torch.randn(1, 8, width) * 0.02)
        block = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(images) + self.position).mean(1))


def digits_task() -> Task:
    x_train, y_train, x_val, y_val = load_digits_split()
    return x_train.squeeze(1), y_train, x_val.squeeze(1), y_val


def counting_task(train: int = 2000, validation: int = 500, length: int = 16, vocab: int = 8) -> Task:
    """Token sequences whose label is whether token 1 occurs more often than token 2 (ties: no)."""
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(1, vocab, (train + validation, length), generator=generator)
    labels = ((ids == 1).sum(1) > (ids == 2).sum(1)).long()
    return ids[:train], labels[:train], ids[train:], labels[train:]


def bert_classifier(layers: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=8, hidden_size=WIDTH, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * WIDTH,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0))


def logits_of(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


TASKS: dict[str, tuple[Callable[[], Task], Callable[[int], nn.Module]]] = {
    "encoder-digits": (digits_task, RowEncoder),
    "bert-counting": (counting_task, bert_classifier),
}


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Validation accuracy and cross-entropy (the loss still resolves differences at 100 %)."""
    model.eval()
    logits = logits_of(model, inputs)
    return float((logits.argmax(-1) == labels).float().mean()), float(nn.functional.cross_entropy(logits, labels))


def train_pair(task: str, seed: int, args: argparse.Namespace, data: Task, progress: tqdm) -> dict:
    """Plain and BDIA (any block map) from the same weights on the same batch order."""
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(seed)
    initial = TASKS[task][1](args.layers)
    order = torch.Generator().manual_seed(seed)
    batches = [torch.randperm(len(y_train), generator=order).split(args.batch) for _ in range(args.epochs)]
    run = {}
    for name in VARIANTS:
        model = copy.deepcopy(initial)
        if name == "bdia":
            model = bdia_fx.convert(model, (x_train[: args.batch],),
                                    config=bdia_fx.BDIAConfig(residual_only=False))
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=sum(len(b) for b in batches))
        torch.manual_seed(seed + 1000)  # dropout (and γ) streams start from the same state per seed
        curve, val_losses, losses = [], [], []
        for epoch in range(args.epochs):
            model.train()
            total = 0.0
            for index in batches[epoch]:
                loss = nn.functional.cross_entropy(logits_of(model, x_train[index]), y_train[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss) * len(index)
            losses.append(total / len(y_train))
            accuracy, val_loss = evaluate(model, x_val, y_val)
            curve.append(accuracy)
            val_losses.append(val_loss)
            progress.set_postfix(task=task, seed=seed, variant=name, acc=f"{curve[-1]:.3f}")
            progress.update()
        run[name] = {"curve": curve, "val_loss": val_losses, "train_loss": losses}
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 1 epoch, 2 layers")
    parser.add_argument("--out", type=Path, default=Path("results/post_ln"), help="folder of the plots")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.layers = 2, 1, 2
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    results = {}
    with tqdm(total=len(args.tasks) * args.seeds * len(VARIANTS) * args.epochs, desc="post-LN runs") as progress:
        for task in args.tasks:
            data = TASKS[task][0]()
            runs = [train_pair(task, seed, args, data, progress) for seed in range(args.seeds)]
            final = PairedDifference("validation accuracy", [r["plain"]["curve"][-1] for r in runs],
                                     [r["bdia"]["curve"][-1] for r in runs])
            loss = PairedDifference("validation loss", [r["plain"]["val_loss"][-1] for r in runs],
                                    [r["bdia"]["val_loss"][-1] for r in runs])
            results[task] = {"final": final, "loss": loss, "runs": runs}
            plot_curves({name: [r[name]["curve"] for r in runs] for name in VARIANTS}, "validation accuracy",
                        f"post-LN {task}: plain vs BDIA (residual_only=False), K={args.layers}",
                        args.out / f"{task}.png")
    print(f"post-LN models, K={args.layers}, {args.seeds} paired seeds x {args.epochs} epochs")
    print(f"{'task':<16} {'plain acc %':>13} {'bdia acc %':>13} {'bdia - plain':>13} {'95 % CI (pp)':>17} "
          f"{'val loss plain / bdia':>22} {'loss 95 % CI':>17} {'train loss plain / bdia':>24}")
    for task, result in results.items():
        final, runs = result["final"], result["runs"]
        low, high = final.interval95()

        def mean_std(values: list[float]) -> str:
            tensor = torch.tensor(values) * 100
            return f"{tensor.mean():.1f} ± {tensor.std() if len(values) > 1 else 0:.1f}"

        loss = {name: sum(r[name]["train_loss"][-1] for r in runs) / len(runs) for name in VARIANTS}
        val = result["loss"]
        loss_low, loss_high = val.interval95()
        difference = 100 * sum(final.differences) / len(final.differences)
        print(f"{task:<16} {mean_std(final.plain):>13} {mean_std(final.bdia):>13} {difference:>+12.1f}  "
              f"{f'[{100 * low:+.1f}, {100 * high:+.1f}]':>17} "
              f"{sum(val.plain) / len(val.plain):>10.3f} / {sum(val.bdia) / len(val.bdia):<9.3f} "
              f"{f'[{loss_low:+.3f}, {loss_high:+.3f}]':>17} {loss['plain']:>11.3f} / {loss['bdia']:.3f}")
    if args.json:
        write_json({task: {"final": r["final"].as_dict(), "loss": r["loss"].as_dict(), "runs": r["runs"],
                           "layers": args.layers,
                           "epochs": args.epochs} for task, r in results.items()}, args.json)


if __name__ == "__main__":
    main()
