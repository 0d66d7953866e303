"""Hugging Face models as users train them: default configs (use_cache=True), generate(), gradient
checkpointing before or after convert, Trainer, and LoRA adapters in both orders."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import bdia_fx
from bdia_fx import BDIAConfig

from cases import assert_close

DEFAULT_CONFIG_MODELS = {  # only sizes set: use_cache=True, as HF ships them
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=64, n_positions=64,
                                               bos_token_id=0, eos_token_id=0)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=3,
                                                  num_attention_heads=4, num_key_value_heads=2)),
}


def _loss_grads(model, ids, seed=0, **kwargs):
    model.train()
    torch.manual_seed(seed)
    loss = model(ids, labels=ids, **kwargs).loss
    return loss.detach(), torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("family", DEFAULT_CONFIG_MODELS)
def test_default_configs_train_after_a_bare_convert_with_one_warning(family, caplog):
    torch.manual_seed(0)
    model = DEFAULT_CONFIG_MODELS[family]()
    assert model.config.use_cache
    ids = torch.randint(0, 64, (2, 8))
    with caplog.at_level(logging.WARNING, logger="bdia_fx"):
        rev = bdia_fx.convert(model)  # lazily: the first training call is captured
        loss, got = _loss_grads(rev, ids)
        _loss_grads(rev, ids, use_cache=True)  # asked for explicitly: the same, no second warning
    warnings = [r for r in caplog.records if "use_cache=True is incompatible" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].name == "bdia_fx.hf"
    ref = bdia_fx.convert(model, (ids,), config=BDIAConfig(mode="stored"))
    want_loss, want = _loss_grads(ref, ids)
    assert torch.equal(loss, want_loss)
    assert_close(got, want)


def test_generate_first_then_training_and_generate_in_training_mode():
    torch.manual_seed(0)
    model = DEFAULT_CONFIG_MODELS["gpt2"]()
    ids = torch.randint(0, 64, (2, 8))
    conv = bdia_fx.convert(model, (ids,), {"use_cache": False})  # example kwargs without a cache; later calls with
    lazy = bdia_fx.convert(model)
    with torch.no_grad():
        first = lazy.eval().generate(ids, max_new_tokens=4, do_sample=False)  # eval calls are not captured
        assert torch.equal(first, model.eval().generate(ids, max_new_tokens=4, do_sample=False))
    for converted in (conv, lazy):
        _loss_grads(converted, ids)
        converted.train()
        with torch.no_grad():
            assert converted.generate(ids, max_new_tokens=3, do_sample=True).shape == (2, 11)


@pytest.mark.parametrize("order", ["enabled-before-convert", "enabled-after-convert"])
def test_hf_gradient_checkpointing_is_turned_off_on_chain_blocks(order, caplog):
    torch.manual_seed(0)
    model = DEFAULT_CONFIG_MODELS["llama"]()
    ids = torch.randint(0, 64, (2, 8))
    ref = bdia_fx.convert(model, (ids,), config=BDIAConfig(mode="stored"))
    want_loss, want = _loss_grads(ref, ids)
    source = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="bdia_fx"):
        if order == "enabled-before-convert":
            source.gradient_checkpointing_enable()
            conv = bdia_fx.convert(source, (ids,))
        else:
            conv = bdia_fx.convert(source, (ids,))
            conv.gradient_checkpointing_enable()
        loss, got = _loss_grads(conv, ids)
    assert torch.equal(loss, want_loss)
    assert_close(got, want)
    assert not any(layer.gradient_checkpointing for layer in conv.model.layers)
    assert any("turned Hugging Face gradient checkpointing off" in r.getMessage() for r in caplog.records)
    if order == "enabled-before-convert":
        assert all(layer.gradient_checkpointing for layer in source.model.layers)  # the user's model is untouched


class _Gradients(TrainerCallback):
    """The gradients of every optimizer step, taken just before the step."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append([p.grad.clone() for p in model.parameters() if p.grad is not None])


def test_trainer_with_gradient_checkpointing_gives_the_stored_gradients(tmp_path):
    data = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(1))]
    seen = {}
    for mode in ("reversible", "stored"):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=64, n_positions=64,
                                           bos_token_id=0, eos_token_id=0, resid_pdrop=0.1))
        conv = bdia_fx.convert(model, config=BDIAConfig(mode=mode))
        args = TrainingArguments(output_dir=str(tmp_path / mode), per_device_train_batch_size=4, max_steps=2,
                                 gradient_checkpointing=True, learning_rate=1e-3, report_to=[], use_cpu=True, seed=0,
                                 save_strategy="no", logging_strategy="no", disable_tqdm=True)
        seen[mode] = _Gradients()
        Trainer(model=conv, args=args, train_dataset=data, callbacks=[seen[mode]]).train()
    assert len(seen["reversible"].steps) == len(seen["stored"].steps) == 2
    for got, want in zip(seen["reversible"].steps, seen["stored"].steps):
        assert_close(got, want)


def test_trainer_trains_a_model_converted_with_a_memory_budget_with_the_stored_gradients(tmp_path):
    """A budget between the smallest and the plain peak (some blocks kept, the others reversible) under the
    Trainer: every optimizer step's gradients equal those of the stored run."""
    data = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(1))]
    example = torch.randint(0, 64, (4, 8))
    seen, plans = {}, {}
    for mode in ("reversible", "stored"):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=64, n_positions=64,
                                           bos_token_id=0, eos_token_id=0, resid_pdrop=0.1))
        if mode == "reversible":
            full = bdia_fx.report_of(bdia_fx.convert(model, (example,), {"labels": example},
                                                     memory_budget=1.0)).memory_plan
            budget = (full.smallest_peak + full.plain_peak) // 2
            conv = bdia_fx.convert(model, (example,), {"labels": example}, memory_budget=budget)
            plans[mode] = bdia_fx.report_of(conv).memory_plan
        else:
            conv = bdia_fx.convert(model, config=BDIAConfig(mode=mode))
        args = TrainingArguments(output_dir=str(tmp_path / mode), per_device_train_batch_size=4, max_steps=2,
                                 learning_rate=1e-3, report_to=[], use_cpu=True, seed=0, save_strategy="no",
                                 logging_strategy="no", disable_tqdm=True)
        seen[mode] = _Gradients()
        Trainer(model=conv, args=args, train_dataset=data, callbacks=[seen[mode]]).train()
    assert 0 < plans["reversible"].kept < 4
    assert len(seen["reversible"].steps) == len(seen["stored"].steps) == 2
    for got, want in zip(seen["reversible"].steps, seen["stored"].steps):
        assert_close(got, want)


@pytest.mark.parametrize("order", ["lora-then-convert", "convert-then-lora"])
def test_lora_adapters_in_both_orders_train_with_stored_gradients(order):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 8))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_dropout=0.0)
    results = {}
    for mode in ("reversible", "stored"):
        torch.manual_seed(0)
        base = DEFAULT_CONFIG_MODELS["gpt2"]()
        if order == "lora-then-convert":
            model = bdia_fx.convert(get_peft_model(base, lora), (ids,), config=BDIAConfig(mode=mode))
        else:
            model = get_peft_model(bdia_fx.convert(base, (ids,), config=BDIAConfig(mode=mode)), lora)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        results[mode] = _loss_grads(model, ids)
    assert torch.equal(results["reversible"][0], results["stored"][0])
    assert_close(results["reversible"][1], results["stored"][1])


@pytest.mark.parametrize("keyword", ["past_key_values", "cache"])
def test_a_cache_passed_under_either_keyword_is_dropped_from_training_calls(keyword, caplog):
    """transformers < 5.24 passes the cache as ``past_key_values``, 5.24 as ``cache`` (generate's prefill)."""
    from transformers.cache_utils import DynamicCache

    from bdia_fx import hf

    model = DEFAULT_CONFIG_MODELS["gpt2"]()
    warned: set[str] = set()
    with caplog.at_level("WARNING", logger="bdia_fx"):
        kwargs = hf.without_cache(model, {keyword: DynamicCache(), "use_cache": True, "attention_mask": None}, warned)
        again = hf.without_cache(model, {"other_cache": DynamicCache()}, warned)
    assert kwargs == {keyword: None, "use_cache": False, "attention_mask": None}
    assert again == {"other_cache": None, "use_cache": False}  # any transformers Cache, whatever its name
    assert len([r for r in caplog.records if "use_cache" in r.getMessage()]) == 1
