"""The reversible schemes: bit-exact inversion on integer codes, and their order measured on Kepler."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bdia_fx
from bdia_fx import fixed_point as fp
from bdia_fx import schemes as sc

ALL = sorted(sc.SCHEMES)


def _field(dim: int, seed: int):
    """A smooth non-autonomous nonlinear vector field with fixed random weights."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    return lambda t, z: torch.tanh(z @ w) * math.cos(t) + 0.1 * z.to(torch.float64).sin().to(z.dtype)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(ALL), shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       h=st.floats(1e-3, 0.7), frac_bits=st.integers(4, 44), steps=st.integers(1, 4), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_every_scheme_undoes_its_steps_bit_for_bit_on_integer_codes(name, shape, h, frac_bits, steps, seed, dtype):
    scheme = sc.SCHEMES[name]
    f = _field(shape[-1], seed)
    field = lambda t, z: f(t, z.to(torch.float64)).to(z.dtype)  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    z0 = torch.randint(-(2 ** (frac_bits + 2)), 2 ** (frac_bits + 2), shape, generator=gen, dtype=torch.int64)
    codes = [z0] + [torch.zeros_like(z0) for _ in scheme.parts[1:]]
    walk = [(scheme.start(field, 0.0), None)] + [(scheme.step(field, k * h, h), k) for k in range(steps)]
    history = []
    for shears, _ in walk:
        for shear in shears:
            history.append(codes)
            codes, _, _ = sc.apply_shear(shear, codes, frac_bits, dtype)
    assert any(not torch.equal(a, b) for a, b in zip(codes, history[0]))  # the walk moved the state
    grads = [torch.zeros(shape, dtype=dtype) for _ in codes]
    for shears, _ in reversed(walk):
        for shear in reversed(shears):
            codes, grads, _ = sc.undo_shear(shear, codes, grads, frac_bits, dtype, [])
            expected = history.pop()
            assert all(torch.equal(a, b) for a, b in zip(codes, expected))
    assert torch.equal(codes[0], z0) and all(not c.any() for c in codes[1:])


def _kepler(e: float):
    """The Kepler problem (GM = a = 1) from perihelion with eccentricity e, and its exact solution."""
    def field(t, z):
        q, p = z[..., :2], z[..., 2:]
        return torch.cat([p, -q / q.square().sum(-1, keepdim=True) ** 1.5], -1)

    def exact(t: float) -> torch.Tensor:
        anomaly = t  # mean anomaly; solve Kepler's equation E − e sin E = M by Newton's method
        for _ in range(50):
            anomaly -= (anomaly - e * math.sin(anomaly) - t) / (1 - e * math.cos(anomaly))
        c, s, b = math.cos(anomaly), math.sin(anomaly), math.sqrt(1 - e * e)
        r = 1 - e * c
        return torch.tensor([c - e, b * s, -s / r, b * c / r], dtype=torch.float64)

    return field, exact


def _errors(scheme: sc.Scheme, field, z0: torch.Tensor, z_end: torch.Tensor, end: float, counts, frac_bits=48):
    """Max error at ``end`` of fixed-step runs on codes, for each number of steps."""
    errors = []
    for n in counts:
        h = end / n
        codes = [fp.to_codes(z0, frac_bits, torch.int64)[0]]
        codes += [torch.zeros_like(codes[0]) for _ in scheme.parts[1:]]
        for k in range(-1, n):
            for shear in scheme.start(field, 0.0) if k < 0 else scheme.step(field, k * h, h):
                codes, _, _ = sc.apply_shear(shear, codes, frac_bits, torch.float64)
        errors.append((sc.read(codes[0], frac_bits, torch.float64) - z_end).abs().max().item())
    return errors


def measured_order(errors, counts) -> float:
    """The slope of log error against log h (least squares)."""
    xs = [math.log(1 / n) for n in counts]
    ys = [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


STEP_COUNTS = {"alf": (32, 64, 128, 256), "alf4": (16, 32, 64, 128),
               "reversible_bosh3": (16, 32, 64, 128), "reversible_dopri5": (64, 128, 256)}


@pytest.mark.parametrize("name", ALL)
def test_order_measured_on_the_kepler_problem_against_its_exact_solution(name):
    scheme = sc.SCHEMES[name]
    field, exact = _kepler(0.5)
    counts = STEP_COUNTS[name]
    errors = _errors(scheme, field, exact(0.0), exact(2.0), 2.0, counts)
    assert errors[-1] < errors[0]
    assert abs(measured_order(errors, counts) - scheme.order) < 0.35, (errors, measured_order(errors, counts))


def test_the_triple_jump_of_a_first_order_scheme_is_not_fourth_order():
    """The slope test can fail: the triple jump lifts symmetric methods only (explicit Euler on z' = cos t
    stays first order; the leapfrog on the same problem reaches 4)."""
    class Euler(sc.Scheme):
        name, order, error_order, parts = "euler", 1, 1, ("z", "zero")

        def start(self, f, t0):
            return []

        def step(self, f, t, h, errors=None):
            return [sc.Shear(0, lambda p: h * f(t, p[1]))]  # the field below does not read z

        def error(self, f, t, h, before, after, errors):
            return after[0] - before[0]

    field = lambda t, z: torch.cos(torch.full_like(z, t))  # noqa: E731 (z' = cos t, z = sin t)
    counts = (16, 32, 64, 128)
    errors = _errors(sc.Composition(sc.AsyncLeapfrog()), field, torch.zeros(1, dtype=torch.float64),
                     torch.full((1,), math.sin(1.0), dtype=torch.float64), 1.0, counts)
    assert measured_order(errors, counts) > 3.5
    euler3 = sc.Composition(Euler())
    errors = _errors(euler3, field, torch.zeros(1, dtype=torch.float64),
                     torch.full((1,), math.sin(1.0), dtype=torch.float64), 1.0, counts)
    assert measured_order(errors, counts) < 1.5


def test_the_schemes_store_no_side_bits_and_start_without_touching_z():
    for scheme in sc.SCHEMES.values():
        assert scheme.side_bits == 0 and scheme.parts[0] == "z"
        assert all(shear.target != 0 for shear in scheme.start(lambda t, z: z, 0.0))


def test_float_step_is_the_unquantized_step():
    scheme = sc.SCHEMES["alf"]
    f = lambda t, z: -z  # noqa: E731
    z, v = torch.tensor([1.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)
    h = 0.1
    s = z + h / 2 * v
    v2 = 2 * f(0.05, s) - v
    z2 = s + h / 2 * v2
    out = scheme.float_step(f, 0.0, h, [z, v])
    assert torch.allclose(out[0], z2, rtol=0, atol=1e-15) and torch.allclose(out[1], v2, rtol=0, atol=1e-15)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="scheme must be"):
        sc.scheme_of("rk45")
    with pytest.raises(ValueError, match="weights must sum to 1"):
        sc.Composition(sc.AsyncLeapfrog(), weights=(0.5, 0.4))


def test_bdia_is_the_default_chain_scheme_and_odeint_refuses_it():
    from bdia_fx.schemes import BDIA, chain_scheme_of

    assert bdia_fx.BDIAConfig(scheme=BDIA).scheme == "bdia" == bdia_fx.BDIAConfig().scheme
    assert chain_scheme_of("bdia") is BDIA and chain_scheme_of("alf") is sc.SCHEMES["alf"]
    with pytest.raises(ValueError, match="not a shear scheme"):
        bdia_fx.odeint(lambda t, z: -z, torch.ones(2), torch.tensor([0.0, 1.0]), scheme="bdia")
