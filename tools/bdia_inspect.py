"""bdia-inspect: show what ``bdia_fx.convert`` does to a model.

Pick a model (an HF config, a torch built-in, or any importable factory), and the tool prints
the chain report (chains, blocks, side inputs, what was rejected and why), optionally each
block's sublayer steps, the rewritten graph, before/after pictures, and a table of saved-activation bytes for plain
autograd, per-block checkpointing and BDIA (estimated, and measured with ``--measure``).

    bdia-inspect --hf gpt2 --config n_layer=6,n_embd=128 --graph
    bdia-inspect --hf vit --config num_hidden_layers=4,image_size=32 --draw out/
    bdia-inspect --torch transformer-encoder --layers 6 --memory 8,64 --measure
    bdia-inspect --hf gpt_neox --config num_hidden_layers=2 --granularity sublayer
    bdia-inspect --factory mypkg.models:make_model --tokens 1000

A ``--factory`` function takes no arguments and returns a model, ``(model, args)`` or
``(model, args, kwargs)``; for a bare model the example input is ``--tokens V`` (token ids) or
``--shape`` (a float tensor). Exit status 1 with a one-line error if the model cannot be converted.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bdia_fx
from bdia_fx.conversion import captured_graph
from bdia_fx.errors import ConversionError
from bdia_fx.report import graph_summary, write_json

__all__ = ["Inputs", "TORCH_MODELS", "build", "main", "memory_table", "parse_args", "print_memory", "run"]

TORCH_MODELS = ("transformer-encoder", "transformer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bdia-inspect", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="MODEL_TYPE",
                        help="an HF model type built from a config (gpt2, llama, vit, ...)")
    source.add_argument("--torch", choices=TORCH_MODELS, help="a torch.nn built-in transformer")
    source.add_argument("--factory", metavar="MODULE:FUNCTION", help="any importable function returning a model")
    parser.add_argument("--config", default="", metavar="K=V,...",
                        help="HF config overrides, e.g. n_layer=6,n_embd=128")
    parser.add_argument("--hf-class",
                        help="the HF model class (default: causal LM, else image classifier, else base model)")
    parser.add_argument("--layers", type=int, default=4, help="blocks per stack of a --torch model")
    parser.add_argument("--d-model", type=int, default=64, help="width of a --torch model")
    parser.add_argument("--heads", type=int, default=4, help="attention heads of a --torch model")
    parser.add_argument("--post-ln", action="store_true", help="--torch model with post-LN blocks (not convertible)")
    parser.add_argument("--seq-first", action="store_true", help="--torch model with batch_first=False")
    parser.add_argument("--batch", type=int, default=2, help="example batch size")
    parser.add_argument("--seq", type=int, default=16, help="example sequence length")
    parser.add_argument("--tokens", type=int, metavar="VOCAB",
                        help="--factory input: token ids below VOCAB, shape batch x seq")
    parser.add_argument("--shape", metavar="D0,D1,...", help="--factory input: a float tensor of this shape")
    parser.add_argument("--granularity", choices=["block", "sublayer"], default="block",
                        help="BDIA steps: whole blocks, or every sequential residual add (lists each block's steps)")
    parser.add_argument("--graph", action="store_true",
                        help="summarise the rewritten graph: each chain node, its blocks, steps and side inputs")
    parser.add_argument("--graph-dump", action="store_true", help="also print every node of the rewritten graph")
    parser.add_argument("--draw", type=Path, metavar="DIR", help="write before/after pictures (SVG, PNG) into DIR")
    parser.add_argument("--expand", action="store_true",
                        help="with --draw: show every node instead of one box per block")
    parser.add_argument("--memory", metavar="B,T", help="table of saved-activation bytes at batch B, sequence T")
    parser.add_argument("--measure", action="store_true", help="with --memory: also run one training step of each")
    parser.add_argument("--budget", metavar="B",
                        help="plan for a training-step memory budget (bytes, a size such as 6MiB, or a fraction such "
                             "as 0.5 of the plain peak) and print the plan and the (peak, time) frontier")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the report and memory table as JSON")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- models and example inputs
Inputs = Callable[[int, int], tuple[tuple, dict]]


def build(args: argparse.Namespace) -> tuple[nn.Module, Inputs, str]:
    """The model, a function (batch, seq) -> (args, kwargs) of example inputs, and a label."""
    if args.hf:
        return _hf_model(args)
    if args.torch:
        return _torch_model(args)
    return _factory_model(args)


def _parse_overrides(text: str) -> dict[str, Any]:
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConversionError(f"--config item '{item}' is not KEY=VALUE")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def _hf_model(args: argparse.Namespace) -> tuple[nn.Module, Inputs, str]:
    try:
        import transformers
    except ImportError as error:
        raise ConversionError(f"--hf needs transformers: pip install \"bdia-fx[hf]\" ({error})") from error
    try:
        config = transformers.AutoConfig.for_model(args.hf, **_parse_overrides(args.config))
    except ValueError as error:
        raise ConversionError(f"unknown HF model type '{args.hf}': {str(error).splitlines()[0]}") from error
    if args.hf_class:
        if not hasattr(transformers, args.hf_class):
            raise ConversionError(f"transformers has no class '{args.hf_class}'")
        model = getattr(transformers, args.hf_class)(config)
    else:
        autos = [auto for auto in ("AutoModelForCausalLM", "AutoModelForImageClassification", "AutoModel")
                 if type(config) in getattr(transformers, auto)._model_mapping]
        if not autos:
            raise ConversionError(f"no HF model class for '{args.hf}'; name one with --hf-class")
        try:
            model = getattr(transformers, autos[0]).from_config(config)
        except (ValueError, TypeError) as error:  # the config itself is inconsistent: say why
            raise ConversionError(f"cannot build {autos[0]} for '{args.hf}' with --config '{args.config}': "
                                  f"{str(error).splitlines()[0]}") from error
    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    if model.main_input_name == "input_ids":
        vocab = config.vocab_size
        return (model, lambda b, t: ((torch.randint(0, vocab, (b, t)),), dict(kwargs)),
                f"{type(model).__name__} ({args.hf})")
    if model.main_input_name == "pixel_values":
        size, channels = config.image_size, config.num_channels
        return (model, lambda b, t: ((torch.randn(b, channels, size, size),), dict(kwargs)),
                f"{type(model).__name__} ({args.hf})")
    raise ConversionError(f"{type(model).__name__} takes '{model.main_input_name}'; use --factory to give inputs")


def _torch_model(args: argparse.Namespace) -> tuple[nn.Module, Inputs, str]:
    d, batch_first = args.d_model, not args.seq_first
    common = dict(nhead=args.heads, dim_feedforward=4 * d, dropout=0.1, batch_first=batch_first,
                  norm_first=not args.post_ln)

    def stream(b: int, t: int) -> torch.Tensor:
        return torch.randn(b, t, d) if batch_first else torch.randn(t, b, d)

    if args.torch == "transformer-encoder":
        model = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, **common), args.layers, enable_nested_tensor=False)
        return model, lambda b, t: ((stream(b, t),), {}), f"nn.TransformerEncoder ({args.layers} layers)"
    model = nn.Transformer(d, num_encoder_layers=args.layers, num_decoder_layers=args.layers, **common)
    return (model, lambda b, t: ((stream(b, t), stream(b, max(t // 2, 2))), {}),
            f"nn.Transformer ({args.layers}+{args.layers} layers)")


def _factory_model(args: argparse.Namespace) -> tuple[nn.Module, Inputs, str]:
    module_name, sep, function_name = args.factory.partition(":")
    if not sep:
        raise ConversionError(f"--factory '{args.factory}' is not MODULE:FUNCTION")
    if os.getcwd() not in sys.path:  # like `python -m`: modules of the current directory import
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ConversionError(f"cannot import --factory {args.factory}: {error}") from error
    made = factory()
    if isinstance(made, nn.Module):
        model, fixed = made, None
    elif isinstance(made, tuple) and made and isinstance(made[0], nn.Module):
        model, fixed = made[0], (tuple(made[1]) if len(made) > 1 else (), dict(made[2]) if len(made) > 2 else {})
    else:
        raise ConversionError(f"--factory {args.factory} returned {type(made).__name__}, "
                              "not a model or (model, args[, kwargs])")
    label = f"{type(model).__name__} ({args.factory})"
    if fixed is not None:
        return model, lambda b, t: fixed, label
    if args.tokens:
        return model, lambda b, t: ((torch.randint(0, args.tokens, (b, t)),), {}), label
    if args.shape:
        shape = tuple(int(s) for s in args.shape.split(","))
        return model, lambda b, t: ((torch.randn(shape),), {}), label
    raise ConversionError(f"--factory {args.factory} returned a bare model: give its input with --tokens or --shape")


# ---------------------------------------------------------------- memory table
def memory_table(model: nn.Module, make_inputs: Inputs, batch: int, seq: int, measure: bool) -> list[dict]:
    """Estimated (and measured) saved-for-backward bytes of one training step per method."""
    from bdia_fx.memory import checkpoint_blocks, default_loss, estimate_saved_bytes, saved_activation_bytes

    args, kwargs = make_inputs(batch, seq)
    report = bdia_fx.find_chains(model, args, kwargs)
    model.train()
    estimate = estimate_saved_bytes(model, report, lambda: default_loss(model(*args, **kwargs)))
    rows = [{"method": "plain", "estimated": estimate.plain},
            {"method": "checkpoint", "estimated": estimate.checkpoint},
            {"method": "bdia", "estimated": estimate.bdia}]
    if measure:
        variants = {"plain": model, "checkpoint": checkpoint_blocks(model, report),
                    "bdia": bdia_fx.convert(model, args, kwargs)}
        for row in rows:
            variant = variants[row["method"]].train()
            row["measured"] = saved_activation_bytes(variant,
                                                     lambda _variant=variant: default_loss(_variant(*args, **kwargs)))
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:10.3f}"


def print_memory(rows: list[dict], batch: int, seq: int) -> None:
    print(f"\nsaved for backward, one training step at batch {batch}, sequence {seq} "
          "(MiB; estimate from one plain forward)")
    measured = "measured" in rows[0]
    print(f"{'method':12}{'estimated':>10}" + (f"{'measured':>10}" if measured else "") + f"{'vs plain':>10}")
    plain = rows[0]["measured" if measured else "estimated"]
    for row in rows:
        value = row["measured" if measured else "estimated"]
        print(f"{row['method']:12}{_mib(row['estimated'])}" + (_mib(row["measured"]) if measured else "")
              + f"{value / max(plain, 1):10.3f}")


# ---------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    model, make_inputs, label = build(args)
    example_args, example_kwargs = make_inputs(args.batch, args.seq)
    print(f"model: {label}")
    try:
        converted = bdia_fx.convert(model, example_args, example_kwargs,
                                    bdia_fx.BDIAConfig(granularity=args.granularity),
                                    memory_budget=_budget(args.budget) if args.budget else None)
    except ConversionError:
        print(bdia_fx.find_chains(model, example_args, example_kwargs))  # what was found and why it was refused
        raise
    report = bdia_fx.report_of(converted)
    print(report)
    result: dict[str, Any] = {"model": label, "chains": [
        {"container": c.container, "blocks": list(c.block_paths), "side_inputs": [str(s) for s in c.side_inputs]}
        for c in report.chains], "rejections": [
        {"module": r.module, "node": r.node, "reason": r.reason} for r in report.rejections]}
    if report.memory_plan is not None:
        result["memory_plan"] = report.memory_plan.to_dict()
    if args.granularity == "sublayer":
        print("\nsublayer steps (the residual add ending each step):")
        for chain in report.chains:
            for block in chain.blocks:
                adds = block.step_ends
                print(f"  {block.path}: {len(adds)} step{'s' * (len(adds) > 1)}, ending at {', '.join(adds)}")
        result["sublayers"] = {c.container: [list(b.step_ends) for b in c.blocks] for c in report.chains}
    if args.graph or args.graph_dump:
        print()
        print(graph_summary(report, captured_graph(converted), bdia_fx.graph_of(converted).graph))
    if args.graph_dump:
        print("\nrewritten graph, every node:")
        print(bdia_fx.graph_of(converted).graph)
    if args.draw:
        from bdia_fx.draw import draw_conversion

        paths = draw_conversion(converted, args.draw, expand=args.expand)
        print("\nwrote " + ", ".join(str(p) for p in paths))
        result["pictures"] = [str(p) for p in paths]
    if args.memory:
        try:
            batch, seq = (int(v) for v in args.memory.split(","))
        except ValueError as error:
            raise ConversionError(f"--memory '{args.memory}' is not B,T") from error
        rows = memory_table(model, make_inputs, batch, seq, args.measure)
        print_memory(rows, batch, seq)
        result["memory"] = {"batch": batch, "seq": seq, "rows": rows}
    return result


def _budget(text: str) -> int | float | str:
    """--budget as convert takes it: digits are bytes, a decimal number a fraction, anything else a size."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except ValueError as error:  # a --budget that is no size
        print(f"bdia-inspect: {error}", file=sys.stderr)
        return 2
    except ConversionError as error:
        print(f"bdia-inspect: cannot convert: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    if args.json:
        write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
