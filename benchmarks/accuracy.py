"""Does BDIA training regularise? A paired-seed study of plain vs BDIA accuracy (issue 15).

Each *cell* is one setting (depth K, training-set fraction, training length, learning rate,
dropout, fixed-point bits) of one task: the digits ViT of ``examples/vit_digits.py`` (validation
accuracy) or the character GPT of ``examples/char_lm.py`` (validation loss per character). Per
seed, plain and every BDIA variant of the cell start from the same weights and see the same
batches in the same order (``examples/paired.py``), so the per-seed difference isolates BDIA.
The optimisers are the examples': AdamW with cosine decay (digits), AdamW with a one-cycle
schedule, 10 % warm-up (char-LM).

Per cell the script reports train and validation curves (PNG), the final and best validation
metric, the paired difference bdia − plain with its 95 % t-interval, the number of seeds a 95 %
interval of half-width 1 pp (digits) or 0.01 nats/char (char-LM) would need at the observed paired
std (an estimate), and the trained BDIA model under three evaluation modes:

- ``gamma0``: the converted model's ``.eval()`` (γ = 0 chain with the quantization, the default);
- ``gamma0-float``: ``bdia_fx.revert(model, quantize=False)`` (γ = 0, no quantization;
  the same numbers as ``BDIAConfig(quantize_eval=False)``);
- ``mc<N>``: the ensemble the training defines: N forwards with the chain in training mode
  (random γ per sample per block) but every Dropout in eval mode, under ``torch.no_grad()``,
  softmax probabilities averaged over the draws. It costs N forwards and runs the BDIA graph.

    python benchmarks/accuracy.py --quick                      # the test's smoke run (< 1 min)
    python benchmarks/accuracy.py --cells K6 K12 --json acc.json
    python benchmarks/accuracy.py --list                       # the cells and their settings
    python benchmarks/accuracy.py --from-json a.json b.json    # merge runs, rebuild tables and plots
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import bdia_fx
from bdia_fx.report import write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from char_lm import batches, build_gpt, encode, load_text, one_cycle  # noqa: E402
from vit_digits import build_vit, epoch_batches, image_loss, load_digits_split  # noqa: E402

from paired import PairedDifference, adamw_cosine, make_variant, plot_curves, train_variants  # noqa: E402

RESOLUTION = {"digits": 0.01, "char-lm": 0.01}  # 1 pp of accuracy; 0.01 nats/char of loss
UNITS = {"digits": (100.0, " %", " pp", 1), "char-lm": (1.0, "", " nats", 3)}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One setting of one task. ``length`` is epochs (digits) or optimizer steps (char-LM)."""

    task: str
    axis: str
    layers: int = 6
    fraction: float = 1.0
    length: int = 20
    lr: float = 1e-3
    dropout: float = 0.1
    bits: tuple[int, ...] = (9,)
    seeds: int = 8
    schemes: tuple[str, ...] = ()  # shear schemes (BDIAConfig(scheme=...)) trained beside BDIA

    def configs(self) -> dict[str, bdia_fx.BDIAConfig | None]:
        """``plain`` (None), one BDIA variant per ``bits`` entry (``bdia`` is the default 9 bits) and one
        per shear scheme (``scheme-<name>``, 9 bits)."""
        return {"plain": None,
                **{"bdia" if b == 9 else f"bdia-b{b}": bdia_fx.BDIAConfig(frac_bits=b) for b in self.bits},
                **{f"scheme-{name}": bdia_fx.BDIAConfig(scheme=name) for name in self.schemes}}

    def variants(self) -> list[str]:
        return list(self.configs())

    def setting(self) -> str:
        unit = "epochs" if self.task == "digits" else "steps"
        extra = "" if self.dropout == 0.1 else f", dropout {self.dropout}"
        bits = "" if self.bits == (9,) else f", frac_bits {'/'.join(map(str, self.bits))}"
        schemes = "" if not self.schemes else f", schemes {'/'.join(self.schemes)}"
        return (f"K={self.layers}, {100 * self.fraction:.0f} % data, {self.length} {unit}, lr {self.lr:g}"
                + extra + bits + schemes)


CHAR_LM = {"task": "char-lm", "length": 300, "lr": 3e-3, "seeds": 4}
CELLS: dict[str, Cell] = {
    "K6": Cell("digits", "default (depth axis)"),
    "K12": Cell("digits", "depth", layers=12),
    "K3": Cell("digits", "depth", layers=3),
    "K24": Cell("digits", "depth", layers=24, seeds=2),
    "frac25": Cell("digits", "training-set size", fraction=0.25),
    "frac50": Cell("digits", "training-set size", fraction=0.5),
    "long25": Cell("digits", "training length (overfitting)", fraction=0.25, length=80),
    "lr3e-3": Cell("digits", "learning rate", lr=3e-3),
    "lr3e-4": Cell("digits", "learning rate", lr=3e-4),
    "bits": Cell("digits", "fixed-point bits", bits=(9, 12, 16), seeds=4),
    "nodrop": Cell("digits", "dropout off", dropout=0.0, seeds=4),
    "schemes": Cell("digits", "integrator scheme (issue 16)", schemes=("alf",), seeds=4),
    "lm-K4": Cell(axis="depth", layers=4, **CHAR_LM),
    "lm-K8": Cell(axis="depth", layers=8, **CHAR_LM),
}
QUICK = {"K6": Cell("digits", "smoke", layers=2, length=2, seeds=2, bits=(9, 16), schemes=("alf",)),
         "lm-K4": Cell(axis="smoke", task="char-lm", layers=2, length=20, lr=3e-3, seeds=2)}


# ---------------------------------------------------------------------------------------------- evaluation
@contextlib.contextmanager
def gamma_draws(model: nn.Module, seed: int) -> Iterator[None]:
    """The BDIA forward as an ensemble member: the chain in training mode (a chain trains when any
    of its blocks is in training mode, ``ChainRuntime``), every Dropout in eval mode, no autograd,
    γ drawn from a forked RNG seeded with ``seed`` (the caller's RNG stream is left untouched)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(seed)
            yield
    finally:
        model.eval()


def mean_probabilities(logits_of: Callable[[], torch.Tensor], model: nn.Module, draws: int) -> torch.Tensor:
    """Softmax probabilities averaged over ``draws`` γ draws of the BDIA forward."""
    with gamma_draws(model, seed=12345):
        return torch.stack([logits_of().softmax(-1) for _ in range(draws)]).mean(0)


def probabilities(logits_of: Callable[[], torch.Tensor], model: nn.Module) -> torch.Tensor:
    """Softmax probabilities of ``model`` in eval mode."""
    model.eval()
    with torch.no_grad():
        return logits_of().softmax(-1)


def eval_modes(model: nn.Module, logits_fn: Callable[[nn.Module], torch.Tensor], draws: int) -> dict:
    """Probabilities of a trained BDIA model under each evaluation mode (see the module doc)."""
    reverted = bdia_fx.revert(model, quantize=False)
    return {"gamma0": probabilities(lambda: logits_fn(model), model),
            "gamma0-float": probabilities(lambda: logits_fn(reverted), reverted),
            f"mc{draws}": mean_probabilities(lambda: logits_fn(model), model, draws)}


# ---------------------------------------------------------------------------------------------- digits
def digits_data(fraction: float) -> tuple[torch.Tensor, ...]:
    """The digits split of vit_digits, the training part cut to a stratified ``fraction`` (fixed)."""
    from sklearn.model_selection import train_test_split

    x_train, y_train, x_val, y_val = load_digits_split()
    if fraction < 1.0:
        keep, _ = train_test_split(torch.arange(len(y_train)).numpy(), train_size=fraction,
                                   stratify=y_train.numpy(), random_state=0)
        x_train, y_train = x_train[keep], y_train[keep]
    return x_train, y_train, x_val, y_val


def image_logits(images: torch.Tensor) -> Callable[[nn.Module], torch.Tensor]:
    return lambda model: torch.cat([model(pixel_values=chunk).logits for chunk in images.split(250)])


def image_metrics(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                  y_val: torch.Tensor) -> dict[str, float]:
    """Validation accuracy and loss, and accuracy on (up to 500 of) the training images, in eval mode."""
    val = probabilities(lambda: image_logits(x_val)(model), model)
    train = probabilities(lambda: image_logits(x_train[:500])(model), model)
    return {"val": accuracy_of(val, y_val), "val_loss": nll_of(val, y_val), "train": accuracy_of(train, y_train[:500])}


def accuracy_of(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(-1) == labels).float().mean())


def nll_of(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of ``labels`` (last dim of ``probs`` is the class)."""
    picked = probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return float(-picked.clamp_min(1e-12).log().mean())


def run_digits_seed(cell: Cell, seed: int, data: tuple, draws: int, progress: tqdm) -> dict:
    """One paired seed of a digits cell: curves, and the BDIA variants' evaluation modes."""
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(seed)
    initial = build_vit(cell.layers, 64, dropout=cell.dropout)
    example = (x_train[:32],)
    variants = {name: partial(make_variant, "plain" if config is None else "bdia", example_args=example,
                              config=config)
                for name, config in cell.configs().items()}
    runs = train_variants(initial, variants, epoch_batches(len(y_train), 32, cell.length, seed),
                          image_loss(x_train, y_train),
                          lambda model: image_metrics(model, x_train, y_train, x_val, y_val),
                          adamw_cosine(cell.lr, 0.05), noise_seed=seed + 1000, progress=progress)
    logits = image_logits(x_val)
    for name, run in runs.items():
        modes = eval_modes(run["model"], logits, draws) if name != "plain" else {}
        run["modes"] = {mode: accuracy_of(p, y_val) for mode, p in modes.items()}
        del run["model"]
    return runs


# ---------------------------------------------------------------------------------------------- char-LM
def lm_data() -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Training characters, 8 fixed validation batches of 16 x 64 characters, vocabulary size."""
    text, chars = load_text()
    data = encode(text, chars)
    split = int(0.9 * len(data))
    return data[:split], batches(data[split:], 8, 16, 64, torch.Generator().manual_seed(12345)), len(chars)


def token_nll(probs: torch.Tensor, ids: torch.Tensor) -> float:
    """Next-character NLL (nats/char) of ``ids`` under per-position probabilities ``probs``."""
    return nll_of(probs[:, :-1], ids[:, 1:])


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, labels=ids, use_cache=False).loss


def lm_val_loss(model: nn.Module, val_batches: list[torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return statistics.fmean(float(lm_loss(model, ids)) for ids in val_batches)


def run_lm_seed(cell: Cell, seed: int, data: tuple, draws: int, progress: tqdm, eval_every: int) -> dict:
    """One paired seed of a char-LM cell: validation loss curve and the evaluation modes."""
    train, val_batches, vocab = data
    torch.manual_seed(seed)
    initial = build_gpt(vocab, cell.layers, 64, 64, dropout=cell.dropout)
    steps = batches(train, cell.length, 16, 64, torch.Generator().manual_seed(seed))
    rounds = [steps[i: i + eval_every] for i in range(0, len(steps), eval_every)]
    example = ((steps[0],), {"labels": steps[0], "use_cache": False})
    variants = {name: partial(make_variant, "plain" if config is None else "bdia", example_args=example[0],
                              example_kwargs=example[1], config=config)
                for name, config in cell.configs().items()}
    runs = train_variants(initial, variants, rounds, lm_loss, lambda model: {"val": lm_val_loss(model, val_batches)},
                          one_cycle(cell.lr, 0.01), noise_seed=seed + 1000, progress=progress)
    for name, run in runs.items():
        modes = {}
        if name != "plain":
            per_batch = [eval_modes(run["model"], lambda m, ids=ids: m(ids, use_cache=False).logits, draws)
                         for ids in val_batches]
            modes = {mode: statistics.fmean(token_nll(p[mode], ids) for p, ids in zip(per_batch, val_batches))
                     for mode in per_batch[0]}
        run["modes"] = modes
        del run["model"]
    return runs


# ---------------------------------------------------------------------------------------------- statistics
def seeds_to_resolve(differences: list[float], resolution: float) -> int | None:
    """Estimated seeds for a 95 % interval of half-width ``resolution`` at the observed paired std:
    the smallest n with t(0.975, n−1)·sd/√n ≤ resolution (None with < 2 seeds)."""
    from scipy.stats import t

    if len(differences) < 2:
        return None
    sd = statistics.stdev(differences)
    n = 2
    while t.ppf(0.975, n - 1) * sd / math.sqrt(n) > resolution and n < 100_000:
        n += 1
    return n


def better(task: str) -> Callable[[list[float]], float]:
    """The best value of a validation curve: max accuracy, min loss."""
    return max if task == "digits" else min


def summarise(cell: Cell, runs: list[dict]) -> dict:
    """Final/best paired differences per BDIA variant, seeds needed, evaluation modes, train gaps."""
    best = better(cell.task)
    metric = "accuracy" if cell.task == "digits" else "loss (nats/char)"
    rows = {}
    for name in cell.variants()[1:]:
        final = PairedDifference(f"final validation {metric}", [r["plain"]["metrics"]["val"][-1] for r in runs],
                                 [r[name]["metrics"]["val"][-1] for r in runs])
        top = PairedDifference(f"best validation {metric}", [best(r["plain"]["metrics"]["val"]) for r in runs],
                               [best(r[name]["metrics"]["val"]) for r in runs])
        modes = {mode: PairedDifference(mode, final.plain, [r[name]["modes"][mode] for r in runs]).as_dict()
                 for mode in runs[0][name]["modes"]}
        rows[name] = {"final": final.as_dict(), "best": top.as_dict(), "modes": modes,
                      "seeds_for_resolution": seeds_to_resolve(final.differences, RESOLUTION[cell.task]),
                      "gap": {"plain": [generalisation_gap(cell, r["plain"]) for r in runs],
                              "bdia": [generalisation_gap(cell, r[name]) for r in runs]}}
        if cell.task == "digits":
            rows[name]["val_loss"] = PairedDifference("final validation loss",
                                                      [r["plain"]["metrics"]["val_loss"][-1] for r in runs],
                                                      [r[name]["metrics"]["val_loss"][-1] for r in runs]).as_dict()
    return rows


def generalisation_gap(cell: Cell, run: dict) -> float:
    """How much better the final model does on training data than on validation data: digits,
    training minus validation accuracy (both in eval mode); char-LM, validation loss minus the last
    round's mean training loss (training forward: with dropout, and γ for BDIA)."""
    if cell.task == "digits":
        return run["metrics"]["train"][-1] - run["metrics"]["val"][-1]
    return run["metrics"]["val"][-1] - run["train_loss"][-1]


# ---------------------------------------------------------------------------------------------- output
def mean_ci(entry: dict, task: str, key: str = "differences") -> str:
    """``mean [low, high]`` of a PairedDifference dict in the task's display unit."""
    scale, _, unit, digits = UNITS[task]
    low, high = entry["ci95"]
    ci = "" if math.isnan(low) else f" [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"
    return f"{scale * statistics.fmean(entry[key]):+.{digits}f}{ci}"


def mean_std(values: list[float], task: str) -> str:
    scale, unit, _, digits = UNITS[task]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * std:.{digits}f}"


def results_table(results: dict) -> str:
    """Markdown: per cell and BDIA variant, final/best metric and paired differences."""
    lines = ["| cell | task | setting | seeds | variant | plain final | bdia final | Δ final [95 % CI] | "
             "Δ best [95 % CI] | Δ val loss [95 % CI] | seeds for ±res | gap plain / bdia |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, cell in results.items():
        task = cell["cell"]["task"]
        scale, _, _, digits = UNITS[task]
        for variant, row in cell["summary"].items():
            loss = mean_ci(row["val_loss"], "char-lm") if "val_loss" in row else "(= Δ final)"
            gap = " / ".join(f"{scale * statistics.fmean(row['gap'][v]):.{digits}f}" for v in ("plain", "bdia"))
            lines.append(f"| {name} | {task} | {cell['setting']} | {len(row['final']['plain'])} | {variant} | "
                         f"{mean_std(row['final']['plain'], task)} | {mean_std(row['final']['bdia'], task)} | "
                         f"{mean_ci(row['final'], task)} | {mean_ci(row['best'], task)} | {loss} | "
                         f"{row['seeds_for_resolution']} | {gap} |")
    return "\n".join(lines)


def modes_table(results: dict) -> str:
    """Markdown: each evaluation mode of the trained BDIA model, mean, paired Δ vs plain's eval and
    paired Δ vs the same model's default γ = 0 eval (does the mode recover anything?)."""
    lines = ["| cell | variant | mode | mean ± std | Δ vs plain [95 % CI] | Δ vs gamma0 [95 % CI] |",
             "|---|---|---|---|---|---|"]
    for name, cell in results.items():
        task = cell["cell"]["task"]
        for variant, row in cell["summary"].items():
            for mode, entry in row["modes"].items():
                own = PairedDifference(mode, row["modes"]["gamma0"]["bdia"], entry["bdia"]).as_dict()
                lines.append(f"| {name} | {variant} | {mode} | {mean_std(entry['bdia'], task)} | "
                             f"{mean_ci(entry, task)} | {'—' if mode == 'gamma0' else mean_ci(own, task)} |")
    return "\n".join(lines)


def plot_cell(name: str, cell: Cell, runs: list[dict], out: Path) -> list[Path]:
    """Validation and training curves of a cell (mean ± std over seeds), one PNG each."""
    scale = 100.0 if cell.task == "digits" else 1.0
    every = 1 if cell.task == "digits" else None
    paths = []
    for key, label in (("val", "validation"), ("train", "training")):
        if cell.task == "digits":
            curves = {v: [[scale * a for a in r[v]["metrics"][key]] for r in runs] for v in ("plain", "bdia")}
            ylabel = f"{label} accuracy (%)" + (" (eval mode, ≤ 500 images)" if key == "train" else "")
        else:
            curves = {v: [r[v]["metrics"]["val"] if key == "val" else r[v]["train_loss"] for r in runs]
                      for v in ("plain", "bdia")}
            ylabel = f"{label} loss (nats/char)" + (" (training forward)" if key == "train" else "")
            every = math.ceil(cell.length / len(runs[0]["plain"]["train_loss"]))
        path = out / f"{name}_{key}.png"
        plot_curves(curves, ylabel, f"{name}: {cell.setting()}", path,
                    xlabel="epoch" if cell.task == "digits" else "training step", every=every)
        paths.append(path)
    return paths


def plot_differences(results: dict, path: Path) -> None:
    """Forest plot: final paired Δ (bdia − plain) with its 95 % interval per cell and variant,
    one panel per task (accuracy in pp: above 0 BDIA is better; loss in nats: below 0 it is)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in UNITS if any(c["cell"]["task"] == t for c in results.values())]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        scale, _, unit, _ = UNITS[task]
        rows = [(f"{name} {variant} (n={len(row['final']['plain'])})", row["final"])
                for name, cell in results.items() if cell["cell"]["task"] == task
                for variant, row in cell["summary"].items()]
        for y, (_, entry) in enumerate(rows):
            mean = scale * statistics.fmean(entry["differences"])
            low, high = (scale * v for v in entry["ci95"])
            ax.errorbar(mean, y, xerr=[[mean - low], [high - mean]] if not math.isnan(low) else None, fmt="o",
                        color="#e76f51", capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(rows)), [label for label, _ in rows])
        ax.set_xlabel(f"final validation {'accuracy' if task == 'digits' else 'loss'}: bdia − plain ({unit.strip()})")
        ax.set_title(f"{task}: paired difference, 95 % CI")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict, out: Path) -> str:
    """table.md and differences.png in ``out``; returns the tables."""
    tables = results_table(results) + "\n\n" + modes_table(results)
    (out / "table.md").write_text(tables + "\n")
    plot_differences(results, out / "differences.png")
    return tables


def rebuild(sources: list[Path], target: Path, out: Path) -> str:
    """Summaries, plots, table.md and JSON recomputed from the runs the results JSONs hold."""
    loaded = [json.loads(source.read_text()) for source in sources]
    def flat(value: object) -> list:  # a merged file holds lists already
        return value if isinstance(value, list) else [value]

    saved = {"commands": [c for entry in loaded for c in flat(entry.get("commands", entry.get("command")))],
             "draws": [d for entry in loaded for d in flat(entry["draws"])],
             "cells": {name: cell for entry in loaded for name, cell in entry["cells"].items()}}
    for name, entry in saved["cells"].items():
        cell = Cell(**{**entry["cell"], "bits": tuple(entry["cell"]["bits"]),
                       "schemes": tuple(entry["cell"].get("schemes", ()))})
        entry["summary"] = summarise(cell, entry["runs"])
        entry["plots"] = [str(p) for p in plot_cell(name, cell, entry["runs"], out)]
    write_json(saved, target)
    return write_outputs(saved["cells"], out)


# ---------------------------------------------------------------------------------------------- main
def run_cell(name: str, cell: Cell, draws: int, eval_every: int) -> list[dict]:
    """All paired seeds of one cell."""
    data = digits_data(cell.fraction) if cell.task == "digits" else lm_data()
    rounds = cell.length if cell.task == "digits" else math.ceil(cell.length / eval_every)
    runs = []
    with tqdm(total=cell.seeds * len(cell.variants()) * rounds, desc=name, unit="round") as progress:
        for seed in range(cell.seeds):
            if cell.task == "digits":
                runs.append(run_digits_seed(cell, seed, data, draws, progress))
            else:
                runs.append(run_lm_seed(cell, seed, data, draws, progress, eval_every))
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=["K6", "K12", "lm-K4", "lm-K8"],
                        help=f"cells to run, in order (known: {', '.join(CELLS)})")
    parser.add_argument("--seeds", type=int, default=None, help="override every cell's seed count")
    parser.add_argument("--draws", type=int, default=8, help="γ draws of the Monte-Carlo evaluation mode")
    parser.add_argument("--eval-every", type=int, default=50, help="char-LM: steps between validations")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny digits and char-LM cells, 2 seeds")
    parser.add_argument("--list", action="store_true", help="print the cells and exit")
    parser.add_argument("--out", type=Path, default=Path("results/accuracy"), help="plots and table.md go here")
    parser.add_argument("--json", type=Path, default=None, help="results JSON (default OUT/accuracy.json)")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None,
                        help="train nothing: rebuild the JSON, table.md and plots in OUT from results JSONs "
                             "(cells merged in order; a later file's cell replaces an earlier one of that name)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.from_json or [] if not p.is_file()]
    if missing:
        parser.error(f"--from-json: no file {', '.join(missing)}")
    cells = QUICK if args.quick else CELLS
    if args.quick:
        args.cells, args.draws, args.eval_every = list(QUICK), 2, 5
    unknown = [c for c in args.cells if c not in cells]
    if unknown:
        parser.error(f"unknown cell(s) {', '.join(unknown)}; known: {', '.join(cells)}")
    if args.seeds is not None and args.seeds < 1:
        parser.error("--seeds must be ≥ 1")
    if args.draws < 1 or args.eval_every < 1:
        parser.error("--draws and --eval-every must be ≥ 1")
    args.grid = {c: cells[c] if args.seeds is None else dataclasses.replace(cells[c], seeds=args.seeds)
                 for c in args.cells}
    args.json = args.json or args.out / "accuracy.json"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.list:
        for name, cell in CELLS.items():
            print(f"{name:>8}  {cell.task:<8} {cell.axis:<30} {cell.setting()}, {cell.seeds} seeds")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json is not None:
        print(rebuild(args.from_json, args.json, args.out))
        return
    torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    results = {}
    for name, cell in args.grid.items():
        started = time.perf_counter()
        runs = run_cell(name, cell, args.draws, args.eval_every)
        results[name] = {"cell": dataclasses.asdict(cell), "setting": cell.setting(), "summary": summarise(cell, runs),
                         "seconds": time.perf_counter() - started,
                         "plots": [str(p) for p in plot_cell(name, cell, runs, args.out)],
                         "runs": runs}
        write_json({"command": " ".join(sys.argv), "draws": args.draws, "cells": results}, args.json)
        tables = write_outputs(results, args.out)
        print(f"\n{name}: {cell.setting()}, {cell.seeds} paired seeds, {results[name]['seconds']:.0f} s\n{tables}\n",
              flush=True)
    print(f"wrote {args.json}, {args.out / 'table.md'}, {args.out / 'differences.png'} and the curves in {args.out}")


if __name__ == "__main__":
    main()
