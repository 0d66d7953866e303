"""One chain step of a training call: its updates forward, and their reversible backward.

Every scheme's step is a list of updates ``p_t ← σ·p_t + Q[g(p_j, j ≠ t)]`` (:class:`bdia_fx.schemes.Shear`).
:func:`run_step` runs them the one way all chains train:

- ``mode="reversible"``: the increment g is computed under ``no_grad`` and handed to
  :class:`UpdateStep`, an autograd Function that does the fixed-point update and saves nothing per
  element but the packed side bits of a halving update (and, at the chain's last update, the final
  codes). Its backward receives the codes of the state after it, recomputes g once with gradients
  from the rebuilt parts, undoes the update bit for bit and takes the vector–Jacobian product
  (straight-through for Q): σ·g to the target, Jᵀg to the parts g read, to the call's side inputs
  and to the block's parameters, which are inputs of the Function (so DDP and FSDP see them, and
  ``.grad`` accumulates as for any module).
- ``mode="stored"``: the same arithmetic under ordinary autograd (the reference the tests compare
  with); without autograd, the codes alone.

Note: [code carriers]. The state's codes travel between updates as one tensor, all parts stacked
and viewed as floats of the code width (int32 → float32, int64 → float64): a Function output in
forward, and in backward its *gradient* is the rebuilt state, handed from each update's backward to
the one below it. That is how the rebuild flows down without any side channel, so the same code runs
eagerly and traced by ``torch.compile`` (whose graphs can carry no Python state between backward
nodes); the bit views are only ever copied, never computed with. In eager code the backward reads
what the forward recorded (guards, RNG and autocast state) from the call's objects; under compile
the graph fixes module state and the autograd version counters of the saved parameters guard them.

Note: [the backward's peak]. A reversible backward's peak is one block's recompute and its backward,
plus what the step itself holds then; so each update's backward takes the vector–Jacobian product
first, while it holds only the carrier, the parts it reads and g, and undoes the update afterwards,
freeing each code tensor once used; eagerly it writes the rebuilt part into the carrier that came down
(the step is its only consumer) instead of stacking a new one. The block's parameter gradients are
returned (``torch.autograd.grad`` of a loss must receive them, not find them in ``.grad``), so they are
all alive at the end of its recompute's backward: about 1 MiB above a per-node accumulation here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint as checkpoint

from bdia_fx import fixed_point as fp
from bdia_fx.errors import ConversionError, ReversibilityError
from bdia_fx.run.block_maps import StepSource
from bdia_fx.run.frame import ChainCall, recomputing
from bdia_fx.run.guards import StepState
from bdia_fx.schemes import Reads, Shear

__all__ = ["KeptUpdate", "UpdateSpec", "UpdateStep", "apply_update", "enter", "random_state", "random_state_bytes",
           "round_increment", "run_step", "stream", "undo_update"]

_FLOAT_VIEW = {torch.int32: torch.float32, torch.int64: torch.float64}
_CODE_OF = {float_dtype: code_dtype for code_dtype, float_dtype in _FLOAT_VIEW.items()}


# ---------------------------------------------------------------- the update on codes (pure)
def round_increment(g: torch.Tensor, u: Shear, codes: Sequence[torch.Tensor], frac_bits: int,
                    code_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The update codes b = round(2^l · g) (+ the exact term's codes), and g·2^l rounded (float, for the range)."""
    rounded = (g.to(fp.compute_dtype(g.dtype)) * 2.0**frac_bits).round()
    b = rounded.to(code_dtype)
    if u.exact is not None:
        part, multiplier = u.exact
        b = b + codes[part] * multiplier
    return b, rounded


def apply_update(u: Shear, before: torch.Tensor, b: torch.Tensor,
                 side_bits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The target's codes after the update, and (halving, ``side_bits``) the side bits it drops, packed."""
    if u.halving:
        return fp.half_term(before, u.sign).add_(b), fp.pack_side_bits(before) if side_bits else None
    return (before + b if isinstance(u.sign, int) and u.sign == 1 else before * u.sign + b), None


def undo_update(u: Shear, after: torch.Tensor, b: torch.Tensor, bits: torch.Tensor | None) -> torch.Tensor:
    """The target's codes before the update, bit for bit."""
    if u.halving:
        return fp.bdia_inverse(after, b, u.sign, fp.unpack_side_bits(bits, after.shape))
    return after - b if isinstance(u.sign, int) and u.sign == 1 else (after - b) * u.sign


def _times(t: torch.Tensor, factor: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """``t`` times an update's scale or exact multiplier (a per-sample tensor, cast to ``dtype``, or a number)."""
    return t * (factor.to(dtype) if isinstance(factor, torch.Tensor) else factor)


def _stack(codes: Sequence[torch.Tensor], target: int, new: torch.Tensor) -> torch.Tensor:
    return torch.stack([new if i == target else c for i, c in enumerate(codes)])


def _range(t: torch.Tensor) -> torch.Tensor:
    return fp.value_range(t).to(torch.float64)


def _check_range(call: ChainCall, direction: str, kind: str, where: str, t: torch.Tensor) -> None:
    """A range check: recorded for one host read (eager), or a graph assert (compiled)."""
    if not call.compiled:
        call.checks.record(direction, kind, where, _range(t))
        return
    limit = call.scheme.code_limit
    finite = torch.isfinite(t).all() if t.is_floating_point() else True
    inside = t.abs().amax() < limit if t.numel() else True
    torch._assert_async(torch.as_tensor(finite) & torch.as_tensor(inside),
                        f"bdia_fx: [module '{where}'] the stream left the exact fixed-point range or became "
                        f"non-finite ({direction}, {kind}); run eagerly for the full reason")


# ---------------------------------------------------------------- the reversible update
@dataclass
class UpdateSpec:
    """The non-tensor inputs of one :class:`UpdateStep` (constants of a compiled graph)."""

    call: ChainCall
    n: int          # the chain step
    index: int      # the update within the step
    source: StepSource
    parts: int
    last: bool      # the chain's last update: it saves the final codes
    target: int
    halving: bool
    read_grads: tuple[bool, ...]  # per part: whether its value needs a gradient
    n_sides: int
    n_params: int
    params: list[torch.Tensor]  # eager: the forward's parameter objects (compiled: saved tensors)
    guard: StepState | None
    random_state: tuple | None
    checked: bool   # the update runs the block: its recompute is checksummed (verify)


class UpdateStep(torch.autograd.Function):
    """One update of a reversible chain (see the module docstring and Note: [code carriers]).

    Inputs: the spec and the update (non-tensor), the increment g computed under ``no_grad``, the
    target part's value, the carrier, the γ seed, then the values of the other parts, the call's
    side inputs and the block's parameters. Outputs: the target's new value, the new carrier.
    """

    @staticmethod
    def forward(ctx, spec: UpdateSpec, u: Shear, g: torch.Tensor, target: torch.Tensor, carrier: torch.Tensor,
                seed: torch.Tensor | None, *inputs: torch.Tensor):
        ctx.set_materialize_grads(False)
        call = spec.call
        codes = carrier.view(call.code_dtype)
        b, rounded = round_increment(g, u, codes, call.frac_bits, call.code_dtype)
        new, bits = apply_update(u, codes[spec.target], b)
        where = spec.source.path
        _check_range(call, "forward", "update", where, rounded)
        _check_range(call, "forward", "stream", where, new)
        out_carrier = _stack(codes, spec.target, new).view(_FLOAT_VIEW[call.code_dtype])
        n_reads = spec.parts - 1
        sides = inputs[n_reads:n_reads + spec.n_sides]
        saved = [bits, fp.checksum(b) if spec.checked and call.verify else None, seed,
                 out_carrier if spec.last else None]
        params = inputs[n_reads + spec.n_sides:] if call.compiled else ()
        ctx.save_for_backward(*saved, *sides, *params)
        ctx.spec = spec
        return fp.from_codes(new, call.frac_bits, call.dtype), out_carrier

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None, grad_carrier: torch.Tensor | None):
        spec = ctx.spec
        call = spec.call
        where = spec.source.path
        if not call.compiled:
            _refuse_double_backward(where)
            if spec.guard is not None:
                spec.guard.check()  # before the saved tensors' own version checks, which name no block
            call.check_backward_at_end()
        bits, forward_sum, seed, top, *rest = ctx.saved_tensors
        sides = rest[:spec.n_sides]
        params = rest[spec.n_sides:] if call.compiled else spec.params
        after = _carrier_after(spec, top, grad, grad_carrier)
        codes = list(after.view(call.code_dtype).unbind(0))
        if grad is None:
            grad = torch.zeros(codes[0].shape, dtype=call.dtype, device=codes[0].device)
        reads = [None if i == spec.target else
                 fp.from_codes(c, call.frac_bits, call.dtype).requires_grad_(spec.read_grads[i])
                 for i, c in enumerate(codes)]
        fresh_sides = [s.detach().requires_grad_(s.requires_grad) for s in sides]
        sign = call.sign(spec.n, seed)
        u = call.scheme.chain_updates(spec.n, spec.source.bind(fresh_sides), sign)[spec.index]
        with _replaying(spec, call):
            if call.compiled:
                g, vjp = _vjp(spec, call, sign, reads, fresh_sides, params)
            else:
                with torch.enable_grad():
                    g = u.increment(reads)
        # the vector–Jacobian product of g first (straight-through for Q): Note: [the backward's peak]
        if call.compiled:
            read_g, side_g, param_g = vjp(grad.to(g.dtype))
        elif g.requires_grad:  # g may be wider than the stream (BDIA rounds (1+γ)F in float32)
            read_g, side_g, param_g = _pull_back(g, grad.to(g.dtype), reads, fresh_sides, params)
        else:
            read_g, side_g, param_g = [None] * len(reads), [None] * len(sides), [None] * len(params)
        g = g.detach()
        if u.exact is not None:
            part, multiplier = u.exact
            term = _times(grad, multiplier, grad.dtype)
            read_g[part] = term if read_g[part] is None else read_g[part] + term
        grad_target = _times(grad, u.scale, grad.dtype)
        read_g = [g_ for i, g_ in enumerate(read_g) if i != spec.target]
        del reads, fresh_sides, grad
        # then the walk down: the update undone bit for bit, the checks
        b, rounded = round_increment(g, u, codes, call.frac_bits, call.code_dtype)
        del g
        if forward_sum is not None:
            mismatch = (fp.checksum(b) != forward_sum).any()
            if call.compiled:
                torch._assert_async(~mismatch, f"bdia_fx: [module '{where}'] the backward recompute of this block "
                                               "differs from its forward (checksum of its update codes)")
            else:
                call.checks.record("backward", "checksum", where, mismatch)
        _check_range(call, "backward", "update", where, rounded)
        del rounded
        before = undo_update(u, codes[spec.target], b, bits)
        del b
        grad_carrier = _carrier_below(spec, codes, after, before)
        del before
        return (None, None, None, grad_target, grad_carrier, None, *read_g, *side_g, *param_g)


def _carrier_below(spec: UpdateSpec, codes: list[torch.Tensor], after: torch.Tensor,
                   before: torch.Tensor) -> torch.Tensor:
    """The carrier handed to the update below: the state's codes with the target's ``before`` the update
    (eagerly written into the carrier that came down, whose only consumer this step is); at the chain's
    bottom the check that the scheme's extra parts came back to zero, and the observers' rebuilt state."""
    call, where = spec.call, spec.source.path
    if call.compiled or spec.last:
        codes[spec.target] = before
        carrier = torch.stack(codes).view(_FLOAT_VIEW[call.code_dtype])
    else:
        codes[spec.target].copy_(before)
        carrier = after
    if spec.n == 0 and spec.index == 0 and call.verify:  # the bottom: extra parts back to zero
        extra = torch.stack([c.abs().amax() for i, c in enumerate(codes) if i != 0]).amax() != 0
        if call.compiled:
            torch._assert_async(~extra, f"bdia_fx: [module '{where}'] the backward did not return the "
                                        "scheme's extra parts to zero")
        else:
            call.checks.record("backward", "zero", where, extra)
    if spec.index == 0:
        for observer in call.observers:
            observer.state_codes(call, spec.n, torch.stack(codes), rebuilt=True)
    return carrier


class KeptUpdate(torch.autograd.Function):
    """One update of a reversible chain whose block keeps its activations (a memory plan's *kept* step,
    :mod:`bdia_fx.budget`): g is computed with gradients in forward, so its backward is autograd's own, and the
    Function saves the target's codes before the update (one code tensor; no side bits, no recompute). Its
    backward hands g the gradient (straight-through for Q), σ·g to the target, the exact term to its part, and
    passes the carrier down with the target restored, so reversible updates below it rebuild their state as
    usual. The gradients are those of the stored reference, summed in the same grouping (Note: [code carriers]).

    Inputs: the spec and the update (non-tensor), g, the target part's value, the carrier, then the value of
    the exact term's part (or nothing). Outputs: the target's new value, the new carrier.
    """

    @staticmethod
    def forward(ctx, spec: UpdateSpec, u: Shear, g: torch.Tensor, target: torch.Tensor, carrier: torch.Tensor,
                *exact_part: torch.Tensor):
        ctx.set_materialize_grads(False)
        call = spec.call
        codes = carrier.view(call.code_dtype)
        b, rounded = round_increment(g.detach(), u, codes, call.frac_bits, call.code_dtype)
        before = codes[spec.target]
        new, _ = apply_update(u, before, b, side_bits=False)
        _check_range(call, "forward", "update", spec.source.path, rounded)
        _check_range(call, "forward", "stream", spec.source.path, new)
        out_carrier = _stack(codes, spec.target, new).view(_FLOAT_VIEW[call.code_dtype])
        ctx.save_for_backward(before.clone(), out_carrier if spec.last else None)
        ctx.spec, ctx.u, ctx.g_dtype = spec, u, g.dtype
        return fp.from_codes(new, call.frac_bits, call.dtype), out_carrier

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None, grad_carrier: torch.Tensor | None):
        spec, u = ctx.spec, ctx.u
        if not spec.call.compiled:
            _refuse_double_backward(spec.source.path)
            spec.call.check_backward_at_end()
        before, top = ctx.saved_tensors
        after = _carrier_after(spec, top, grad, grad_carrier)
        codes = list(after.view(spec.call.code_dtype).unbind(0))
        exact: tuple = ()
        if grad is None:
            grad_g = grad_target = None
            exact = (None,) if u.exact is not None else ()
        else:
            grad_g, grad_target = grad.to(ctx.g_dtype), _times(grad, u.scale, grad.dtype)
            if u.exact is not None:
                exact = (_times(grad, u.exact[1], grad.dtype),)
        return (None, None, grad_g, grad_target, _carrier_below(spec, codes, after, before), *exact)


def _carrier_after(spec: UpdateSpec, top: torch.Tensor | None, grad: torch.Tensor | None,
                   grad_carrier: torch.Tensor | None) -> torch.Tensor:
    """The state's codes after this update, in backward: saved at the chain's last update, else the carrier's
    gradient from the update above (None when the forward stopped before the chain's last block)."""
    call = spec.call
    if spec.last:
        return _tied_to(top, grad) if call.compiled and grad is not None else top
    if grad_carrier is None:
        raise ReversibilityError(
            f"the forward of chain '{call.container}' ended after this step, before the chain's last block: a "
            "reversible chain rebuilds its inputs from the last block's output, so the parent must call every "
            "block of the chain in each training call (layer dropping and early exits need "
            "BDIAConfig(mode='stored'))", module=spec.source.path)
    return grad_carrier


def _refuse_double_backward(where: str) -> None:
    if torch.is_grad_enabled():
        raise ConversionError(
            "a reversible chain does not support higher-order gradients (create_graph=True: gradient "
            "penalties, double backward); convert with BDIAConfig(mode='stored') for them", module=where)


def _pull_back(g: torch.Tensor, grad: torch.Tensor, reads: Reads, sides: list[torch.Tensor],
               params: Sequence[torch.Tensor]) -> tuple[list, list, list]:
    """The eager vector–Jacobian product of the recomputed g to the parts it read, the side inputs and
    the parameters (returned, so that ``torch.autograd.grad`` of the loss gets them too)."""
    wanted = [r for r in reads if r is not None and r.requires_grad] + [s for s in sides if s.requires_grad] + \
        [p for p in params if p.requires_grad]
    found = iter(torch.autograd.grad(g, wanted, grad, allow_unused=True) if wanted else ())
    read_g = [None if r is None or not r.requires_grad else next(found) for r in reads]
    side_g = [next(found) if s.requires_grad else None for s in sides]
    param_g = [next(found) if p.requires_grad else None for p in params]
    return read_g, side_g, param_g


def _tied_to(carrier: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``carrier``, made data-dependent on the chain's output gradient. Note: [tied to the tangent]:
    under compile the whole walk down depends on forward values only, so AOTAutograd's partitioner
    would move it into the forward graph and save the blocks' activations for the pullbacks; an
    integer ``& 0`` of one gradient element (not folded away) keeps the walk in the backward."""
    word = carrier.view(_CODE_OF[carrier.dtype])
    token = torch.isnan(grad.reshape(-1)[:1]).to(word.dtype) & 0
    return (word | token).view(carrier.dtype)


def _vjp(spec: UpdateSpec, call: ChainCall, sign: torch.Tensor | None, reads: Reads,
         sides: list[torch.Tensor], params: Sequence[torch.Tensor]):
    """g recomputed with ``torch.func.vjp`` (traceable), and the pullback to (reads, sides, params);
    side inputs that need no gradient (masks, position tables) are held fixed."""
    positions = [i for i, r in enumerate(reads) if r is not None]
    trained = [i for i, s in enumerate(sides) if s.requires_grad]

    def increment(read_values, side_values, param_values):
        bound_sides = list(sides)
        for i, v in zip(trained, side_values):
            bound_sides[i] = v
        u = call.scheme.chain_updates(spec.n, spec.source.bind(bound_sides, param_values), sign)[spec.index]
        values: list[torch.Tensor | None] = [None] * len(reads)
        for i, v in zip(positions, read_values):
            values[i] = v
        return u.increment(values)

    g, pullback = torch.func.vjp(increment, [reads[i] for i in positions], [sides[i] for i in trained], list(params))

    def vjp(grad: torch.Tensor):
        read_g, side_g, param_g = pullback(grad)
        full: list[torch.Tensor | None] = [None] * len(reads)
        for i, v in zip(positions, read_g):
            full[i] = v
        full_sides: list[torch.Tensor | None] = [None] * len(sides)
        for i, v in zip(trained, side_g):
            full_sides[i] = v
        return full, full_sides, list(param_g)
    return g, vjp


@contextlib.contextmanager
def _replaying(spec: UpdateSpec, call: ChainCall) -> Iterator[None]:
    """The recompute's context in eager code: the forward's module state and objects, its random state
    (``torch.utils.checkpoint``'s device-state helpers) and autocast state; ``is_recomputing()``."""
    if call.compiled:
        yield
        return
    autocast = contextlib.nullcontext() if call.autocast is None else \
        torch.autocast(call.autocast[0], dtype=call.autocast[2], enabled=call.autocast[1])
    with (spec.guard.replay() if spec.guard is not None else contextlib.nullcontext()), \
            _random(spec.random_state), autocast, recomputing():
        yield


def random_state(like: torch.Tensor) -> tuple:
    """The CPU generator's state and that of ``like``'s accelerator (checkpoint's own helpers)."""
    devices, states = checkpoint.get_device_states(like) if like.device.type != "cpu" else ([], [])
    return torch.get_rng_state(), devices, states, like.device.type


@contextlib.contextmanager
def _random(state: tuple | None) -> Iterator[None]:
    if state is None:
        yield
        return
    cpu, devices, states, device_type = state
    with torch.random.fork_rng(devices=devices, device_type=device_type if devices else "cuda"):
        torch.set_rng_state(cpu)
        if devices:
            checkpoint.set_device_states(devices, states, device_type=device_type)
        yield


def random_state_bytes(state: tuple | None) -> int:
    """Bytes of a recorded random state (kept outside autograd's saved tensors)."""
    if state is None:
        return 0
    cpu, _, states, _ = state
    return cpu.numel() * cpu.element_size() + sum(s.numel() * s.element_size() for s in states)


# ---------------------------------------------------------------- one chain step
def enter(call: ChainCall, x: torch.Tensor, where: str) -> None:
    """x_0 = Q[x_in] (straight-through gradient) starts the chain's state: part 0, the others zero
    (``where``: the first block, named if x_in is out of range)."""
    code0, stats = fp.to_codes(x.detach(), call.frac_bits, call.code_dtype)
    if call.compiled:
        _check_range(call, "forward", "entry", where, code0)
    else:
        call.checks.record("forward", "entry", where, stats.to(torch.float64))
    x0 = fp.from_codes(code0, call.frac_bits, call.dtype)
    if call.autograd:
        x0 = x + (x0 - x).detach()
    zeros = torch.zeros_like(code0)
    codes = [code0] + [zeros for _ in call.scheme.parts[1:]]
    call.values = [x0] + [torch.zeros_like(x0) for _ in call.scheme.parts[1:]]
    if call.reversible:
        call.carrier = torch.stack(codes).view(_FLOAT_VIEW[call.code_dtype])
    else:
        call.codes = codes
    for observer in call.observers:
        observer.state_codes(call, 0, torch.stack(codes), rebuilt=False)


def run_step(call: ChainCall, source: StepSource, sides: list[torch.Tensor], params: list[torch.Tensor],
             guard: StepState | None, random: bool, last: bool, keep: bool = False) -> Any:
    """Run chain step n = ``len(call.steps)`` (the block or sublayer ``source`` with these side inputs)
    forward; returns the step's map (it holds the block's output structure). ``keep``: in a reversible chain,
    the step keeps its block's activations (:class:`KeptUpdate`) instead of recomputing them."""
    n = len(call.steps)
    call.steps.append(source.path)
    stored = call.autograd and (not call.reversible or keep)  # the block runs under ordinary autograd
    if stored:  # the stored reference sums a side input's gradient per step, as
        sides = [side.view_as(side) if side.layout == torch.strided and not side.is_nested else side
                 for side in sides]  # the reversible backward does (a step's uses, then the steps)
    block = source.bind(sides)
    scheme = call.scheme
    updates = scheme.chain_updates(n, block, call.sign(n))
    for index, u in enumerate(updates):
        is_last = last and index == len(updates) - 1
        reads: list[torch.Tensor | None] = [None if i == u.target else v for i, v in enumerate(call.values)]
        if call.reversible and keep:
            reads = [None if r is None else r.view_as(r) for r in reads]  # the stored reference's grouping
            g = u.increment([None if r is None else r.view_as(r) for r in reads])
            spec = UpdateSpec(call, n, index, source, len(call.values), is_last, u.target, u.halving,
                              tuple(v.requires_grad for v in call.values), len(sides), 0, [], None, None, False)
            exact = () if u.exact is None else (reads[u.exact[0]],)
            value, call.carrier = KeptUpdate.apply(spec, u, g, call.values[u.target], call.carrier, *exact)
        elif call.reversible:
            state = random_state(call.values[0]) if random and not call.compiled else None
            call.random_bytes += random_state_bytes(state)
            before = block.calls
            with torch.no_grad():
                g = u.increment(reads)
            spec = UpdateSpec(call, n, index, source, len(call.values), is_last, u.target, u.halving,
                              tuple(v.requires_grad for v in call.values), len(sides), len(params),
                              [] if call.compiled else params, guard, state, block.calls > before)
            others = [v for i, v in enumerate(call.values) if i != u.target]
            value, call.carrier = UpdateStep.apply(spec, u, g, call.values[u.target], call.carrier, call.seed,
                                                   *others, *sides, *params)
        else:
            if call.autograd:  # gradients summed in the order the reversible backward sums them: the block's
                # uses of a part first (one alias), then the exact term (the outer alias), then the part's own
                reads = [None if r is None else r.view_as(r) for r in reads]
            g = u.increment([None if r is None else r.view_as(r) for r in reads] if call.autograd else reads)
            b, rounded = round_increment(g.detach(), u, call.codes, call.frac_bits, call.code_dtype)
            new, _ = apply_update(u, call.codes[u.target], b, side_bits=False)
            _check_range(call, "forward", "update", source.path, rounded)
            _check_range(call, "forward", "stream", source.path, new)
            call.codes = [new if i == u.target else c for i, c in enumerate(call.codes)]
            value = fp.from_codes(new, call.frac_bits, call.dtype)
            if call.autograd:  # the stored reference: the same numbers, straight-through gradients
                expression = _times(call.values[u.target], u.scale, g.dtype) + g
                if u.exact is not None:
                    part, multiplier = u.exact
                    expression = expression + _times(reads[part], multiplier, g.dtype)
                value = value + (expression - expression.detach()).to(value.dtype)
        call.values[u.target] = value
    if call.observers:
        codes = call.carrier.view(call.code_dtype) if call.reversible else torch.stack(call.codes)
        for observer in call.observers:
            observer.state_codes(call, n + 1, codes, rebuilt=False)
    return block


def stream(call: ChainCall) -> torch.Tensor:
    """The stream after the last step run: the part the scheme says."""
    return call.values[call.scheme.stream_part(len(call.steps) - 1)]
