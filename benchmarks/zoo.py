"""The zoo: transformer implementations from packages other than transformers, converted as a user would.

Each model is built from a small config (no download) as its package's README builds it, and converted
with ``bdia_fx.convert(model, example_inputs)``. A model that converts is checked: the gradients of one
training step bit-identical to the stored-activation run of the same forward (``BDIAConfig(mode="stored")``,
same seed), the reverted model's eval output equal to the original's, and the converted model's own
γ = 0 eval (its chain steps, quantized) close to the original's. A model that is refused gives
the reason. The packages are pinned in ``benchmarks/zoo-requirements.txt`` (``tools/dev.sh`` installs them).

    python benchmarks/zoo.py                        # the table
    python benchmarks/zoo.py --markdown docs/zoo.md --json zoo.json
    python benchmarks/zoo.py --only fms-llama esm2  # some models
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

import bdia_fx
from bdia_fx import BDIAConfig, ConversionError
from bdia_fx.report import write_json

Built = tuple[nn.Module, tuple, dict]


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """One model of a third-party package: how to build it and call it."""

    name: str
    package: str  # the distribution, as pinned in zoo-requirements.txt
    kind: str
    build: Callable[[], Built]


@dataclasses.dataclass
class ZooResult:
    name: str
    package: str
    version: str
    kind: str
    outcome: str  # "exact", "refused" or "failed" (a defect: neither exact nor refused with a reason)
    detail: str  # the chains converted, or the reason
    convert_s: float


def _tokens(batch: int = 2, length: int = 8, vocab: int = 64, low: int = 0) -> torch.Tensor:
    return torch.randint(low, vocab, (batch, length))


def _x_transformers(attn: str, vision: bool = False, **options) -> Built:
    import x_transformers as xt

    layers = getattr(xt, attn)(dim=32, depth=3, heads=2, **options)
    if vision:
        return xt.ViTransformerWrapper(image_size=16, patch_size=4, num_classes=10, attn_layers=layers), \
            (torch.randn(2, 3, 16, 16),), {}
    return xt.TransformerWrapper(num_tokens=64, max_seq_len=16, attn_layers=layers), (_tokens(),), {}


def _x_transformers_encoder_decoder() -> Built:
    from x_transformers import XTransformer

    model = XTransformer(dim=32, enc_num_tokens=64, enc_depth=2, enc_heads=2, enc_max_seq_len=16, dec_num_tokens=64,
                         dec_depth=2, dec_heads=2, dec_max_seq_len=16)
    return model, (_tokens(), _tokens()), {}  # (source, target): the training loss


def _esm2() -> Built:
    from esm.model.esm2 import ESM2

    return ESM2(num_layers=3, embed_dim=32, attention_heads=2), (_tokens(low=4, vocab=24),), {}


def _perceiver() -> Built:
    from perceiver_pytorch import Perceiver

    model = Perceiver(input_channels=3, input_axis=2, num_freq_bands=4, max_freq=10.0, depth=2, num_latents=8,
                      latent_dim=32, cross_heads=1, latent_heads=2, cross_dim_head=16, latent_dim_head=16,
                      num_classes=10, self_per_cross_attn=2)
    return model, (torch.randn(2, 6, 6, 3),), {}


def _perceiver_io() -> Built:
    from perceiver_pytorch import PerceiverIO

    model = PerceiverIO(dim=32, queries_dim=32, logits_dim=10, depth=3, num_latents=8, latent_dim=32, cross_heads=1,
                        latent_heads=2, cross_dim_head=16, latent_dim_head=16)
    return model, (torch.randn(2, 8, 32),), {"queries": torch.randn(2, 4, 32)}


def _fms(family: str) -> Built:
    import importlib

    module = importlib.import_module(f"fms.models.{family}")
    if family == "llama":
        model = module.LLaMA(module.LLaMAConfig(src_vocab_size=64, emb_dim=32, nheads=2, nlayers=3, multiple_of=16,
                                                max_expected_seq_len=32))
    elif family == "gpt_bigcode":
        model = module.GPTBigCode(module.GPTBigCodeConfig(src_vocab_size=64, emb_dim=32, nheads=2, nlayers=3,
                                                          max_expected_seq_len=32))
    elif family == "mixtral":
        model = module.Mixtral(module.MixtralConfig(src_vocab_size=64, dim=32, nheads=2, kvheads=1, nlayers=3,
                                                    num_experts=4, top_k_experts=2, hidden_dim=32,
                                                    max_expected_seq_len=32))
    else:
        model = module.RoBERTa(module.RoBERTaConfig(src_vocab_size=64, emb_dim=32, nheads=2, nlayers=3, max_pos=32,
                                                    pad_id=1))
    model.reset_parameters()
    if hasattr(model, "post_init"):
        model.post_init()  # fms's loader does this: rotary tables, tied weights
    return model, (_tokens(low=2),), {}


def _conformer() -> Built:
    from conformer import Conformer

    model = Conformer(dim=32, depth=2, dim_head=16, heads=2, ff_mult=2, conv_expansion_factor=2, conv_kernel_size=3)
    return model, (torch.randn(2, 8, 32),), {}


def _dit() -> Built:
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=3,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return model, (torch.randn(2, 4, 8, 8), torch.tensor([3, 7]), torch.tensor([1, 2])), {"return_dict": False}


def _sd3() -> Built:
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8)
    args = (torch.randn(2, 4, 8, 8), torch.randn(2, 6, 32), torch.randn(2, 16), torch.tensor([3, 7]))
    return model, args, {"return_dict": False}


def _linformer() -> Built:
    from linformer import LinformerLM

    return LinformerLM(num_tokens=64, dim=32, seq_len=8, depth=3, heads=2, k=4), (_tokens(),), {}


def _vit_pytorch(module: str, cls: str) -> Built:
    vit = _module_file("vit_pytorch", module)
    model = getattr(vit, cls)(image_size=16, patch_size=4, num_classes=10, dim=32, depth=3, heads=2, mlp_dim=64)
    return model, (torch.randn(2, 3, 16, 16),), {}


def _performer() -> Built:
    from performer_pytorch import PerformerLM

    model = PerformerLM(num_tokens=64, max_seq_len=16, dim=32, depth=3, heads=2, causal=True, nb_features=16)
    return model, (_tokens(),), {}


def _reformer() -> Built:
    from reformer_pytorch import ReformerLM

    model = ReformerLM(num_tokens=64, dim=32, depth=2, max_seq_len=16, heads=2, bucket_size=4, n_hashes=1, causal=True)
    return model, (_tokens(length=16),), {}


def _module_file(package: str, module: str):
    """``package.module`` loaded from its file alone: vit-pytorch's ``__init__`` imports torchvision for
    models the zoo does not use (and torchvision does not import beside the CPU torch wheel)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"No module named '{package}' (pip install --no-deps -r "
                                  "benchmarks/zoo-requirements.txt)")
    path = Path(next(iter(spec.submodule_search_locations))) / f"{module}.py"
    name = f"_zoo_{package}_{module}"
    if name not in sys.modules:
        loaded = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(sys.modules[name])
    return sys.modules[name]


ZOO = [
    ZooModel("x-transformers-decoder", "x-transformers", "decoder", lambda: _x_transformers("Decoder")),
    ZooModel("x-transformers-decoder-relpos", "x-transformers", "decoder",
             lambda: _x_transformers("Decoder", rel_pos_bias=True, ff_glu=True, use_rmsnorm=True)),
    ZooModel("x-transformers-encoder", "x-transformers", "encoder", lambda: _x_transformers("Encoder")),
    ZooModel("x-transformers-encoder-decoder", "x-transformers", "encoder-decoder", _x_transformers_encoder_decoder),
    ZooModel("x-transformers-vit", "x-transformers", "vision", lambda: _x_transformers("Encoder", vision=True)),
    ZooModel("esm2", "fair-esm", "encoder (protein)", _esm2),
    ZooModel("perceiver", "perceiver-pytorch", "encoder (cross-attention)", _perceiver),
    ZooModel("perceiver-io", "perceiver-pytorch", "encoder-decoder (queries)", _perceiver_io),
    ZooModel("fms-llama", "ibm-fms", "decoder", lambda: _fms("llama")),
    ZooModel("fms-gpt-bigcode", "ibm-fms", "decoder", lambda: _fms("gpt_bigcode")),
    ZooModel("fms-mixtral", "ibm-fms", "decoder (MoE)", lambda: _fms("mixtral")),
    ZooModel("fms-roberta", "ibm-fms", "encoder", lambda: _fms("roberta")),
    ZooModel("conformer", "conformer", "speech encoder", _conformer),
    ZooModel("dit", "diffusers", "vision (diffusion)", _dit),
    ZooModel("sd3-mmdit", "diffusers", "vision (diffusion, two streams)", _sd3),
    ZooModel("linformer-lm", "linformer", "decoder", _linformer),
    ZooModel("vit", "vit-pytorch", "vision", lambda: _vit_pytorch("vit", "ViT")),
    ZooModel("simple-vit", "vit-pytorch", "vision", lambda: _vit_pytorch("simple_vit", "SimpleViT")),
    ZooModel("performer-lm", "performer-pytorch", "decoder", _performer),
    ZooModel("reformer-lm", "reformer-pytorch", "decoder (reversible already)", _reformer),
]


def _floats(output) -> list[torch.Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _grads(model: nn.Module, args: tuple, kwargs: dict, seed: int) -> list[torch.Tensor | None]:
    model.train()
    torch.manual_seed(seed)
    loss = sum(t.float().square().mean() for t in _floats(model(*args, **kwargs)))
    return list(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True))


def _equal(got: list, want: list) -> bool:
    return len(got) == len(want) and all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b)) for a, b in zip(got, want))


def check(entry: ZooModel) -> ZooResult:
    """Convert ``entry``'s model and check it (module docstring); never raises for the model's sake."""
    version = importlib.metadata.version(entry.package)
    result = ZooResult(entry.name, entry.package, version, entry.kind, "failed", "", 0.0)
    torch.manual_seed(0)
    model, args, kwargs = entry.build()
    start = time.perf_counter()
    try:
        converted = bdia_fx.convert(model, args, kwargs)
    except ConversionError as exc:
        result.outcome, result.detail = "refused", str(exc)
        result.convert_s = time.perf_counter() - start
        return result
    except Exception as exc:  # a defect of bdia_fx: reported, not hidden
        result.detail = f"convert raised {type(exc).__name__}: {exc}"
        return result
    result.convert_s = time.perf_counter() - start
    try:
        stored = bdia_fx.convert(model, args, kwargs, config=BDIAConfig(mode="stored"))
        exact = _equal(_grads(converted, args, kwargs, 1), _grads(stored, args, kwargs, 1))
        reverted = bdia_fx.revert(converted).eval()
        model.eval()
        with torch.no_grad():
            want = _floats(model(*args, **kwargs))
            same = _equal(_floats(reverted(*args, **kwargs)), want)
            gap, scale = _gap(_floats(converted.eval()(*args, **kwargs)), want)
    except Exception as exc:
        result.detail = f"training or revert raised {type(exc).__name__}: {exc}"
        return result
    chains = ", ".join(f"'{c.container}' ({len(c.blocks)} blocks)" for c in bdia_fx.report_of(converted).chains)
    close = gap <= EVAL_TOLERANCE * max(1.0, scale)  # the chain's own steps, γ = 0: the original up to Q's rounding
    if exact and same and close:
        result.outcome = "exact"
    result.detail = (f"chains {chains}; eval (γ = 0, quantized) within {gap:.1g} of the original"
                     + ("" if exact else "; gradients differ from stored mode")
                     + ("" if same else "; reverted output differs from the original")
                     + ("" if close else f" (more than {EVAL_TOLERANCE:.0%} of its scale {scale:.2g})"))
    return result


EVAL_TOLERANCE = 0.02  # of the output's scale: measured gaps are at most 0.7 % (fixed point at 2^-9, 3-6 steps)


def _gap(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[float, float]:
    """The largest |got − want| over the outputs, and the largest |want|."""
    if len(got) != len(want):
        return float("inf"), 0.0
    return (max((float((g - w).abs().max()) for g, w in zip(got, want)), default=0.0),
            max((float(w.abs().max()) for w in want), default=0.0))


def run(names: list[str] | None = None) -> list[ZooResult]:
    entries = [e for e in ZOO if names is None or e.name in names]
    unknown = set(names or ()) - {e.name for e in entries}
    if unknown:
        raise SystemExit(f"unknown zoo models {sorted(unknown)}; known: {[e.name for e in ZOO]}")
    results = []
    for entry in tqdm(entries, desc="zoo", unit="model", disable=None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the packages' own deprecation notes
            results.append(check(entry))
    return results


def summary(results: list[ZooResult]) -> str:
    exact = sum(r.outcome == "exact" for r in results)
    refused = sum(r.outcome == "refused" for r in results)
    packages = len({r.package for r in results})
    return (f"{exact} of {len(results)} models from {packages} packages convert exactly, {refused} refused with the "
            "reason")


def markdown(results: list[ZooResult]) -> str:
    rows = [f"| {r.package} | {r.version} | {r.name} | {r.kind} | {r.outcome} | {r.detail.replace('|', '/')} | "
            f"{r.convert_s:.1f} |" for r in results]
    return "\n".join([
        "# The zoo: third-party transformers",
        "",
        "Transformer implementations from packages other than transformers, each built from a small config and",
        "converted as its user would: `bdia_fx.convert(model, example_inputs)`. *exact*: one training step's",
        "gradients are bit-identical to the stored-activation run of the same forward, the reverted model's",
        "eval output equals the original's, and the converted model's own eval (its chain steps at γ = 0, in",
        "fixed point) is within 2 % of the output's scale of the original (the gap is shown).",
        "*refused*: convert raised `ConversionError`; the reason is its message.",
        "Written by `python benchmarks/zoo.py --markdown docs/zoo.md` (the packages pinned in",
        "[`benchmarks/zoo-requirements.txt`](../benchmarks/zoo-requirements.txt), installed by `tools/dev.sh`);",
        "`tests/benchmarks/test_zoo.py` checks every row against a fresh run in CI. Convert seconds are on a",
        "2-core CPU and include `torch.export`.",
        "",
        f"**{summary(results)}.**",
        "",
        "| package | version | model | kind | result | chains or reason | convert s |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "x-transformers keeps each layer as `ModuleList([norms, block, residual])` and its parent loop calls the",
        "parts one by one (`x = residual(block(norm(x)), x)`): each layer is one step h(x) = block(norm(x)), the",
        "stream matched from the norm's call to the block's, and the relative position bias the parent passes to",
        "every attention block gets its gradient as a parameter read from outside the block (docs/guide.md).",
        "",
        "## Why the refused ones are refused",
        "",
        "- **RoBERTa** (ibm-fms) and **Conformer** normalise after the residual add (post-LN): a block is not",
        "  x + h(x). `BDIAConfig(residual_only=False)` trains such chains experimentally (docs/accuracy.md).",
        "- **SD3's MM-DiT** blocks carry two residual streams (image and text); a BDIA chain carries one.",
        "- **Reformer** is reversible already (RevNet couplings of two halves): its blocks return both halves.",
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these models")
    parser.add_argument("--markdown", type=Path, help="write the table as markdown (docs/zoo.md)")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # bdia_fx's notes on each capture: the table says what matters
    results = run(args.only)
    width = max(len(r.name) for r in results)
    print(f"{'model':<{width}}  {'package':<18} {'result':<8} {'convert s':>9}  chains or reason")
    for r in results:
        print(f"{r.name:<{width}}  {r.package + ' ' + r.version:<18} {r.outcome:<8} {r.convert_s:>9.1f}  "
              f"{r.detail[:160]}")
    print(summary(results))
    if args.markdown:
        args.markdown.write_text(markdown(results))
    if args.json:
        write_json([dataclasses.asdict(r) for r in results], args.json)
    if any(r.outcome == "failed" for r in results):
        raise SystemExit("some models neither converted exactly nor were refused with a reason (see 'failed')")


if __name__ == "__main__":
    main()
