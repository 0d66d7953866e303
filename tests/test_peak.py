"""bdia_fx.peak: a training step's allocations read from torch's profiler, cut into the phases of its chain steps,
and probe steps that leave the model as they found it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bdia_fx
from bdia_fx.memory import default_loss, saved_activation_bytes
from bdia_fx.peak import measure_step, preserved_training_state

from models import TinyGPT

CPU = torch.device("cpu")


class _Temporary(nn.Module):
    """A forward whose largest moment is one temporary of known size beside its output."""

    def forward(self, x):
        big = x.repeat(64, 1)  # 64× the input, freed at the end of the forward
        return x * big.sum()


def test_the_peak_is_the_largest_allocation_above_what_existed_before_the_step():
    x = torch.randn(256, 256, requires_grad=True)
    x.grad = torch.zeros_like(x)
    step = measure_step(_Temporary(), lambda: default_loss(_Temporary()(x)), CPU)
    temporary = 64 * x.numel() * 4
    assert temporary <= step.peak < temporary + 4 * x.numel() * 4  # the temporary, the output, a few scalars
    assert step.phases[0].start == 0


def test_a_converted_chain_step_has_a_forward_and_a_backward_phase_per_block_and_the_head_between():
    torch.manual_seed(0)
    model, ids = TinyGPT(layers=4), torch.randint(0, 50, (2, 9))
    converted = bdia_fx.convert(model, (ids,))
    with preserved_training_state(converted):
        step = measure_step(converted, lambda: default_loss(converted(ids)), CPU)
    assert step.blocks == tuple(("blocks", i) for i in range(4))
    kinds = [(p.kind, p.block) for p in step.phases]
    assert kinds == ([("forward", ("blocks", i)) for i in range(4)] + [("head", None)]
                     + [("backward", ("blocks", i)) for i in reversed(range(4))])
    assert step.peak == max(p.peak for p in step.phases)
    head = step.phases[4]
    with preserved_training_state(converted):  # what backward keeps is alive when the head starts
        assert head.start >= saved_activation_bytes(converted, lambda: default_loss(converted(ids)))


def test_probe_steps_leave_gradients_buffers_modes_and_random_state_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    x = torch.randn(8, 4)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    stats = model[1].running_mean.clone()
    rng = torch.get_rng_state()
    with preserved_training_state(model):
        model.train()
        assert model[0].bias.grad is not None and torch.equal(model[0].bias.grad, torch.zeros(4))
        torch.rand(3)
        model(x).sum().backward()
    assert model[0].bias.grad is None and torch.equal(model[0].weight.grad, torch.ones(4, 4))
    assert torch.equal(model[1].running_mean, stats) and not model.training
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_peak_is_what_max_memory_allocated_counts():
    torch.manual_seed(0)
    device = torch.device("cuda")
    model, ids = TinyGPT(layers=4).to(device), torch.randint(0, 50, (4, 32), device=device)
    converted = bdia_fx.convert(model, (ids,))
    with preserved_training_state(converted):
        converted.train()
        default_loss(converted(ids)).backward()  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        default_loss(converted(ids)).backward()
        torch.cuda.synchronize()
        want = torch.cuda.max_memory_allocated() - before
        step = measure_step(converted, lambda: default_loss(converted(ids)), device)
    assert step.peak == want
