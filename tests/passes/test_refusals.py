"""Each refusal of bdia_fx.convert names where detection stopped, what it expected and found, and the fix."""

# Index of the refusal kinds that reach a user at convert time, each with the test asserting its message
# ("here": this file; other files relative to tests/).
#
# The call (bdia_fx/conversion.py, bdia_fx/calls.py, passes/capture.py)
#   not an nn.Module; config not a BDIAConfig; example_inputs not a tuple (TypeError)
#       here: test_a_call_of_the_wrong_type_says_what_was_expected_and_got
#   already converted
#       here: test_an_already_converted_model_is_refused_at_the_root_with_the_fix
#   no example inputs
#       here: test_a_capture_without_example_inputs_says_what_to_pass
#   torch.export capture failure
#       passes/test_capture.py::test_a_capture_that_fails_names_the_model_and_torchs_reason
# One block (passes/chains.py, _scan_block)
#   block modifies its input in place
#       test_convert.py::test_a_block_mutating_a_side_input_is_refused_for_the_true_reason
#   block passes N values out
#       passes/test_chains.py::test_a_block_passing_out_a_value_made_from_the_stream_is_still_refused
#   a later block passes out values made from side inputs only
#       here: test_a_later_block_passing_out_values_made_from_side_inputs_is_named
#   block carries several residual streams
#       here: test_a_block_carrying_two_residual_streams_is_named_in_the_no_chain_error
#   block output is a norm after the add (post-LN)
#       passes/test_chains.py::test_rejections_are_reported_with_module_and_reason
#       test_convert.py::test_residual_only_false_trains_post_ln_blocks_exactly (the residual_only=False fix)
#   block output is not a residual add
#       here: test_a_non_residual_block_inside_a_chain_is_named_with_its_output_node
#   no path of adds back to the stream input
#       here: test_no_chain_found_lists_each_candidate_with_its_own_reason ('mix.layers')
#   in-place op on the residual stream
#       test_convert.py::test_refuses_in_place_ops_on_the_stream
#   block updates its own state (an MoE's load counter under no_grad)
#       passes/test_chains.py::test_a_block_updating_its_buffers_under_no_grad_is_refused_with_the_buffer_named
#       test_convert.py::test_a_block_that_updates_its_buffers_in_forward_is_refused_at_convert_with_the_true_cause
#   a buffer updated in training (BatchNorm)
#       here: test_a_batchnorm_block_is_refused_naming_the_buffer_it_updates
# The chain (passes/chains.py, find_chains_in_graph, _chain_problem, _uncalled_block)
#   shared weights: one module under several numbers, numbered blocks and parent-loop adds
#       here: test_one_module_under_several_numbers_is_refused_as_shared_weights
#   a layer never called as one module (the parent calls its parts)
#       passes/test_chains.py::test_layer_parts_around_more_than_a_pre_norm_are_refused_naming_the_parts
#   fewer than 2 blocks
#       here: test_a_single_block_is_refused_naming_it_and_the_count
#   the parent transforms the stream between blocks
#       here: test_a_parent_transforming_the_stream_between_blocks_is_refused_naming_both_values
#   a tap on the stream between numbered blocks (output_hidden_states)
#       here: test_a_tap_on_the_stream_between_numbered_blocks_names_the_value_and_its_reader
#   several refused chains
#       here: test_several_refusals_give_the_first_and_count_the_others
#       test_convert.py::test_strict_false_converts_the_chains_that_can_be_and_keeps_the_others (the strict=False fix)
#   no chain found, with the ignored candidates
#       here: test_no_chain_found_lists_each_candidate_with_its_own_reason
#       here: test_no_chain_found_in_a_model_without_numbered_children_says_so
# Parent-loop chains (passes/branches.py)
#   a tap on the stream between branch steps
#       here: test_a_tap_on_the_stream_between_branch_steps_names_the_value_and_its_reader
# Stream slots (bdia_fx/calls.py, stream_slots)
#   no single tensor passes from one block to the next
#       test_calls.py::test_recorded_calls_give_one_slot_per_block_and_refuse_an_ambiguous_handover
# Sublayer steps (granularity="sublayer", passes/sublayers.py)
#   a branch reads a stream value older than its step's input
#       passes/test_sublayers.py::test_a_branch_reading_an_older_stream_value_is_refused_naming_the_add
#       passes/test_sublayers.py::test_convert_refuses_an_unsplittable_block_before_changing_anything
#   a node of one sublayer read again by the next
#       here: test_a_value_read_by_two_sublayers_is_refused_naming_the_node_and_the_fix
#   block output not x + h(x) (a post-LN block accepted with residual_only=False)
#       here: test_a_post_ln_block_cannot_be_split_into_sublayers
# Blocks called more than once in one forward (numbered and parent-loop)
#       here: test_blocks_called_more_than_once_in_a_forward_are_refused_for_it
# A parent-loop branch updating its own state
#       here: test_a_parent_loop_branch_updating_its_state_is_refused_at_convert
# Not reached by any tiny model on torch 2.13, so untested here: passes/branches.py "in-place op ... on the
#   residual stream" (a module writing its input leaves the graph with two values and is not a branch step);
#   passes/capture.py draft_export failures other than data-dependent branches; passes/plan.py "a step reads ..."
#   (an internal invariant).

from __future__ import annotations

import pytest
import torch
from torch import nn

import bdia_fx
from bdia_fx import BDIAConfig, ConversionError

from models import PreNorm, ResidualMLP, Stack, encoder


def _refusal(model: nn.Module, args: tuple, **kwargs) -> ConversionError:
    """The ConversionError that ``bdia_fx.convert(model, args, **kwargs)`` raises; its message is one line."""
    with pytest.raises(ConversionError) as info:
        bdia_fx.convert(model, args, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


def _x() -> torch.Tensor:
    return torch.randn(2, 8)


class _Loop(nn.Module):
    """Residual adds in the parent's loop (``x = layer(x) + x``); with ``tap`` the stream after every step
    is also returned."""

    def __init__(self, layers, tap: bool = False):
        super().__init__()
        self.layers, self.tap = nn.ModuleList(layers), tap

    def forward(self, x):
        seen = []
        for layer in self.layers:
            x = layer(x) + x
            seen.append(x)
        return (x, torch.stack(seen)) if self.tap else x


@pytest.mark.parametrize("call, message", [
    (lambda: bdia_fx.convert(lambda x: x), "expected an nn.Module, got function"),
    (lambda: bdia_fx.convert(Stack([ResidualMLP() for _ in range(2)]), (_x(),), config={"mode": "stored"}),
     "config must be a BDIAConfig, got dict"),
    (lambda: bdia_fx.convert(Stack([ResidualMLP() for _ in range(2)]), {"x": _x()}),
     "example_inputs must be a tuple of positional arguments (or one tensor), got dict"),
], ids=["not-a-module", "config", "example-inputs"])
def test_a_call_of_the_wrong_type_says_what_was_expected_and_got(call, message):
    """A wrong argument type is a TypeError naming the type expected and the type given."""
    with pytest.raises(TypeError) as info:
        call()
    assert str(info.value) == message


def test_an_already_converted_model_is_refused_at_the_root_with_the_fix():
    """Converting a converted model names the root module and says to convert the original."""
    conv = bdia_fx.convert(Stack([ResidualMLP() for _ in range(2)]), (_x(),))
    error = _refusal(conv, (_x(),))
    assert error.module == "" and error.node is None
    assert str(error) == "[module '<root>'] Stack is already converted; convert the original model"


class _DefaultInput(Stack):
    def forward(self, x=None):
        return super().forward(torch.ones(2, 8) if x is None else x)


def test_a_capture_without_example_inputs_says_what_to_pass():
    """A lazily converted model's first training call without arguments is refused, saying what to pass."""
    conv = bdia_fx.convert(_DefaultInput([ResidualMLP() for _ in range(2)])).train()
    with pytest.raises(ConversionError) as info:
        conv()
    assert info.value.module == "" and "\n" not in str(info.value)
    assert str(info.value).startswith("[module '<root>'] no example inputs: pass example_inputs / example_kwargs")


class _Bias(ResidualMLP):
    """x + lin(ln(x)) * b, passing b on; b is made from ``pos`` unless given."""

    def forward(self, x, pos, bias=None):
        b = pos * 2.0 if bias is None else bias
        return x + self.lin(self.ln(x)) * b, b


class _BiasStack(Stack):
    """As T5, block 0 makes the bias the later blocks share, but block 2 makes its own again."""

    def forward(self, x):
        pos, bias = torch.ones(8), None
        for index, layer in enumerate(self.layers):
            x, bias = layer(x, pos, None if index in (0, 2) else bias)
        return x


def test_a_later_block_passing_out_values_made_from_side_inputs_is_named():
    """Only the first block may make values for the later ones: block 2 doing it is refused, naming the values."""
    error = _refusal(_BiasStack([_Bias() for _ in range(4)]), (_x(),))
    assert error.module == "layers.2" and error.node.startswith("add")
    assert "block computes values from side inputs only and passes them out to the later blocks (mul" in error.reason


class _TwoStreams(nn.Module):
    def __init__(self):
        super().__init__()
        self.f, self.g = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, y):
        return x + self.f(x), y + self.g(y)


class _TwoStreamStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_TwoStreams() for _ in range(3))

    def forward(self, x, y):
        for layer in self.layers:
            x, y = layer(x, y)
        return x + y


def test_a_block_carrying_two_residual_streams_is_named_in_the_no_chain_error():
    """A dual-stream block (x + f(x), y + g(y)) is named with both stream values and what a chain carries."""
    error = _refusal(_TwoStreamStack(), (_x(), _x()))
    assert error.module == ""
    assert ("'layers': its numbered children are not residual blocks ('layers.0': block carries 2 residual streams "
            "(add, add_1: each x + h of its own input") in error.reason
    assert "a BDIA chain carries one" in error.reason


class _MaybeResidual(ResidualMLP):
    def __init__(self, residual: bool = True):
        super().__init__()
        self.residual = residual

    def forward(self, x):
        h = self.lin(self.ln(x))
        return x + h if self.residual else h


def test_a_non_residual_block_inside_a_chain_is_named_with_its_output_node():
    """A block of the chain's class returning lin(ln(x)) is refused naming it, its output op and node."""
    error = _refusal(Stack([_MaybeResidual(), _MaybeResidual(), _MaybeResidual(False), _MaybeResidual()]), (_x(),))
    assert error.module == "layers.2" and error.node.startswith("linear")
    assert error.reason == (f"block output is aten.linear.default (node '{error.node}'), not a residual add: "
                            "the block is not x + h(x)")


class _BatchNormBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        return x + self.bn(self.lin(x))


def test_a_batchnorm_block_is_refused_naming_the_buffer_it_updates():
    """BatchNorm in training updates its statistics: the refusal names the buffer, the node and the ways out."""
    error = _refusal(Stack([_BatchNormBlock() for _ in range(3)]), (_x(),))
    assert error.module == "layers.0" and f"(node '{error.node}'" in error.reason
    assert "block updates its state 'layers.0.bn.num_batches_tracked' in place in its forward" in error.reason
    assert "BatchNorm statistics" in error.reason and "Keep such state outside the block" in error.reason


@pytest.mark.parametrize("build", [Stack, _Loop], ids=["numbered-blocks", "parent-loop-adds"])
def test_one_module_under_several_numbers_is_refused_as_shared_weights(build):
    """ALBERT-style sharing (one module as layers.0, .1, .2), numbered blocks or branches, names the container."""
    error = _refusal(build([PreNorm(8, nn.Linear(8, 8))] * 3), (_x(),))
    assert error.module == "layers.0" and error.node is None
    assert error.reason.startswith("the numbered children of 'layers' are one module object used 3 times (shared "
                                   "weights")
    assert error.reason.endswith("a chain needs one module per block")


def test_a_single_block_is_refused_naming_it_and_the_count():
    """One residual block is no chain: the refusal names it, the count found and the count needed."""
    error = _refusal(Stack([ResidualMLP()]), (_x(),))
    assert error.module == "layers.0"
    assert str(error) == "[module 'layers.0'] fewer than 2 blocks (1): BDIA needs a chain of at least 2"


class _HalvesAfterBlock1(Stack):
    def forward(self, x):
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index == 1:
                x = x * 0.5
        return x


@pytest.mark.parametrize("blocks", [3, 4])
@pytest.mark.parametrize("residual_only", [True, False])
def test_a_parent_transforming_the_stream_between_blocks_is_refused_naming_both_values(blocks, residual_only):
    """x * 0.5 between blocks 1 and 2: the refusal names block 2, the value it got and the one expected (also
    when block 2 is the last, which is not trimmed off the chain as a non-residual child)."""
    error = _refusal(_HalvesAfterBlock1([ResidualMLP() for _ in range(blocks)]), (_x(),),
                     config=BDIAConfig(residual_only=residual_only))
    assert error.module == "layers.2" and error.node.startswith("mul")
    assert error.reason == (f"stream input '{error.node}' is not the previous block's output 'add_1': "
                            "the parent transforms the stream between blocks")


class _TwiceOver(Stack):
    def forward(self, x):
        for _ in range(2):  # the blocks run again: weights shared across depth
            for layer in self.layers:
                x = layer(x)
        return x


class _LoopTwice(_Loop):
    def forward(self, x):
        for _ in range(2):
            for layer in self.layers:
                x = layer(x) + x
        return x


@pytest.mark.parametrize("build", [_TwiceOver, _LoopTwice], ids=["numbered-blocks", "parent-loop-adds"])
def test_blocks_called_more_than_once_in_a_forward_are_refused_for_it(build):
    """A parent that runs its blocks twice is refused for the repeated call, naming the block and the count."""
    error = _refusal(build([PreNorm(8, nn.Linear(8, 8)) if build is _LoopTwice else ResidualMLP()
                            for _ in range(3)]), (_x(),))
    assert error.module == "layers.0" and error.node is None
    assert "'layers.0' is called 2 times in one forward" in error.reason


class _Counting(nn.Module):
    """A branch whose forward counts its calls in a buffer (under no_grad, as load-balancing MoEs do)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        with torch.no_grad():
            self.calls += 1
        return self.lin(x)


def test_a_parent_loop_branch_updating_its_state_is_refused_at_convert():
    """``x = branch(x) + x`` over branches that write their buffers: refused at convert, naming the buffer."""
    error = _refusal(_Loop([_Counting() for _ in range(3)]), (_x(),))
    assert error.module == "layers.0"
    assert "block updates its state 'layers.0.calls' in place in its forward" in error.reason


class _Tapped(Stack):
    def forward(self, x):
        seen = []
        for layer in self.layers:
            x = layer(x)
            seen.append(x)
        return x, torch.stack(seen)


def test_a_tap_on_the_stream_between_numbered_blocks_names_the_value_and_its_reader():
    """Returning every block's output (output_hidden_states) is refused naming the value and the node reading it."""
    error = _refusal(_Tapped([ResidualMLP() for _ in range(3)]), (_x(),))
    assert (error.module, error.node) == ("layers.0", "add")
    assert error.reason.startswith("stream value 'add' between 'layers.0' and 'layers.1' is also used by stack "
                                   "outside the chain (output_hidden_states or a layer-wise tap)")


def test_a_tap_on_the_stream_between_branch_steps_names_the_value_and_its_reader():
    """A parent loop keeping the stream after each ``x = f(x) + x`` is refused naming the add and its reader."""
    error = _refusal(_Loop([PreNorm(8, nn.Linear(8, 8)) for _ in range(3)], tap=True), (_x(),))
    assert (error.module, error.node) == ("layers.0", "add")
    assert error.reason.startswith("stream value 'add' after 'layers.0' is also used by stack outside the chain")


class _OneAndShared(nn.Module):
    def __init__(self):
        super().__init__()
        shared = ResidualMLP()
        self.b, self.c = Stack([ResidualMLP()]), Stack([shared, shared])

    def forward(self, x):
        return self.c(self.b(x))


def test_several_refusals_give_the_first_and_count_the_others():
    """Two refused chains and none convertible: the first is named, the other counted, no strict=False advice."""
    error = _refusal(_OneAndShared(), (_x(),))
    assert error.module == "b.layers.0"
    assert error.reason == ("fewer than 2 blocks (1): BDIA needs a chain of at least 2 "
                            "(and 1 more; see bdia_fx.find_chains)")


class _TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.f, self.g = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.f(x) + self.g(x)


class _Parallel(Stack):
    def forward(self, x):
        return sum(layer(x) for layer in self.layers)


class _NoChain(nn.Module):
    """Four candidates, each ignored for a reason of its own."""

    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        self.mix = Stack([_TwoLinears(), _TwoLinears()])
        self.par = _Parallel([ResidualMLP(), ResidualMLP()])
        self.odd = nn.Sequential(ResidualMLP(), nn.Linear(8, 8), ResidualMLP())

    def forward(self, x):
        return self.odd(self.par(self.mix(self.head(x))))


def test_no_chain_found_lists_each_candidate_with_its_own_reason():
    """The no-chain refusal lists every candidate container, each with its own reason (naming the child)."""
    error = _refusal(_NoChain(), (_x(),))
    assert error.module == "" and error.reason.startswith("no residual block chain found in _NoChain ('")
    reasons = {
        "head": "its numbered children are not residual blocks ('head.0': block output is aten.linear.default",
        "odd": "its numbered children are of different classes and not all residual blocks ('odd.1': block output "
               "is aten.linear.default",
        "mix.layers": "its numbered children are not residual blocks ('mix.layers.0': block output is not x + h(x): "
                      "no path of adds leads back to the stream input)",
        "par.layers": "its numbered children do not feed one another",
    }
    for name, why in reasons.items():
        assert f"'{name}': {why}" in error.reason, name


def test_no_chain_found_in_a_model_without_numbered_children_says_so():
    """A model with no numbered children has no candidate: the refusal says that instead of listing none."""
    error = _refusal(nn.Linear(8, 8), (_x(),))
    assert str(error) == ("[module '<root>'] no residual block chain found in Linear "
                          "(no module with numbered child blocks)")


class _SharedNoise(nn.Module):
    """Both residual sublayers read one random draw."""

    def __init__(self):
        super().__init__()
        self.a, self.m = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        noise = torch.rand(8)
        y = x + self.a(x) * noise
        return y + self.m(y) * noise


def test_a_value_read_by_two_sublayers_is_refused_naming_the_node_and_the_fix():
    """granularity="sublayer" cannot cut a block whose sublayers share a random draw: the node and the fix are named."""
    error = _refusal(Stack([_SharedNoise() for _ in range(3)]), (_x(),), config=BDIAConfig(granularity="sublayer"))
    assert error.module == "layers.0"
    assert error.reason == ("sublayer split: node 'rand' of sublayer 0 is read again by sublayer 1; "
                            "use granularity='block'")


def test_a_post_ln_block_cannot_be_split_into_sublayers():
    """residual_only=False accepts post-LN blocks, but not as sublayer steps: the block is named with the reason."""
    error = _refusal(encoder(2, d=16, norm_first=False), (torch.randn(2, 3, 16),),
                     config=BDIAConfig(granularity="sublayer", residual_only=False))
    assert error.module == "layers.0" and error.node.startswith("layer_norm")
    assert error.reason == (f"sublayer split: block output '{error.node}' is not x + h(x) through a path of adds "
                            "(a post-LN block?), so it has no sublayer steps; use granularity='block'")
