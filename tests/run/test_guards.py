"""What a recompute reads, guarded: changes between forward and backward raise where plain autograd
raises and are exact where it is exact (parameters, buffers, side inputs, module state)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import bdia_fx
from bdia_fx import BDIAConfig, ReversibilityError

from cases import assert_close, grads, mean_square_loss
from models import HelperResidualStack, ResidualMLP, SharedModuleStack, Stack, TinyGPT


def _set_grads_and_step(model):
    params = list(model.blocks.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    torch.optim.SGD(params, lr=0.1).step()


def _load_fresh_weights(model):
    model.blocks.load_state_dict(TinyGPT(layers=4, dropout=0.1).blocks.state_dict())


def _ema_write_back(model):
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.copy_(0.9 * p + 0.1 * torch.randn_like(p))


def _add_a_constant_read_through_layer_norm(model):
    """Rows of a LayerNorm output sum to ~0, so W + c leaves the forward's codes as they were: only a
    version counter sees this edit (its gradient for the block input changes)."""
    with torch.no_grad():
        model.blocks[2].mlp[0].weight.add_(1.0)


EDITS = {"optimizer.step": _set_grads_and_step, "load_state_dict": _load_fresh_weights,
         "ema-write-back": _ema_write_back, "weight.add_": _add_a_constant_read_through_layer_norm}


@pytest.mark.parametrize("edit", EDITS)
def test_a_parameter_changed_in_place_before_backward_raises_like_plain_autograd(edit):
    torch.manual_seed(0)
    model = TinyGPT(layers=4, dropout=0.1)
    ids = torch.randint(0, 50, (2, 8))
    for variant in (model, bdia_fx.convert(model, (ids,), config=BDIAConfig(mode="stored"))):
        loss = mean_square_loss(variant.train()(ids))
        EDITS[edit](variant)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    rev = bdia_fx.convert(model, (ids,)).train()
    loss = mean_square_loss(rev(ids))
    EDITS[edit](rev)
    with pytest.raises(ReversibilityError,
                       match=r"\[module 'blocks\.\d'\] parameter 'blocks\.\d\..*' was modified in place"):
        loss.backward()


def test_parameters_replaced_by_new_objects_before_backward_give_exact_gradients():
    """Plain autograd keeps the forward's tensors; the recompute runs with the forward's objects too."""
    torch.manual_seed(0)
    model = TinyGPT(layers=4, dropout=0.1)
    ids = torch.randint(0, 50, (2, 8))
    ref = bdia_fx.convert(model, (ids,), config=BDIAConfig(mode="stored"))
    _, want = grads(ref, (ids,), {}, 3)
    rev = bdia_fx.convert(model, (ids,)).train()
    old = list(rev.parameters())
    torch.manual_seed(3)
    loss = mean_square_loss(rev(ids))
    rev.blocks.load_state_dict(TinyGPT(layers=4).blocks.state_dict(), assign=True)
    got = torch.autograd.grad(loss, old)
    assert_close(got, want)
    assert rev.blocks[0].ln1.weight is not old[2]  # the new objects stay in the model


class _MaskedBlock(ResidualMLP):
    def forward(self, x, mask):
        return x + self.lin(self.ln(x)) * mask


class _MaskedStack(Stack):
    def forward(self, x, mask):
        for layer in self.layers:
            x = layer(x, mask)
        return x


def test_a_side_input_changed_in_place_before_backward_raises_naming_it():
    model = _MaskedStack([_MaskedBlock() for _ in range(3)])
    x, mask = torch.randn(4, 8, requires_grad=True), torch.ones(4, 8)
    rev = bdia_fx.convert(model, (x, mask)).train()
    loss = rev(x, mask).sum()
    mask.mul_(0.5)
    with pytest.raises(ReversibilityError, match=r"layers\.2.*side input 'args\[1\]'.*modified in place"):
        loss.backward()


STATE_CHANGES = {
    "model.eval()": lambda m: m.eval(),
    "block.eval()": lambda m: m.blocks[1].eval(),
    "dropout.p": lambda m: setattr(m.blocks[1].mlp[3], "p", 0.5),
}


@pytest.mark.parametrize("change", STATE_CHANGES)
def test_module_state_changed_before_backward_is_replayed_exactly(change):
    """Plain autograd keeps the forward's dropout masks, so a later .eval() or a new p changes nothing;
    the recompute runs under the training flags and attributes the forward saw."""
    torch.manual_seed(0)
    model = TinyGPT(layers=4, dropout=0.1)
    ids = torch.randint(0, 50, (2, 8))
    results = {}
    for mode in ("stored", "reversible"):
        conv = bdia_fx.convert(model, (ids,), config=BDIAConfig(mode=mode)).train()
        torch.manual_seed(5)
        loss = mean_square_loss(conv(ids))
        STATE_CHANGES[change](conv)
        results[mode] = torch.autograd.grad(loss, list(model.parameters()))
        assert (conv.blocks[1].mlp[3].p == 0.5) == (change == "dropout.p")  # the change stays after backward
        assert conv.blocks[1].training == (change == "dropout.p")
        model.blocks[1].mlp[3].p = 0.1
    assert_close(results["reversible"], results["stored"])


class _CountingBlock(ResidualMLP):
    """Scales its branch by a call counter: the recompute must see the forward's count."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.lin(self.ln(x)) * (1.0 + 0.01 * self.calls)


def test_a_call_counter_is_replayed_and_not_counted_twice():
    torch.manual_seed(0)
    model = Stack([_CountingBlock() for _ in range(3)])
    x = torch.randn(4, 8, requires_grad=True)
    rev = bdia_fx.convert(model, (x,))
    ref = bdia_fx.convert(model, (x,), config=BDIAConfig(mode="stored"))
    for layer in model.layers:
        layer.calls = 0
    _, want = grads(ref, (x,), {}, 1, extra=(x,))
    for layer in model.layers:
        layer.calls = 0
    _, got = grads(rev, (x,), {}, 1, extra=(x,))
    assert_close(got, want)
    assert [layer.calls for layer in rev.layers] == [1, 1, 1]


class _LazyAttribute(ResidualMLP):
    """Sets an attribute in its first forward and takes another path once it exists."""

    def forward(self, x):
        scale = 2.0 if hasattr(self, "seen") else 1.0
        self.seen = True
        return x + self.lin(self.ln(x)) * scale


def test_an_attribute_the_forward_creates_is_absent_again_in_the_recompute():
    torch.manual_seed(1)
    model = Stack([_LazyAttribute() for _ in range(3)])
    x = torch.randn(4, 8, requires_grad=True)
    got_want = []
    for mode in ("reversible", "stored"):
        conv = bdia_fx.convert(model, (x,), config=BDIAConfig(mode=mode)).train()
        for layer in conv.layers:
            layer.__dict__.pop("seen", None)
        torch.manual_seed(2)
        got_want.append(torch.autograd.grad(conv(x).sum(), x))
        assert all(layer.seen for layer in conv.layers)
    assert_close(*got_want)


def test_buffers_replaced_or_edited_are_guarded_like_parameters():
    class Scaled(ResidualMLP):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.ones(8))

        def forward(self, x):
            return x + self.lin(self.ln(x)) * self.scale

    model = Stack([Scaled() for _ in range(3)])
    x = torch.randn(4, 8, requires_grad=True)
    rev = bdia_fx.convert(model, (x,)).train()
    loss = rev(x).sum()
    model.layers[1].scale.add_(1.0)
    with pytest.raises(ReversibilityError, match=r"buffer 'layers\.1\.scale' was modified in place"):
        loss.backward()
    nn.init.ones_(model.layers[1].scale)


class _KeepsAttention(ResidualMLP):
    """Keeps a tensor of its last call in an attribute that starts as None (a plain value)."""

    def __init__(self):
        super().__init__()
        self.last_branch = None

    def forward(self, x):
        self.last_branch = self.lin(self.ln(x))
        return x + self.last_branch


def test_an_attribute_that_was_none_at_the_forward_survives_the_recompute():
    model = Stack([_KeepsAttention() for _ in range(3)])
    x = torch.randn(4, 8, requires_grad=True)
    rev = bdia_fx.convert(model, (x,)).train()
    rev(x).sum().backward()
    assert all(isinstance(layer.last_branch, torch.Tensor) for layer in rev.layers)


def test_a_submodule_replaced_before_backward_gives_exact_gradients():
    """Plain autograd keeps the replaced submodule's tensors; the recompute runs the forward's submodule."""
    torch.manual_seed(0)
    model = TinyGPT(layers=4, dropout=0.1)
    ids = torch.randint(0, 50, (2, 8))
    _, want = grads(bdia_fx.convert(model, (ids,), config=BDIAConfig(mode="stored")), (ids,), {}, 3)
    rev = bdia_fx.convert(model, (ids,)).train()
    params = list(rev.parameters())
    torch.manual_seed(3)
    loss = mean_square_loss(rev(ids))
    rev.blocks[2].mlp = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32), nn.Dropout(0.1))
    assert_close(torch.autograd.grad(loss, params), want)
    assert isinstance(rev.blocks[2].mlp[0], nn.Linear) and rev.blocks[2].mlp[0].out_features == 128


def test_blocks_in_eval_mode_inside_a_training_chain_train_as_one_chain():
    """Freezing some blocks with .eval() (no dropout there) keeps the chain one reversible chain."""
    torch.manual_seed(0)
    model = TinyGPT(layers=4, dropout=0.2)
    ids = torch.randint(0, 50, (2, 8))
    results = []
    for mode in ("reversible", "stored"):
        conv = bdia_fx.convert(model, (ids,), config=BDIAConfig(mode=mode)).train()
        conv.blocks[0].eval()
        conv.blocks[1].eval()
        torch.manual_seed(4)
        results.append(torch.autograd.grad(mean_square_loss(conv(ids)), list(model.parameters())))
    assert_close(*results)


def test_after_backward_the_graph_keeps_no_side_input_alive():
    """What a recompute reads is held by the checkpointed step, which autograd frees with the saved
    tensors: a loss kept for logging does not keep masks or encoder states alive."""
    model = _MaskedStack([_MaskedBlock() for _ in range(3)])
    x = torch.randn(4, 8, requires_grad=True)
    rev = bdia_fx.convert(model, (x, torch.ones(4, 8))).train()
    mask = torch.ones(4, 8)
    loss = rev(x, mask).sum()
    loss.backward()
    kept = weakref.ref(mask)
    del mask
    gc.collect()
    assert kept() is None and loss.grad_fn is not None


def test_the_guards_walk_modules_as_named_modules_does_duplicates_included():
    from bdia_fx.run.guards import _modules_of

    block = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 3)))
    block[1].alias = block[0]  # one module under two names
    block.add_module("nothing", None)
    expected = [(name, id(m)) for name, m in block.named_modules(remove_duplicate=False)]
    assert [(name, id(m)) for name, m in _modules_of(block)] == expected and len(expected) == 6


def test_a_pre_norm_parameter_changed_before_backward_raises_naming_it():
    """A layer called part by part (x-transformers): the step's guard covers the layer, pre-norm included."""
    torch.manual_seed(0)
    conv = bdia_fx.convert(HelperResidualStack(), (torch.randn(2, 5, 16),)).train()
    loss = conv(torch.randn(2, 5, 16)).square().mean()
    with torch.no_grad():
        conv.layers[0][0][0].weight.add_(0.1)
    with pytest.raises(ReversibilityError, match=r"parameter 'layers\.0\.0\.0\.weight' was modified in place"):
        loss.backward()


def test_a_parameter_read_from_outside_the_block_changed_before_backward_raises_naming_it():
    torch.manual_seed(0)
    conv = bdia_fx.convert(SharedModuleStack(), (torch.randn(2, 5, 16),)).train()
    loss = conv(torch.randn(2, 5, 16)).square().mean()
    with torch.no_grad():
        conv.shared.weight.mul_(2.0)
    with pytest.raises(ReversibilityError, match=r"'shared\.weight', which this block reads from a module outside "
                                                 r"it, was modified in place"):
        loss.backward()
