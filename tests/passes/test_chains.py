"""The chain-finding pass on captured graphs."""

import subprocess
import sys

import pytest
import torch

import bdia_fx

from models import (
    HelperResidualStack,
    MoEStack,
    ParentLoopViT,
    ResidualHelper,
    ResidualMLP,
    encoder,
    feed_forward,
    flat_sequential_lm,
    gpt2,
    llama,
    neox,
    residual_sequential,
    swin,
    t5,
    vit,
)


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
    assert rejection.node == "layer_norm_1" and "(node 'layer_norm_1')" in rejection.reason  # the post-add norm
    assert "refused (not converted)" in str(report) and "node 'layer_norm_1'" in str(report)


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
            "assert not {'bdia_fx.run.runtime', 'bdia_fx.run.frame', 'bdia_fx.conversion'} & set(loaded), loaded\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_t5_chains_start_after_the_block_that_makes_the_shared_position_bias():
    ids = torch.randint(1, 64, (2, 8))
    report = bdia_fx.find_chains(t5(4), (ids, torch.ones_like(ids), ids), {"use_cache": False})
    assert [c.block_paths for c in report.chains] == [
        ("encoder.block.1", "encoder.block.2", "encoder.block.3"),
        ("decoder.block.1", "decoder.block.2", "decoder.block.3")]
    assert not report.rejections
    encoder_note, decoder_note = report.notes
    assert encoder_note.startswith("'encoder.block.0' runs as it is") and "from side inputs" in encoder_note
    assert decoder_note.startswith("'decoder.block.0' runs as it is")
    # the bias block 0 computes is a side input of every later block, shared, not a tap on the stream
    (bias,) = [n for n in encoder_note.split("computes ")[1].split(" from")[0].split(", ")]
    assert all(bias in [s.node for s in b.side_inputs] for b in report.chains[0].blocks)


def test_a_block_passing_out_a_value_made_from_the_stream_is_still_refused():
    from models import ResidualMLP

    class Tapping(ResidualMLP):
        def forward(self, x):
            y = x + self.lin(self.ln(x))
            return y, y.mean()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Tapping() for _ in range(3))

        def forward(self, x):
            taps = []
            for block in self.blocks:
                x, tap = block(x)
                taps.append(tap)
            return x, torch.stack(taps)

    report = bdia_fx.find_chains(Model(), (torch.randn(2, 8),))
    assert not report.chains
    (rejection,) = report.rejections
    assert rejection.module == "blocks.0" and "passes 2 values out (add, mean)" in rejection.reason


def test_swin_gives_one_chain_per_stage_one_level_below_the_stages():
    report = bdia_fx.find_chains(swin((2, 3)), (torch.randn(2, 3, 32, 32),))
    assert [c.container for c in report.chains] == [f"swin.encoder.layers.{i}.blocks" for i in range(2)]
    assert [len(c.blocks) for c in report.chains] == [2, 3]
    assert not report.rejections
    (ignored,) = [why for name, why in report.ignored if name == "swin.encoder.layers"]
    assert "searched one level deeper" in ignored


@pytest.mark.parametrize("skip_first", [False, True], ids=["h-plus-x", "x-plus-h"])
def test_residual_adds_in_the_parents_loop_form_one_chain_of_branch_steps(skip_first):
    report = bdia_fx.find_chains(ParentLoopViT(depth=3, skip_first=skip_first), (torch.randn(2, 8, 8),))
    (chain,) = report.chains
    assert chain.container == "layers" and chain.branch
    assert chain.block_paths == ("layers.0.0", "layers.0.1", "layers.1.0", "layers.1.1", "layers.2.0", "layers.2.1")
    assert all(b.stream_out.startswith("add") for b in chain.blocks)
    assert [b.stream_in for b in chain.blocks[1:]] == [b.stream_out for b in chain.blocks[:-1]]
    assert not report.rejections and not report.ignored  # the pairs' containers are part of the chain


def test_a_flat_sequential_lm_chains_its_blocks_and_leaves_the_final_norm_and_head():
    """The final norm reads the last block's residual add, but that add is not its own: it is not a
    post-LN block, and the chain ends before it."""
    report = bdia_fx.find_chains(flat_sequential_lm(layers=3), (torch.randint(0, 64, (2, 8)),))
    (chain,) = report.chains
    assert chain.block_paths == ("1", "2", "3") and not report.rejections
    assert report.notes == ["'0', '4', '5' of '' run as they are (not residual blocks, before or after the chain)"]


def test_a_sequential_of_residual_wrappers_after_an_embedding_is_one_chain():
    report = bdia_fx.find_chains(residual_sequential(depth=2), (torch.randn(2, 8, 8),))
    (chain,) = report.chains
    assert chain.block_paths == ("1", "2", "3", "4") and not chain.branch
    assert report.notes == ["'0' of '' run as they are (not residual blocks, before or after the chain)"]


def test_a_block_updating_its_buffers_under_no_grad_is_refused_with_the_buffer_named():
    """An MoE that counts expert load and moves a routing bias in its forward (inside torch.no_grad(),
    captured as a higher-order op over a submodule): a recompute would update them again."""
    report = bdia_fx.find_chains(MoEStack(), (torch.randn(2, 8, 16),))
    assert not report.chains
    (rejection,) = report.rejections
    assert rejection.container == "blocks" and rejection.module == "blocks.0"
    assert "updates its state 'blocks.0.moe.load' in place in its forward" in rejection.reason
    assert "Keep such state outside the block" in rejection.reason and "strict=False" not in rejection.reason


def test_layers_the_parent_calls_piece_by_piece_are_steps_of_a_pre_norm_and_a_branch():
    """x = residual(branch(norm(x)), x) over ModuleLists per layer (x-transformers): each layer is one step,
    h(x) = branch(norm(x)), its parameters and guard those of the layer."""
    report = bdia_fx.find_chains(HelperResidualStack(), (torch.randn(2, 8, 16),))
    (chain,) = report.chains
    assert chain.branch and chain.block_paths == ("layers.0.1", "layers.1.1", "layers.2.1")
    assert [(b.pre, b.owner) for b in chain.blocks] == [(f"layers.{i}.0.0", f"layers.{i}") for i in range(3)]
    assert not report.rejections


def test_layer_parts_around_more_than_a_pre_norm_are_refused_naming_the_parts():
    """With a norm after the branch too (sandwich), the add's operand is no branch's own output: refused."""
    report = bdia_fx.find_chains(HelperResidualStack(sandwich=True), (torch.randn(2, 8, 16),))
    assert not report.chains
    (rejection,) = report.rejections
    assert (rejection.container, rejection.module) == ("layers", "layers.0")
    assert "never called as one module" in rejection.reason and "the residual add in 'layers.0.2'" in rejection.reason
    assert "'layers.0.0', 'layers.0.1', 'layers.0.2'" in rejection.reason and "Wrap each layer" in rejection.reason


class _SharedRotaryBlock(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln, self.rot, self.f = torch.nn.LayerNorm(d), torch.nn.Linear(d, d), torch.nn.Linear(d, d)

    def forward(self, x, r):
        return x + self.f(self.ln(x)) * r


class _ParentCallsAPartOfBlock0(torch.nn.Module):
    """The parent computes a table with a submodule of block 0, outside block 0's call (as models that
    keep a shared rotary module in their first layer do)."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.layers = torch.nn.ModuleList(_SharedRotaryBlock(d) for _ in range(3))

    def forward(self, x):
        r = self.layers[0].rot(x)
        for layer in self.layers:
            x = layer(x, r)
        return x


def test_a_part_of_a_called_block_that_the_parent_calls_stays_outside_the_block():
    report = bdia_fx.find_chains(_ParentCallsAPartOfBlock0(), (torch.randn(2, 8),))
    (chain,) = report.chains
    assert chain.block_paths == ("layers.0", "layers.1", "layers.2") and not report.rejections
    assert [b.n_nodes for b in chain.blocks] == [4, 4, 4]  # layer norm, linear, mul, add: not the parent's linear


class _Stage(torch.nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.blocks = torch.nn.ModuleList(ResidualMLP(d) for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class _StagesWithDownsampling(torch.nn.Module):
    """Stages of residual blocks, the parent transforming the stream after each stage (as Swin does)."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.stages = torch.nn.ModuleList(_Stage(d) for _ in range(2))
        self.downs = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(2))

    def forward(self, x):
        for stage, down in zip(self.stages, self.downs):
            x = down(stage(x))
        return x


def test_stages_the_parent_transforms_between_are_searched_one_level_deeper():
    report = bdia_fx.find_chains(_StagesWithDownsampling(), (torch.randn(2, 5, 8),))
    assert [c.container for c in report.chains] == ["stages.0.blocks", "stages.1.blocks"] and not report.rejections


class _HelperNoNorm(torch.nn.Module):
    """Per layer [branch, residual helper]: x = residual(branch(x), x)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.ModuleList([feed_forward(d, dropout=0.0), ResidualHelper()])
                                          for _ in range(3))

    def forward(self, x):
        for branch, residual in self.layers:
            x = residual(branch(x), x)
        return x


def test_a_residual_helper_adding_a_branch_of_the_stream_itself_is_a_branch_chain():
    report = bdia_fx.find_chains(_HelperNoNorm(), (torch.randn(2, 5, 16),))
    (chain,) = report.chains
    assert chain.block_paths == ("layers.0.0", "layers.1.0", "layers.2.0") and not report.rejections
