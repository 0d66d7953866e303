"""What the plain-vs-BDIA examples share: paired runs, their statistics, and the plots.

Paired means: for each seed both variants start from the same initial weights and see the same
batches in the same order, so the per-seed difference isolates the effect of BDIA.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import bdia_fx
from bdia_fx.memory import checkpoint_blocks, saved_activation_bytes

VARIANTS = ("plain", "bdia")
COLOURS = {"plain": "#457b9d", "bdia": "#e76f51", "checkpoint": "#8d99ae"}


@dataclass
class PairedDifference:
    """Mean ± std of each variant's final metric, and the paired difference bdia − plain."""

    metric: str
    plain: list[float]
    bdia: list[float]

    @property
    def differences(self) -> list[float]:
        return [b - p for p, b in zip(self.plain, self.bdia)]

    def interval95(self) -> tuple[float, float]:
        """95 % t-interval of the mean paired difference (needs ≥ 2 seeds)."""
        from scipy.stats import t

        d = self.differences
        if len(d) < 2:
            return (math.nan, math.nan)
        half = t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
        mean = statistics.fmean(d)
        return mean - half, mean + half

    def summary(self, scale: float = 1.0, unit: str = "") -> str:
        def mean_std(values: list[float]) -> str:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{scale * statistics.fmean(values):.3f} ± {scale * std:.3f}{unit}"

        low, high = self.interval95()
        return (f"{self.metric}: plain {mean_std(self.plain)}, bdia {mean_std(self.bdia)}; paired difference "
                f"bdia − plain {scale * statistics.fmean(self.differences):+.3f}{unit}, 95 % CI "
                f"[{scale * low:+.3f}, {scale * high:+.3f}]{unit} over {len(self.plain)} seeds")

    def as_dict(self) -> dict:
        low, high = self.interval95()
        return {"metric": self.metric, "plain": self.plain, "bdia": self.bdia,
                "differences": self.differences, "ci95": [low, high]}


def make_variant(name: str, initial: nn.Module, example_args: tuple, example_kwargs: dict | None = None) -> nn.Module:
    """A copy of ``initial`` (same starting weights for every variant): as is for "plain",
    converted with ``bdia_fx.convert`` for "bdia"."""
    model = copy.deepcopy(initial)
    if name == "plain":
        return model
    return bdia_fx.convert(model, example_args, example_kwargs)


def measure_memory(model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor], example_args: tuple,
                   example_kwargs: dict | None = None) -> dict[str, int]:
    """Saved-activation bytes of one training step: plain, per-block checkpointing and BDIA."""
    report = bdia_fx.find_chains(model, example_args, example_kwargs)
    variants = {"plain": model, "checkpoint": checkpoint_blocks(model, report),
                "bdia": bdia_fx.convert(model, example_args, example_kwargs)}
    result = {}
    for name, variant in variants.items():
        variant.train()
        result[name] = saved_activation_bytes(variant, lambda v=variant: loss_of(v))
        variant.zero_grad(set_to_none=True)
    return result


def plot_curves(curves: dict[str, list[list[float]]], ylabel: str, title: str, path: Path,
                xlabel: str = "epoch", every: int = 1) -> None:
    """Mean curve per variant over seeds with a ±1 std band; point i is at x = every·(i+1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in curves.items():
        values = torch.tensor(runs, dtype=torch.float64)
        x = every * torch.arange(1, values.shape[1] + 1)
        mean = values.mean(0)
        std = values.std(0) if len(runs) > 1 else torch.zeros_like(mean)
        ax.plot(x, mean, color=COLOURS[name], label=f"{name} (mean of {len(runs)})")
        ax.fill_between(x, mean - std, mean + std, color=COLOURS[name], alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory(memory: dict[str, int], title: str, path: Path) -> None:
    """Bar chart of saved-activation MiB per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(memory)
    mib = [memory[n] / 2**20 for n in names]
    bars = ax.bar(names, mib, color=[COLOURS[n] for n in names])
    for bar, value in zip(bars, mib):
        ax.annotate(f"{value:.2f} MiB", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
    ax.set_ylabel("saved for backward (MiB)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
