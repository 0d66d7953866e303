"""bdia_fx.odeint: torchdiffeq's convention, accuracy set by tolerances, exact reversible gradients, memory."""

import math

import pytest
import torch
from torch import nn

import bdia_fx
from bdia_fx.schemes import SCHEMES

ALL = sorted(SCHEMES)


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny ops per step: one thread (two on a shared 2-core machine oversubscribe it tenfold)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def oscillator(t, z):
    return torch.stack([z[..., 1], -z[..., 0]], -1)


def oscillator_exact(t: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(t), torch.sin(t)
    return torch.stack([c * z0[0] + s * z0[1], -s * z0[0] + c * z0[1]], -1)


class Field(nn.Module):
    """A small time-dependent MLP vector field."""

    def __init__(self, dim: int = 3, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, dim)).to(dtype)

    def forward(self, t, z):
        return self.net(z) * torch.cos(t)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tolerances_not_the_grid_set_the_accuracy(name, dtype):
    z0 = torch.tensor([1.0, 0.5], dtype=dtype)
    t = torch.tensor([0.0, 0.3, 1.1, 2.0], dtype=dtype)
    exact = oscillator_exact(t.double(), z0.double())
    errors = {}
    for rtol in (1e-3, 1e-5):
        out = bdia_fx.odeint(oscillator, z0, t, scheme=name, rtol=rtol, atol=rtol * 1e-2)
        assert out.shape == (4, 2) and out.dtype == dtype
        assert torch.equal(out[0], z0)  # z0 lies on the default grid
        errors[rtol] = (out.double() - exact).abs().max().item()
    assert errors[1e-3] < 3e-2 and errors[1e-5] < 3e-4
    assert errors[1e-5] < errors[1e-3]  # tighter tolerance, smaller error: the grid is not the limit


def test_agrees_with_torchdiffeq_on_a_neural_field():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    f = Field()
    z0 = torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 0.4, 0.45, 1.7], dtype=torch.float64)  # irregular times
    with torch.no_grad():
        ref = torchdiffeq.odeint(f, z0, t, rtol=1e-12, atol=1e-12)
        for name in ALL:
            out = bdia_fx.odeint(f, z0, t, scheme=name, rtol=1e-8, atol=1e-10)
            assert (out - ref).abs().max() < 1e-6, name


@pytest.mark.parametrize("name", ALL)
def test_reversible_gradients_equal_the_stored_activation_run(name):
    f = Field()
    z0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    weights = torch.randn(3, 4, 3, dtype=torch.float64)
    grads = []
    for reversible in (True, False):
        out = bdia_fx.odeint(f, z0, t, scheme=name, rtol=1e-6, atol=1e-8, reversible=reversible)
        loss = (out * weights).sum() + out[-1].square().sum()
        grads.append(torch.autograd.grad(loss, [z0, *f.parameters()]))
    for a, b in zip(*grads):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_float32_gradients_equal_the_stored_run_too():
    f = Field(dtype=torch.float32)
    z0 = torch.randn(4, 3, requires_grad=True)
    t = torch.tensor([0.0, 1.0])
    grads = [torch.autograd.grad(bdia_fx.odeint(f, z0, t, rtol=1e-5, atol=1e-6, reversible=r).square().sum(),
                                 [z0, *f.parameters()]) for r in (True, False)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_matches_finite_differences_of_the_discrete_solution():
    f = Field()
    z0 = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 0.7, 1.5], dtype=torch.float64)
    direction = torch.randn_like(z0)

    def loss(z):
        return bdia_fx.odeint(f, z, t, scheme="alf4", step_size=0.05).square().sum()

    z = z0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(z), [z])
    eps = 1e-5
    with torch.no_grad():
        fd = (loss(z0 + eps * direction) - loss(z0 - eps * direction)) / (2 * eps)
    assert abs((grad * direction).sum().item() - fd.item()) < 1e-6 * max(1.0, abs(fd.item()))


def test_gradient_of_the_oscillator_is_the_rotation():
    z0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    out = bdia_fx.odeint(oscillator, z0, t, scheme="reversible_dopri5", rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(out[-1, 0], [z0])
    torch.testing.assert_close(grad, torch.tensor([math.cos(2.0), math.sin(2.0)], dtype=torch.float64),
                               rtol=0, atol=1e-8)


def _saved_bytes(f: nn.Module, steps: int, reversible: bool) -> int:
    z0 = torch.randn(64, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    return bdia_fx.saved_activation_bytes(
        f, lambda: bdia_fx.odeint(f, z0, t, scheme="alf", step_size=1 / steps, reversible=reversible).sum())


def test_memory_is_the_final_state_plus_one_scalar_per_step():
    f = Field()
    reversible = {n: _saved_bytes(f, n, True) for n in (10, 100, 1000)}
    assert reversible[100] - reversible[10] == 8 * 90 and reversible[1000] - reversible[100] == 8 * 900
    state = 2 * 64 * 3 * 8  # (z, v) int64 codes
    assert reversible[10] == state + 8 * 10 + 16  # + 10 step sizes and the z0 checksum
    stored = {n: _saved_bytes(f, n, False) for n in (10, 100)}
    assert stored[100] - stored[10] > 100 * (reversible[100] - reversible[10])


def test_adaptive_runs_keep_one_scalar_per_accepted_step():
    f = Field()
    calls = []
    counted = lambda t, z: calls.append(1) or f(t, z)  # noqa: E731
    z0 = torch.randn(64, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 3.0], dtype=torch.float64)

    def solve(tol: float) -> torch.Tensor:
        return bdia_fx.odeint(counted, z0, t, scheme="alf", rtol=tol, atol=tol, params=list(f.parameters()))

    measured = {}
    for rtol in (1e-3, 1e-6):
        out = solve(rtol)
        calls.clear()
        out.sum().backward()
        steps = len(calls) - 1  # backward evaluates the leapfrog's field once per accepted step, once for v_0
        measured[rtol] = steps, bdia_fx.saved_activation_bytes(f, lambda tol=rtol: solve(tol).sum())
    (few, small), (many, large) = measured[1e-3], measured[1e-6]
    assert many > 5 * few, measured
    assert large - small == 8 * (many - few)


def test_closure_tensors_needing_grad_must_be_passed_as_params():
    w = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    z0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="not in params"):
        bdia_fx.odeint(lambda t, z: z @ w, z0, t)
    grads = []
    for reversible in (True, False):
        out = bdia_fx.odeint(lambda t, z: torch.tanh(z @ w), z0, t, params=[w], reversible=reversible)
        grads.append(torch.autograd.grad(out.sum(), [w])[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def test_a_parameter_edited_between_forward_and_backward_is_caught():
    f = Field()
    z0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out = bdia_fx.odeint(f, z0, torch.tensor([0.0, 1.0], dtype=torch.float64))
    with torch.no_grad():
        f.net[0].weight.add_(1e-3)
    with pytest.raises(bdia_fx.ReversibilityError, match="did not rebuild z0"):
        out.sum().backward()


def test_leaving_the_fixed_point_range_raises():
    z0 = torch.tensor([1.0], dtype=torch.float64)
    with pytest.raises(bdia_fx.FixedPointRangeError, match="fixed-point overflow"):
        bdia_fx.odeint(lambda t, z: 10 * z, z0, torch.tensor([0.0, 3.0], dtype=torch.float64), step_size=0.1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_vector_field_raises_instead_of_wrapping_int64_codes(bad):
    z0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    field = lambda t, z: z * bad if t > 0.5 else -z  # noqa: E731
    with pytest.raises(bdia_fx.FixedPointRangeError, match="non-finite"):
        bdia_fx.odeint(field, z0, torch.tensor([0.0, 1.0], dtype=torch.float64), scheme="alf", step_size=0.25)


def test_an_error_estimate_that_never_passes_stops_with_a_clear_error():
    def noise(t, z):
        return torch.randn_like(z) * 1e9  # the estimate does not shrink with h

    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="step size underflowed"):
        bdia_fx.odeint(noise, torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64),
                       scheme="reversible_bosh3", rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kwargs, match", [
    ({"y0": torch.tensor([1], dtype=torch.int64)}, "y0 must be"),
    ({"t": torch.tensor([0.0, 0.0])}, "strictly increasing"),
    ({"t": torch.tensor([0.0])}, "t must be"),
    ({"rtol": -1.0}, "rtol must be"),
    ({"rtol": 0.0, "atol": 0.0}, "adaptive steps need a tolerance"),
    ({"step_size": 0.0}, "step_size must be"),
    ({"frac_bits": 70}, "frac_bits must be"),
    ({"scheme": "rk45"}, "scheme must be"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = {"y0": torch.tensor([1.0]), "t": torch.tensor([0.0, 1.0])} | kwargs
    with pytest.raises(ValueError, match=match):
        bdia_fx.odeint(oscillator if args["y0"].numel() == 2 else (lambda t, z: -z), args.pop("y0"), args.pop("t"),
                       **args)
