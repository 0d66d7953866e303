"""``bdia_fx.odeint`` (module ``bdia_fx.ode``): a neural-ODE solver whose backward rebuilds the trajectory exactly.

torchdiffeq's calling convention (``f(t, z)``; the solution at every time of ``t`` stacked on a new
first dim). The state is held in int64 fixed-point codes and integrated with a reversible scheme
(``bdia_fx.schemes``); adaptive step sizes come from the scheme's error estimate. Kept for backward:
the final state's codes, one float64 step size per accepted step, the number of steps per output
interval and a 16-byte checksum of z_0 — nothing that grows with the state per step. Backward
walks the same steps down, undoing each shear bit for bit and recomputing its increment once for
the vector–Jacobian product; its gradients are those of the same discrete run with every
activation stored (``reversible=False``), to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from bdia_fx import fixed_point as fp
from bdia_fx.errors import FixedPointRangeError, ReversibilityError
from bdia_fx.schemes import Field, Scheme, apply_shear, read, scheme_of, undo_shear

__all__ = ["FRAC_BITS", "odeint"]

FRAC_BITS = {torch.float32: 32, torch.float64: 40}
"""Default fractional bits by state dtype: a grid (2^-32 ≈ 2.3e-10, 2^-40 ≈ 9.1e-13) finer than the
dtype's own spacing at |z| ≈ 1 for float32 and far below the default tolerances for float64, so
tolerances (and the dtype), not the grid, set the accuracy. Exact range |z| < 2^(60 − l): 2^28 and 2^20."""

SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0


@dataclass
class _Run:
    """One forward integration: the outputs, the final codes, the accepted steps and where they end."""

    outputs: list[torch.Tensor]
    codes: list[torch.Tensor]
    steps: list[float]
    counts: list[int]
    z0_checksum: torch.Tensor


@dataclass
class _Solve:
    """Everything fixed for one odeint call."""

    field: Field
    scheme: Scheme
    times: list[float]
    dtype: torch.dtype
    frac_bits: int
    rtol: float
    atol: float
    step_size: float | None
    max_steps: int

    # ------------------------------------------------------------ forward
    def run(self, z0: torch.Tensor, graph: bool = False) -> _Run:
        """Integrate from z0 over ``times``. ``graph``: carry autograd values alongside the codes (the
        stored-activation reference run)."""
        bits, dtype = self.frac_bits, self.dtype
        code0, _ = fp.to_codes(z0.detach(), bits, torch.int64)
        codes = [code0] + [torch.zeros_like(code0) for _ in self.scheme.parts[1:]]
        values = None
        if graph:
            values = [z0 + (read(code0, bits, dtype) - z0).detach()] + \
                     [torch.zeros(z0.shape, dtype=dtype, device=z0.device) for _ in self.scheme.parts[1:]]
        checks = [_magnitude(code0)]
        for shear in self.scheme.start(self.field, self.times[0]):
            codes, values, check = apply_shear(shear, codes, bits, dtype, values)
            checks.append(check)
        self._check_range(checks, "z0 and the scheme's start")
        outputs = [read(codes[0], bits, dtype) if values is None else values[0]]
        steps: list[float] = []
        counts: list[int] = []
        h = self.step_size or self._initial_step(z0.detach())
        for start, end in zip(self.times[:-1], self.times[1:]):
            t, count = start, 0
            fixed = None if self.step_size is None else max(1, math.ceil((end - start) / self.step_size - 1e-9))
            while t < end:
                if len(steps) >= self.max_steps:
                    raise RuntimeError(f"odeint: more than max_steps={self.max_steps} steps before t={end}; "
                                       "loosen rtol/atol or raise max_steps")
                if fixed is not None:
                    h, last = (end - start) / fixed, count == fixed - 1
                else:
                    h = min(h, end - t)
                    last = t + h >= end - 1e-12 * max(abs(end), abs(h))
                    if last:
                        h = end - t
                new_codes, new_values, ratio = self._step(t, h, codes, values, len(steps))
                if fixed is None:
                    factor = SAFETY * ratio ** (-1.0 / (self.scheme.error_order + 1)) if ratio > 0 else MAX_FACTOR
                    h_next = h * min(MAX_FACTOR, max(MIN_FACTOR, factor))
                    if ratio > 1.0:
                        h = h_next
                        if h <= 1e-14 * max(abs(t), abs(end)):
                            raise RuntimeError(f"odeint: the step size underflowed (h={h:.3g}) at t={t:.6g}: the "
                                               "error estimate keeps failing; loosen rtol/atol or check func")
                        continue
                codes, values = new_codes, new_values
                steps.append(h)
                count += 1
                t = end if last else t + h
                if fixed is None:
                    h = h_next
            counts.append(count)
            outputs.append(read(codes[0], bits, dtype) if values is None else values[0])
        return _Run(outputs, codes, steps, counts, fp.checksum(code0))

    def _step(self, t: float, h: float, codes: list[torch.Tensor], values: list[torch.Tensor] | None,
              index: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, float]:
        """One step: its codes and values, and its error ratio (0 for fixed steps); range checked."""
        bits, dtype = self.frac_bits, self.dtype
        errors: list[torch.Tensor] = []
        before_codes = codes
        checks = []
        for shear in self.scheme.step(self.field, t, h, errors):
            codes, values, check = apply_shear(shear, codes, bits, dtype, values)
            checks.append(check)
        if self.step_size is not None:
            self._check_range(checks, f"step {index} (t={t:.6g}, h={h:.3g})")
            return codes, values, 0.0
        with torch.no_grad():
            before = [read(c, bits, dtype) for c in before_codes]
            after = [read(c, bits, dtype) for c in codes]
            error = self.scheme.error(self.field, t, h, before, after, errors)
            scale = self.atol + self.rtol * torch.maximum(before[0].abs(), after[0].abs())
            ratio = (error / scale).square().mean().sqrt().to(torch.float64)
        *magnitudes, ratio_value = torch.stack(checks + [ratio]).tolist()
        self._check_range_values(magnitudes, f"step {index} (t={t:.6g}, h={h:.3g})")
        return codes, values, ratio_value if math.isfinite(ratio_value) else math.inf

    def _initial_step(self, z0: torch.Tensor) -> float:
        """A first step size from the sizes of z0 and f(t0, z0) (Hairer, Nørsett & Wanner's first guess)."""
        with torch.no_grad():
            f0 = self.field(self.times[0], z0)
            scale = self.atol + self.rtol * z0.abs()
            d0 = (z0 / scale).square().mean().sqrt().item()
            d1 = (f0 / scale).square().mean().sqrt().item()
        h = 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-6
        return min(h, self.times[-1] - self.times[0])

    def _check_range(self, checks: list[torch.Tensor], where: str) -> None:
        self._check_range_values(torch.stack(checks).tolist(), where)

    def _check_range_values(self, magnitudes: list[float], where: str) -> None:
        if not all(map(math.isfinite, magnitudes)):  # before max(), which skips a NaN that is not first
            raise FixedPointRangeError(f"odeint: the state or an increment became non-finite at {where}")
        worst = max(magnitudes)
        if worst >= fp.WIDE_CODE_LIMIT:
            raise FixedPointRangeError(
                f"odeint: fixed-point overflow at {where}: |value| reached {worst / 2.0 ** self.frac_bits:.6g}, beyond "
                f"the exact range 2^{60 - self.frac_bits} of int64 codes at frac_bits={self.frac_bits}; "
                "pass a smaller frac_bits")

    # ------------------------------------------------------------ backward
    def step_times(self, steps: Sequence[float], counts: Sequence[int]) -> list[tuple[float, float]]:
        """(t, h) of every accepted step, rebuilt from the step sizes exactly as forward advanced t."""
        out, k = [], 0
        for (start, end), count in zip(zip(self.times[:-1], self.times[1:]), counts):
            t = start
            for j in range(count):
                out.append((t, steps[k]))
                t = end if j == count - 1 else t + steps[k]
                k += 1
        return out

    def reverse(self, codes: list[torch.Tensor], steps: Sequence[float], counts: Sequence[int],
                z0_checksum: torch.Tensor, grad_out: torch.Tensor, params: Sequence[torch.Tensor]
                ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Walk the steps down from the final codes: the gradients w.r.t. z0 and ``params``."""
        bits, dtype, scheme = self.frac_bits, self.dtype, self.scheme
        grads = [grad_out[-1].clone()] + [torch.zeros_like(grad_out[-1]) for _ in scheme.parts[1:]]
        param_grads: list[torch.Tensor | None] = [None] * len(params)

        def undo(shears):
            nonlocal codes, grads
            for shear in reversed(shears):
                codes, grads, pg = undo_shear(shear, codes, grads, bits, dtype, params)
                for i, g in enumerate(pg):
                    if g is not None:
                        param_grads[i] = g if param_grads[i] is None else param_grads[i] + g

        step_times = self.step_times(steps, counts)
        ends = [sum(counts[:i]) for i in range(len(counts) + 1)]
        for interval in range(len(counts) - 1, -1, -1):
            for k in range(ends[interval + 1] - 1, ends[interval] - 1, -1):
                t, h = step_times[k]
                undo(scheme.step(self.field, t, h))
            grads[0] = grads[0] + grad_out[interval]
        undo(scheme.start(self.field, self.times[0]))
        extra_nonzero = any(bool(c.any()) for c in codes[1:])
        if extra_nonzero or not torch.equal(fp.checksum(codes[0]), z0_checksum):
            raise ReversibilityError(
                "odeint: the backward walk did not rebuild z0 bit for bit; the vector field gave different "
                "numbers in backward than in forward (parameters or state changed in between, randomness, "
                "or a non-deterministic kernel)")
        return grads[0], param_grads


def _magnitude(codes: torch.Tensor) -> torch.Tensor:
    return codes.abs().amax().to(torch.float64) if codes.numel() else torch.zeros((), dtype=torch.float64)


class _ReversibleODE(torch.autograd.Function):
    """Forward without a graph; backward rebuilds the trajectory from the final codes (see the module)."""

    @staticmethod
    def forward(ctx, solve: _Solve, z0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        run = solve.run(z0)
        ctx.solve, ctx.counts, ctx.params = solve, run.counts, params
        ctx.save_for_backward(*run.codes, torch.tensor(run.steps, dtype=torch.float64), run.z0_checksum)
        return torch.stack(run.outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        *codes, steps, checksum = ctx.saved_tensors
        grad_z0, param_grads = ctx.solve.reverse(list(codes), steps.tolist(), ctx.counts, checksum, grad_out,
                                                 ctx.params)
        return (None, grad_z0, *param_grads)


# ---------------------------------------------------------------- the front door
def odeint(func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], y0: torch.Tensor, t: torch.Tensor, *,
           scheme: str | Scheme = "alf4", rtol: float = 1e-7, atol: float = 1e-9, step_size: float | None = None,
           frac_bits: int | None = None, params: Sequence[torch.Tensor] | None = None, reversible: bool = True,
           max_steps: int = 100_000) -> torch.Tensor:
    """Solve dy/dt = func(t, y) from y(t[0]) = y0; the solution at every time of ``t``, stacked on dim 0.

    ``func``: an ``nn.Module`` or a function of (t, y), t a 0-dim tensor of ``t``'s dtype. ``scheme``:
    a name from ``bdia_fx.schemes.SCHEMES`` or a :class:`~bdia_fx.schemes.Scheme`. Steps are adaptive
    (``rtol``, ``atol`` on the scheme's error estimate) unless ``step_size`` is given (then each
    interval of ``t`` is cut into equal steps no longer than it). ``frac_bits``: the fixed-point grid,
    by default from y0's dtype (:data:`FRAC_BITS`). ``params``: the tensors ``func`` reads that need
    gradients (default: a module's parameters that require grad; a function reading others raises).
    ``reversible=False`` runs the same discrete scheme with every activation stored (the reference).
    Gradients flow to y0 and ``params``; not to ``t``.
    """
    if not isinstance(y0, torch.Tensor) or y0.dtype not in FRAC_BITS:
        raise ValueError(f"y0 must be a float32 or float64 tensor, got {getattr(y0, 'dtype', type(y0))}")
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() < 2:
        raise ValueError("t must be a 1-D tensor of at least two times")
    if t.requires_grad:
        raise ValueError("t requires grad: bdia_fx.odeint gives no gradients w.r.t. the times")
    times = t.detach().to(torch.float64).tolist()
    if any(b <= a for a, b in zip(times[:-1], times[1:])):
        raise ValueError(f"t must be strictly increasing, got {times}")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if rtol == 0 and atol == 0 and step_size is None:
        raise ValueError("rtol and atol are both 0: adaptive steps need a tolerance (or pass step_size)")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    frac_bits = FRAC_BITS[y0.dtype] if frac_bits is None else frac_bits
    if not 0 <= frac_bits <= 58:
        raise ValueError(f"frac_bits must be in [0, 58], got {frac_bits}")
    if params is None:
        params = [p for p in func.parameters() if p.requires_grad] if isinstance(func, nn.Module) else []
    params = list(params)

    def field(time: float, z: torch.Tensor) -> torch.Tensor:
        return func(torch.tensor(time, dtype=t.dtype, device=t.device), z)

    solve = _Solve(field, scheme_of(scheme), times, y0.dtype, frac_bits, rtol, atol, step_size, max_steps)
    _check_field(field, times[0], y0, params)
    if not torch.is_grad_enabled() or not (y0.requires_grad or params):
        with torch.no_grad():
            return torch.stack(solve.run(y0).outputs)
    if not reversible:
        return torch.stack(solve.run(y0, graph=True).outputs)
    return _ReversibleODE.apply(solve, y0, *params)


def _check_field(field: Field, t0: float, y0: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """f(t0, y0) has y0's shape and dtype, and reads no tensor needing grad outside ``params``."""
    # The probe's graph is dropped on return: keep it out of any saved-tensor accounting around the call.
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x):
        out = field(t0, y0.detach())
    if not isinstance(out, torch.Tensor) or out.shape != y0.shape or out.dtype != y0.dtype:
        raise ValueError(f"func(t, y) must return a tensor of y0's shape {tuple(y0.shape)} and dtype {y0.dtype}, "
                         f"got {getattr(out, 'shape', type(out))} {getattr(out, 'dtype', '')}")
    known = {id(p) for p in params}
    unknown = [v for v in _leaves(out) if id(v) not in known]
    if unknown:
        raise ValueError(f"func reads {len(unknown)} tensor(s) that require grad but are not in params (shapes "
                         f"{[tuple(v.shape) for v in unknown[:4]]}): pass them as params=, or their gradients "
                         "would be silently missing")


def _leaves(out: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors requiring grad that ``out`` was computed from."""
    leaves, seen, stack = [], set(), [out.grad_fn] if out.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.append(variable)
        stack.extend(n for n, _ in node.next_functions)
    return leaves
