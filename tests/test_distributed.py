"""FSDP2 per-block sharding in both orders and DDP, on 2 gloo processes (127.0.0.1, bounded in time)."""

from __future__ import annotations

import functools

import pytest
import torch

import bdia_fx
from bdia_fx import BDIAConfig

from cases import assert_close
from distributed import (
    ddp_gammas_and_gradients,
    fsdp_gradients,
    fsdp_memory_budget,
    fsdp_mixed_precision,
    run_on_two_ranks,
)
from models import TinyGPT, gpt2

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def _batch(shape=(2, 8), vocab=64):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("order", ["shard-after-convert", "convert-sharded-model"])
def test_fsdp2_per_block_sharding_gives_single_process_gradients(order, tmp_path):
    results = run_on_two_ranks(fsdp_gradients, tmp_path, order, _batch)
    torch.manual_seed(0)
    model = gpt2(3, dropout=0.0)
    ids = _batch()
    single = bdia_fx.convert(model, (ids,), {"use_cache": False}, BDIAConfig(gammas=(0.5,))).train()
    single(ids, labels=ids).loss.backward()
    want = {n: p.grad for n, p in single.named_parameters()}
    for result in results:
        assert result["block_params_sharded"]
        assert result["grads"].keys() == want.keys()
        assert_close([result["grads"][n] for n in want], list(want.values()))


def test_fsdp2_per_block_sharding_with_a_memory_budget_honours_it_per_rank_with_single_process_gradients(tmp_path):
    make_batch = functools.partial(_batch, (4, 32))
    results = run_on_two_ranks(fsdp_memory_budget, tmp_path, make_batch, timeout=240.0)
    torch.manual_seed(0)
    model = gpt2(4, 64, dropout=0.0)
    ids = make_batch()
    single = bdia_fx.convert(model, (ids,), {"use_cache": False}, BDIAConfig(gammas=(0.5,), mode="stored")).train()
    single(ids, labels=ids).loss.backward()
    want = {n: p.grad for n, p in single.named_parameters()}
    for result in results:
        assert 0 < result["kept"] < 4
        # FSDP2 over gloo frees some communication buffers asynchronously, so a step's peak varies by a few such
        # buffers (seen: 2.93 MB in the plan's measurement, 3.13 MB in every later step): every step stays within
        # the budget, and the plan's measurement is close to theirs
        assert max(result["measured"]) <= result["budget"] and result["peak"] <= result["budget"]
        assert abs(result["peak"] - max(result["measured"])) <= 0.15 * max(result["measured"])
        assert_close([result["grads"][n] for n in want], list(want.values()))


def test_fsdp2_mixed_precision_trains_a_bfloat16_stream_exactly(tmp_path):
    for result in run_on_two_ranks(fsdp_mixed_precision, tmp_path, _batch):
        assert_close(result["reversible"], result["stored"])


def test_ddp_ranks_draw_their_own_gamma_and_average_to_single_process_gradients(tmp_path):
    make_batch = functools.partial(_batch, (32, 8), 50)
    results = run_on_two_ranks(ddp_gammas_and_gradients, tmp_path, make_batch)
    assert results[1]["seed"] == results[0]["seed"]  # the same global seed; the rank enters each sign's hash
    assert results[0]["signs"].shape == results[1]["signs"].shape == (2 * 16,)  # steps 1, 2 x 16 samples
    assert not torch.equal(results[0]["signs"], results[1]["signs"])
    torch.manual_seed(0)
    model = TinyGPT(layers=3)
    ids = make_batch()
    single = bdia_fx.convert(model, (ids[0::2],), config=BDIAConfig(gammas=(0.5,))).train()
    single(ids).pow(2).mean().backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    for result in results:
        assert_close([result["grads"][n] for n in want], list(want.values()))
