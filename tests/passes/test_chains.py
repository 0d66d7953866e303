"""The chain-finding pass on captured graphs."""

import subprocess
import sys

import torch

import bdia_fx

from models import encoder, gpt2, llama, neox, vit


def test_report_lists_blocks_side_inputs_and_randomness():
    report = bdia_fx.find_chains(gpt2(3), (torch.randint(0, 64, (2, 8)),), {"use_cache": False})
    (chain,) = report.chains
    assert chain.block_paths == ("transformer.h.0", "transformer.h.1", "transformer.h.2")
    assert all(b.random for b in chain.blocks)
    assert chain.blocks[1].stream_in == chain.blocks[0].stream_out
    text = str(report)
    assert "chain 'transformer.h': 3 blocks" in text and "transformer.h.2" in text


def test_vit_chain_is_found_under_wrapper_modules():
    report = bdia_fx.find_chains(vit(3), (torch.randn(2, 1, 16, 16),))
    assert [c.container for c in report.chains] == ["vit.layers"]


def test_rejections_are_reported_with_module_and_reason():
    report = bdia_fx.find_chains(encoder(2, norm_first=False), (torch.randn(2, 4, 32),))
    assert not report.chains
    (rejection,) = report.rejections
    assert rejection.module == "layers.0" and "post-LN" in rejection.reason
    assert "rejected" in str(report)


def test_dropout_with_p_zero_is_not_random():
    for p, random in ((0.0, False), (0.1, True)):
        report = bdia_fx.find_chains(encoder(2, dropout=p), (torch.randn(2, 4, 32),))
        assert [b.random for b in report.chains[0].blocks] == [random, random]


def test_llama_blocks_read_rotary_tables_and_neox_blocks_are_parallel_residual():
    ids = torch.randint(0, 64, (2, 8))
    (chain,) = bdia_fx.find_chains(llama(2), (ids,), {"use_cache": False}).chains
    assert chain.block_paths == ("model.layers.0", "model.layers.1")
    shapes = [s.shape for s in chain.blocks[0].side_inputs]
    assert sum(1 for shape in shapes if shape is not None and shape[-1] == 8) >= 2  # cos and sin, head dim 8
    (chain,) = bdia_fx.find_chains(neox(2), (ids,), {"use_cache": False}).chains
    assert chain.block_paths == ("gpt_neox.layers.0", "gpt_neox.layers.1")
    assert all(b.random for b in chain.blocks)


def test_the_passes_import_no_part_of_the_runtime():
    code = ("import sys, bdia_fx.passes\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('bdia_fx'))\n"
            "assert not {'bdia_fx.runtime', 'bdia_fx.frame', 'bdia_fx.conversion'} & set(loaded), loaded\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
