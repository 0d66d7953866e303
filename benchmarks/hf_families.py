"""Which HF model families convert: a sweep over tiny configs (causal LMs, encoder–decoders, vision).

For each family and granularity it converts the model, runs one training step in reversible
mode (``verify=True``: every recompute checked) and in stored mode with the same γ draw and
dropout masks, and reports the BDIA steps per chain, the largest parameter-gradient difference
between the two, the largest eval-output difference to the original model (quantization), and
for a refused family the reason.

    python benchmarks/hf_families.py [--families t5 swin ...] [--json results/families.json]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import transformers

import bdia_fx
from bdia_fx.converted import state_of
from bdia_fx.report import write_json

LAYERS = 3
CAUSAL: dict[str, tuple[str, dict]] = {
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2)),
    "mixtral": ("MixtralConfig", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
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
SEQ2SEQ = dict(d_model=32, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64,
               max_position_embeddings=64, dropout=0.1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
               decoder_start_token_id=2)
VISION = dict(image_size=32, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=LAYERS,
              num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.1, num_labels=5)


def _causal(family: str) -> Callable[[], tuple[torch.nn.Module, tuple, dict]]:
    def build():
        config_class, overrides = CAUSAL[family]
        config = getattr(transformers, config_class)(vocab_size=64, max_position_embeddings=64, n_positions=64,
                                                     **overrides)
        for name in ("num_hidden_layers", "n_layer"):
            setattr(config, name, LAYERS)
        return transformers.AutoModelForCausalLM.from_config(config), (torch.randint(3, 64, (2, 8)),), {
            "use_cache": False}
    return build


def _seq2seq(model_class: str, config_class: str, **overrides) -> Callable[[], tuple[torch.nn.Module, tuple, dict]]:
    def build():
        config = getattr(transformers, config_class)(**{**SEQ2SEQ, **overrides})
        ids = torch.randint(3, 64, (2, 8))
        return getattr(transformers, model_class)(config), (ids,), {"decoder_input_ids": ids, "use_cache": False}
    return build


def _t5():
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS,
                                   num_decoder_layers=LAYERS, num_heads=4, decoder_start_token_id=0, pad_token_id=0)
    ids = torch.randint(1, 64, (2, 8))
    return transformers.T5ForConditionalGeneration(config), (ids,), {"decoder_input_ids": ids, "use_cache": False}


def _whisper():
    config = transformers.WhisperConfig(vocab_size=64, num_mel_bins=16, d_model=32, encoder_layers=LAYERS,
                                        decoder_layers=LAYERS, encoder_attention_heads=4, decoder_attention_heads=4,
                                        encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
                                        max_target_positions=32, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                        decoder_start_token_id=0)
    return (transformers.WhisperForConditionalGeneration(config), (torch.randn(2, 16, 32),),
            {"decoder_input_ids": torch.randint(3, 64, (2, 8)), "use_cache": False})


def _vision(model_class: str, config_class: str, **overrides) -> Callable[[], tuple[torch.nn.Module, tuple, dict]]:
    def build():
        config = getattr(transformers, config_class)(**{**VISION, **overrides})
        return getattr(transformers, model_class)(config), (torch.randn(2, 3, 32, 32),), {}
    return build


def _swin():
    config = transformers.SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[2, 2],
                                     num_heads=[2, 4], window_size=4, num_labels=5, drop_path_rate=0.1)
    return transformers.SwinForImageClassification(config), (torch.randn(2, 3, 32, 32),), {}


def _clip():
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                max_position_embeddings=16)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                  num_attention_heads=4)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return transformers.CLIPModel(config), (), {"input_ids": torch.randint(3, 64, (2, 8)),
                                                "pixel_values": torch.randn(2, 3, 32, 32)}


FAMILIES: dict[str, Callable[[], tuple[torch.nn.Module, tuple, dict]]] = {
    **{family: _causal(family) for family in CAUSAL},
    "t5": _t5,
    "bart": _seq2seq("BartForConditionalGeneration", "BartConfig"),
    "mbart": _seq2seq("MBartForConditionalGeneration", "MBartConfig"),
    "whisper": _whisper,
    "vit": _vision("ViTForImageClassification", "ViTConfig"),
    "deit": _vision("DeiTForImageClassification", "DeiTConfig"),
    "swin": _swin,
    "clip": _clip,
}


def _output(out) -> torch.Tensor:
    """The tensor of a model output the checks read: logits, CLIP's image–text logits, or hidden states."""
    for name in ("logits", "logits_per_image", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"no output tensor in {type(out).__name__}")


def gradients(model: torch.nn.Module, args: tuple, kwargs: dict, params: list[torch.Tensor]) -> tuple:
    model.train()
    torch.manual_seed(3)
    return torch.autograd.grad(_output(model(*args, **kwargs)).pow(2).mean(), params, allow_unused=True)


def check(family: str, granularity: str) -> dict:
    torch.manual_seed(0)
    model, args, kwargs = FAMILIES[family]()
    start = time.perf_counter()
    try:
        rev = bdia_fx.convert(model, args, kwargs, bdia_fx.BDIAConfig(verify=True, granularity=granularity))
        ref = bdia_fx.convert(model, args, kwargs, bdia_fx.BDIAConfig(mode="stored", granularity=granularity))
        params = [p for p in model.parameters() if p.requires_grad]
        grad_diff = max(float((a - b).abs().max()) for a, b in zip(gradients(rev, args, kwargs, params),
                                                                    gradients(ref, args, kwargs, params))
                        if a is not None)
        with torch.no_grad():
            eval_diff = float((_output(rev.eval()(*args, **kwargs)) - _output(model.eval()(*args, **kwargs)))
                              .abs().max())
        exactness = bdia_fx.check_exactness(rev, args, kwargs)
        steps = {name: sum(b.chain == name for b in exactness.blocks) for name in state_of(rev).runtimes}
        return {"family": family, "granularity": granularity, "ok": True, "steps": steps, "exact": exactness.exact,
                "grad_diff": grad_diff, "eval_diff": eval_diff, "notes": bdia_fx.report_of(rev).notes,
                "seconds": time.perf_counter() - start}
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
    print(f"{'family':<12} {'granularity':<10} {'steps':<60} {'rebuild':<9} "
          f"{'grad diff':>10} {'eval diff':>10} {'s':>5}")
    rows = []
    for family in args.families:
        for granularity in ("block", "sublayer"):
            row = check(family, granularity)
            rows.append(row)
            if row["ok"]:
                steps = ", ".join(f"{n}: {k}" for n, k in row["steps"].items())
                exact = "bit-exact" if row["exact"] else "NOT exact"
                print(f"{family:<12} {granularity:<10} {steps:<60} {exact:<9} {row['grad_diff']:>10.1e} "
                      f"{row['eval_diff']:>10.1e} {row['seconds']:>5.1f}", flush=True)
            else:
                print(f"{family:<12} {granularity:<10} refused: {row['error']}", flush=True)
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    main()
