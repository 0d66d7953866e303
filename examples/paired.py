"""What the plain-vs-BDIA examples share: paired runs, their statistics, and the plots.

Paired means: for each seed both variants start from the same initial weights and see the same
batches in the same order, so the per-seed difference isolates the effect of BDIA.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    def summary(self, scale: float = 1.0, unit: str = "", difference_unit: str | None = None, digits: int = 3) -> str:
        """Mean ± std of both variants in ``unit`` and their paired difference in ``difference_unit``
        (percentages differ by percentage points: ``summary(100, " %", " pp")``)."""
        difference_unit = unit if difference_unit is None else difference_unit

        def mean_std(values: list[float]) -> str:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * std:.{digits}f}{unit}"

        text = (f"{self.metric}: plain {mean_std(self.plain)}, bdia {mean_std(self.bdia)}; paired difference "
                f"bdia − plain {scale * statistics.fmean(self.differences):+.{digits}f}{difference_unit}")
        if len(self.plain) < 2:
            return text + " (one seed: no interval)"
        low, high = self.interval95()
        return (text + f", 95 % CI [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]{difference_unit} over "
                f"{len(self.plain)} seeds")

    def as_dict(self) -> dict:
        low, high = self.interval95()
        return {"metric": self.metric, "plain": self.plain, "bdia": self.bdia,
                "differences": self.differences, "ci95": [low, high]}


def make_variant(name: str, initial: nn.Module, example_args: tuple, example_kwargs: dict | None = None,
                 config: bdia_fx.BDIAConfig | None = None) -> nn.Module:
    """A copy of ``initial`` (same starting weights for every variant): as is for "plain",
    converted with ``bdia_fx.convert`` (and ``config``) for any other name."""
    model = copy.deepcopy(initial)
    if name == "plain":
        return model
    return bdia_fx.convert(model, example_args, example_kwargs, config)


Batch = Any  # whatever ``loss_of`` takes: an index tensor, a token batch, ...


def adamw_cosine(lr: float, weight_decay: float) -> Callable[[nn.Module, int], tuple]:
    """An optimizer factory for :func:`train_variants`: AdamW with cosine decay over all steps."""

    def make(model: nn.Module, total_steps: int) -> tuple:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    return make


def train_variants(initial: nn.Module, variants: dict[str, Callable[[nn.Module], nn.Module]],
                   rounds: Sequence[Sequence[Batch]], loss_of: Callable[[nn.Module, Batch], torch.Tensor],
                   evaluate: Callable[[nn.Module], dict[str, float]],
                   optimizer_of: Callable[[nn.Module, int], tuple], noise_seed: int,
                   progress: Any | None = None) -> dict[str, dict]:
    """The paired loop: every variant starts from ``initial`` and trains on the same ``rounds``.

    ``variants[name](initial)`` makes the variant's model (it must copy ``initial``, e.g. with
    :func:`make_variant`); ``rounds`` is a list of batch lists (an epoch, or ``eval_every`` steps),
    after each of which ``evaluate(model)`` gives named metrics; ``optimizer_of(model, total_steps)``
    gives (optimizer, per-step scheduler). The global RNG (dropout masks and γ draws) is reset to
    ``noise_seed`` before each variant trains. Returns per variant ``{"model", "metrics": {name:
    [one value per round]}, "train_loss": [mean training loss per round], "round_seconds": [...]}``.
    ``progress`` (a tqdm bar) is advanced once per round.
    """
    total_steps = sum(len(r) for r in rounds)
    if total_steps == 0:
        raise ValueError("train_variants: no training batches (rounds are empty)")
    result = {}
    for name, make in variants.items():
        model = make(initial)
        optimizer, schedule = optimizer_of(model, total_steps)
        torch.manual_seed(noise_seed)
        metrics: dict[str, list[float]] = {}
        train_loss, seconds = [], []
        for batches in rounds:
            model.train()
            start, total = time.perf_counter(), 0.0
            for batch in batches:
                loss = loss_of(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach())
            seconds.append(time.perf_counter() - start)
            train_loss.append(total / max(len(batches), 1))
            for key, value in evaluate(model).items():
                metrics.setdefault(key, []).append(value)
            if progress is not None:
                progress.set_postfix(variant=name, **{k: f"{v[-1]:.3f}" for k, v in metrics.items()})
                progress.update()
        result[name] = {"model": model, "metrics": metrics, "train_loss": train_loss, "round_seconds": seconds}
    return result


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


def memory_by_depth(build: Callable[[int], nn.Module], loss_of: Callable[[nn.Module], torch.Tensor],
                    example_args: tuple,
                    depths: list[int]) -> dict[str, list[int]]:
    """Saved-for-backward bytes of one training step per method (plain, per-block checkpointing,
    BDIA) for a model of each depth: ``build(depth)`` makes the model."""
    by_method: dict[str, list[int]] = {"plain": [], "checkpoint": [], "bdia": []}
    for depth in depths:
        for method, value in measure_memory(build(depth), loss_of, example_args).items():
            by_method[method].append(value)
    return by_method


def plot_memory_by_depth(depths: list[int], by_method: dict[str, list[int]], title: str, path: Path) -> None:
    """Activation memory against depth, one line per method: what reversible training buys."""
    labels = {"plain": "plain autograd", "checkpoint": "torch.utils.checkpoint per block", "bdia": "bdia_fx (BDIA)"}
    with _figure(path, "blocks", "activation memory kept for backward (MiB)", title) as ax:
        for method, values in by_method.items():
            ax.plot(depths, [v / 2**20 for v in values], marker="o", color=COLOURS[method], label=labels[method])
        ax.set_xticks(depths)


def plot_curves(curves: dict[str, list[list[float]]], ylabel: str, title: str, path: Path,
                xlabel: str = "epoch", every: int = 1) -> None:
    """Mean curve per variant over seeds with a ±1 std band; point i is at x = every·(i+1)."""
    with _figure(path, xlabel, ylabel, title) as ax:
        for name, runs in curves.items():
            values = torch.tensor(runs, dtype=torch.float64)
            x = every * torch.arange(1, values.shape[1] + 1)
            mean = values.mean(0)
            std = values.std(0) if len(runs) > 1 else torch.zeros_like(mean)
            ax.plot(x, mean, color=COLOURS[name], label=f"{name} (mean of {len(runs)})")
            ax.fill_between(x, mean - std, mean + std, color=COLOURS[name], alpha=0.2)


@contextlib.contextmanager
def _figure(path: Path, xlabel: str, ylabel: str, title: str) -> Iterator:
    """One 6x4 in. plot with labels, grid and legend, saved to ``path`` (PNG, 120 dpi) on leaving."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    yield ax
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
