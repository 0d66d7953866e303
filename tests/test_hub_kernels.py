"""bdia_fx.hub_kernels: forwards the kernels package wraps are found, bypassed only under compile and only
while not kernelized, follow every copy of the converted model, and are gone after revert."""

from __future__ import annotations

import copy
import io
import types

import pytest
import torch

import bdia_fx
from bdia_fx.hub_kernels import UnwrappedForward, kernel_wrapped, kernelized
from bdia_fx.module_tree import shallow_clone

from models import gpt2, llama


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    model = llama(2)
    if not kernel_wrapped(model.model.layers[0].self_attn):
        pytest.skip("this transformers version does not wrap Llama's forwards with the kernels package")
    ids = torch.randint(0, 64, (2, 8))
    return model, bdia_fx.convert(model, (ids,), {"use_cache": False}), ids


def test_only_forwards_of_the_kernels_package_are_found():
    assert not kernel_wrapped(gpt2(1).transformer.h[0].attn)
    assert not kernel_wrapped(torch.nn.Linear(2, 2))


def test_the_blocks_wrapped_forwards_get_one_and_the_users_model_none(converted):
    model, conv, _ = converted
    for original, copied in zip(model.model.layers, conv.model.layers):
        forward = vars(copied.self_attn).get("forward")
        assert isinstance(forward, UnwrappedForward) and forward.module is copied.self_attn
        assert "forward" not in vars(original.self_attn)


@pytest.mark.parametrize("how", ["shallow_clone", "deepcopy", "pickle"])
def test_every_copy_calls_its_own_module(converted, how):
    _, conv, ids = converted
    if how == "shallow_clone":
        copied = shallow_clone(conv)
    elif how == "deepcopy":
        copied = copy.deepcopy(conv)
    else:
        buffer = io.BytesIO()
        torch.save(conv, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    attention = copied.model.layers[0].self_attn
    assert vars(attention)["forward"].module is attention
    if how == "shallow_clone":
        return  # revert's first step: the structure only
    with torch.no_grad():
        assert torch.equal(copied.eval()(ids, use_cache=False).logits, conv.eval()(ids, use_cache=False).logits)


def test_eagerly_the_wrapper_runs_and_kernelized_means_another_forward_chosen(converted):
    _, conv, _ = converted
    attention = conv.model.layers[0].self_attn
    assert not kernelized(attention)
    func = next(iter(attention._kernel_funcs.values()))
    func.forward = types.MethodType(lambda self, *a, **k: type(self).forward(self, *a, **k), func)
    try:
        assert kernelized(attention)
    finally:
        del func.forward
    assert not kernelized(attention)
    assert kernelized(torch.nn.Linear(2, 2))  # a module without the wrapper's table is never bypassed
