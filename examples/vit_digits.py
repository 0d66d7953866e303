"""A small ViT on scikit-learn's digits: plain training vs the same model converted with bdia_fx.

For each seed both variants start from the same weights and see the same batches; the script
reports validation accuracy (mean ± std and the paired difference with a 95 % interval), checks
that the BDIA model's backward rebuilt every block input bit for bit, measures the activation
memory one training step keeps for backward as the model gets deeper (plain autograd, per-block
checkpointing, BDIA), writes accuracy curves, the memory-vs-depth plot and a JSON of everything,
and exports the reverted BDIA model to ONNX (checked in onnxruntime).

    python examples/vit_digits.py            # 3 seeds x 20 epochs, about 3 minutes on 2 CPU cores
    python examples/vit_digits.py --quick    # the demo: 2 seeds x 6 epochs, about a minute
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import bdia_fx
from bdia_fx.report import write_json

from paired import (
    VARIANTS,
    PairedDifference,
    adamw_cosine,
    make_variant,
    memory_by_depth,
    plot_curves,
    plot_memory_by_depth,
    train_variants,
)

VALIDATION_SIZE = 500


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1797 8x8 digit images scaled to [0, 1], a fixed stratified 500-image validation split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    train_idx, val_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=VALIDATION_SIZE,
                                          stratify=labels.numpy(), random_state=0)
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


def build_vit(layers: int, width: int, patch: int = 4, dropout: float = 0.1) -> nn.Module:
    """A pre-LN ViT for 8x8 one-channel images, ``dropout`` on the hidden states (none on attention)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=8, patch_size=patch, num_channels=1, hidden_size=width, num_hidden_layers=layers,
                       num_attention_heads=4, intermediate_size=2 * width, num_labels=10,
                       hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(pixel_values=chunk).logits.argmax(-1) for chunk in images.split(250)])
    return float((predictions == labels).float().mean())


def epoch_batches(size: int, batch: int, epochs: int, seed: int) -> list[list[torch.Tensor]]:
    """Index batches of each epoch, a fresh permutation per epoch drawn from ``seed`` alone."""
    order = torch.Generator().manual_seed(seed)
    return [list(torch.randperm(size, generator=order).split(batch)) for _ in range(epochs)]


def image_loss(x_train: torch.Tensor, y_train: torch.Tensor):
    """``loss_of`` for :func:`paired.train_variants`: cross-entropy of the batch at an index tensor."""
    return lambda model, index: nn.functional.cross_entropy(model(pixel_values=x_train[index]).logits, y_train[index])


def train_pair(seed: int, args: argparse.Namespace, data: tuple, progress: tqdm) -> dict:
    """Train plain and BDIA from the same initial weights on the same batch order."""
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(seed)
    initial = build_vit(args.layers, args.width, args.patch)
    runs = train_variants(initial, {name: partial(make_variant, name, example_args=(x_train[: args.batch],))
                                    for name in VARIANTS},
                          epoch_batches(len(y_train), args.batch, args.epochs, seed), image_loss(x_train, y_train),
                          lambda model: {"acc": accuracy(model, x_val, y_val)}, adamw_cosine(args.lr, 0.05),
                          noise_seed=seed + 1000, progress=progress)
    return {name: {"curve": run["metrics"]["acc"], "epoch_seconds": run["round_seconds"], "model": run["model"]}
            for name, run in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the demo: 2 seeds x 6 epochs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--patch", type=int, default=4, help="patch size on the 8x8 images (4: five tokens with [CLS])")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16, 32],
                        help="model depths of the memory-vs-depth measurement")
    parser.add_argument("--out", type=Path, default=Path("results/vit_digits"))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs = 2, 6
    from transformers.utils import logging

    logging.set_verbosity_error()
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_digits_split()
    print(f"digits: {len(data[1])} training, {len(data[3])} validation images; ViT {args.layers} blocks, width "
          f"{args.width}; {args.seeds} seeds x {args.epochs} epochs, plain vs BDIA (paired: same initial weights "
          "and batches)")

    runs = []
    with tqdm(total=args.seeds * len(VARIANTS) * args.epochs, unit="epoch") as progress:
        for seed in range(args.seeds):
            runs.append(train_pair(seed, args, data, progress))

    final = PairedDifference("validation accuracy", [r["plain"]["curve"][-1] for r in runs],
                             [r["bdia"]["curve"][-1] for r in runs])
    best = PairedDifference("best validation accuracy", [max(r["plain"]["curve"]) for r in runs],
                            [max(r["bdia"]["curve"]) for r in runs])
    epoch_seconds = {name: statistics.median(s for r in runs for s in r[name]["epoch_seconds"]) for name in VARIANTS}
    print()
    print(final.summary(100, " %", " pp", digits=1))
    print(best.summary(100, " %", " pp", digits=1))
    print(f"  (chance is 10 %; {VALIDATION_SIZE} validation images resolve about 1 pp)")
    print("median time per epoch: " + ", ".join(f"{name} {s:.2f} s" for name, s in epoch_seconds.items())
          + f" (bdia/plain {epoch_seconds['bdia'] / epoch_seconds['plain']:.2f})")

    trained = runs[-1]["bdia"]["model"]
    exactness = bdia_fx.check_exactness(trained, (data[0][: args.batch],),
                                        loss_fn=lambda out: out.logits.square().mean())
    trained.zero_grad(set_to_none=True)
    print(f"backward rebuild of the trained BDIA model: {'bit-exact' if exactness.exact else 'NOT exact'} on the "
          f"integer codes of all {len(exactness.blocks)} rebuilt block inputs")

    x_train, y_train = data[0], data[1]
    by_depth = memory_by_depth(lambda depth: build_vit(depth, args.width, args.patch),
                               lambda m: nn.functional.cross_entropy(m(pixel_values=x_train[: args.batch]).logits,
                                                                     y_train[: args.batch]),
                               (x_train[: args.batch],), args.depths)
    print(f"activation memory kept for backward by one training step (batch {args.batch}), MiB:")
    print(f"  {'blocks':>6} " + " ".join(f"{name:>10}" for name in by_depth))
    for i, depth in enumerate(args.depths):
        print(f"  {depth:>6} " + " ".join(f"{by_depth[name][i] / 2**20:>10.2f}" for name in by_depth))

    plot_curves({name: [[100 * a for a in r[name]["curve"]] for r in runs] for name in VARIANTS},
                "validation accuracy (%)", f"ViT on digits ({args.layers} blocks), {args.seeds} paired seeds",
                args.out / "accuracy.png")
    plot_memory_by_depth(args.depths, by_depth, f"one training step, batch {args.batch}", args.out / "memory.png")
    onnx = bdia_fx.export_onnx(trained, args.out / "vit_digits.onnx", (data[2][:8],))
    print(f"exported the reverted BDIA model to {onnx.path} ({onnx.file_bytes / 2**20:.2f} MiB, onnxruntime "
          f"max |diff| {onnx.check.max_abs_diff:.1e})")
    write_json({"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "final_accuracy": final.as_dict(), "best_accuracy": best.as_dict(), "exact": exactness.exact,
                "saved_bytes_by_depth": {"depths": args.depths, **by_depth}, "epoch_seconds": epoch_seconds,
                "curves": {name: [r[name]["curve"] for r in runs] for name in VARIANTS}}, args.out / "results.json")
    print(f"wrote {args.out / 'accuracy.png'}, {args.out / 'memory.png'}, {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
