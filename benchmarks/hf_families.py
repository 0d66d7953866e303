"""Which HF model families convert: a sweep over tiny configs of causal LMs beyond the tested ones.

For each family and granularity it converts the model, runs one training step in reversible
mode (``verify=True``: every recompute checked) and in stored mode with the same γ draw and
dropout masks, and reports the BDIA steps per chain, the largest parameter-gradient difference
between the two, and the largest eval-logit difference to the original model (quantization).

    python benchmarks/hf_families.py [--families qwen2 opt ...] [--json results/families.json]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import bdia_fx
from bdia_fx.conversion import state_of
from bdia_fx.report import write_json

FAMILIES: dict[str, tuple[str, dict]] = {
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2)),
    "gemma": ("GemmaConfig", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1,
                                  head_dim=8)),
    "phi": ("PhiConfig", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, resid_pdrop=0.1)),
    "falcon": ("FalconConfig", dict(hidden_size=32, num_attention_heads=4, new_decoder_architecture=False,
                                    parallel_attn=True)),
    "bloom": ("BloomConfig", dict(hidden_size=32, n_head=4)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32, dropout=0.1,
                              bos_token_id=0, eos_token_id=0, pad_token_id=1)),
    "gptj": ("GPTJConfig", dict(n_embd=32, n_head=4, rotary_dim=4, resid_pdrop=0.1, bos_token_id=0, eos_token_id=0)),
    "codegen": ("CodeGenConfig", dict(n_embd=32, n_head=4, rotary_dim=4, n_ctx=64, bos_token_id=0, eos_token_id=0)),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(n_embd=32, n_head=4, bos_token_id=0, eos_token_id=0)),
}
LAYERS = 3


def build(family: str) -> torch.nn.Module:
    config_class, overrides = FAMILIES[family]
    config = getattr(transformers, config_class)(vocab_size=64, max_position_embeddings=64, n_positions=64, **overrides)
    for name in ("num_hidden_layers", "n_layer"):
        setattr(config, name, LAYERS)
    return transformers.AutoModelForCausalLM.from_config(config)


def gradients(model: torch.nn.Module, ids: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    model.train()
    torch.manual_seed(3)
    return torch.autograd.grad(model(ids, use_cache=False).logits.pow(2).mean(), params)


def check(family: str, granularity: str) -> dict:
    torch.manual_seed(0)
    model = build(family)
    ids = torch.randint(2, 64, (2, 8))
    kwargs = {"use_cache": False}
    start = time.perf_counter()
    try:
        rev = bdia_fx.convert(model, (ids,), kwargs, bdia_fx.BDIAConfig(verify=True, granularity=granularity))
        ref = bdia_fx.convert(model, (ids,), kwargs, bdia_fx.BDIAConfig(mode="stored", granularity=granularity))
        params = [p for p in model.parameters() if p.requires_grad]
        grad_diff = max(float((a - b).abs().max()) for a, b in zip(gradients(rev, ids, params),
                                                                    gradients(ref, ids, params)))
        with torch.no_grad():
            eval_diff = float((rev.eval()(ids, **kwargs).logits - model.eval()(ids, **kwargs).logits).abs().max())
        exactness = bdia_fx.check_exactness(rev, (ids,), kwargs)
        steps = {name: 1 + sum(b.chain == name for b in exactness.blocks) for name in state_of(rev).runtimes}
        return {"family": family, "granularity": granularity, "ok": True, "steps": steps, "exact": exactness.exact,
                "grad_diff": grad_diff, "eval_diff": eval_diff, "seconds": time.perf_counter() - start}
    except bdia_fx.ConversionError as error:
        return {"family": family, "granularity": granularity, "ok": False, "error": str(error).splitlines()[0],
                "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    print(f"{'family':<12} {'granularity':<10} {'steps':<26} {'rebuild':<9} "
          f"{'grad diff':>10} {'eval diff':>10} {'s':>5}")
    rows = []
    for family in args.families:
        for granularity in ("block", "sublayer"):
            row = check(family, granularity)
            rows.append(row)
            if row["ok"]:
                steps = ", ".join(f"{n}: {k}" for n, k in row["steps"].items())
                exact = "bit-exact" if row["exact"] else "NOT exact"
                print(f"{family:<12} {granularity:<10} {steps:<26} {exact:<9} {row['grad_diff']:>10.1e} "
                      f"{row['eval_diff']:>10.1e} {row['seconds']:>5.1f}", flush=True)
            else:
                print(f"{family:<12} {granularity:<10} refused: {row['error']}", flush=True)
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    main()
