"""Reversible integrator schemes in fixed point: the state they carry, their steps as shears, exact inverses.

Pure math on int64 codes (``bdia_fx.fixed_point``), no autograd Function and no step-size control
(those are ``bdia_fx.odeint``'s). The design is in ``docs/schemes.md``.

Note: [shears]. A scheme's state is a tuple of parts (part 0 is the solution z; the others are the
scheme's own, e.g. the leapfrog's velocity). Every step is a sequence of *shears*

    p_i ← σ·p_i + Q[g(p_j, j ≠ i)],   σ = ±1,

and in codes ``code(p_i') = σ·code(p_i) + round(g · 2^l)``: one rounding of g, then integer
arithmetic. g reads only the other parts, which the shear leaves unchanged, so recomputing it
from them gives the same codes and ``code(p_i) = σ·(code(p_i') − round(g · 2^l))`` undoes the
shear bit for bit, with no side information, whatever g is (any coefficients, step sizes, vector
field). A composition of shears inverts shear by shear in reverse order. So every scheme here
stores nothing per step but its step size (``side_bits = 0``, unlike BDIA's one bit per element).

A scheme also says how it starts (shears that fill its extra parts from z_0, the extra parts
starting at zero) and gives a local error estimate for adaptive steps (forward only: it decides
the step size, which is stored, so the inverse never needs it).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from bdia_fx import fixed_point as fp

__all__ = ["AsyncLeapfrog", "BDIA", "BDIAScheme", "BOGACKI_SHAMPINE", "BlockMap", "ChainScheme", "Composition",
           "DORMAND_PRINCE", "Field", "Quantizer", "Reads", "ReversibleRK", "SCHEMES", "Scheme", "Shear",
           "TRIPLE_JUMP", "Tableau", "apply_shear", "chain_scheme_of", "float_shears", "read", "rk_increment",
           "scheme_of", "shear_codes", "undo_shear"]

Field = Callable[[float, torch.Tensor], torch.Tensor]
"""A vector field f(t, z): time as a Python float, a state value in the solution's dtype."""

Reads = Sequence["torch.Tensor | None"]
"""The parts a shear's increment may read: the values of all parts, ``None`` at its own target."""


@dataclass(frozen=True)
class Shear:
    """``part[target] ← σ · part[target] + Q[increment(parts)]``; ``increment`` must not read its target
    (it receives ``None`` there).

    ``σ = sign`` (±1: a shear, undone with no side information), or with ``halving`` ``σ = sign / 2``
    per sample (``sign`` an int8 ±1 tensor broadcasting over the part: BDIA's γ), whose codes
    ``sign · (code >> 1)`` drop one bit per element, the *side bit* the inverse needs. ``exact`` =
    ``(j, multiplier)`` adds ``multiplier · part[j]``, a term on the grid whose codes are exact
    (``multiplier · code(part[j])``, no rounding; ``multiplier`` an int or int8 tensor). ``odeint``
    takes plain shears only.
    """

    target: int
    increment: Callable[[Reads], torch.Tensor]
    sign: int | torch.Tensor = 1
    halving: bool = False
    exact: tuple[int, int | torch.Tensor] | None = None

    @property
    def scale(self) -> int | torch.Tensor:
        """σ as a number or tensor to multiply a gradient with (straight-through for Q)."""
        return self.sign * 0.5 if self.halving else self.sign


# ---------------------------------------------------------------- shears on codes
def read(codes: torch.Tensor, frac_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The value ``code · 2^-l`` of int64 codes in ``dtype`` (what the vector field reads)."""
    return fp.from_codes(codes, frac_bits, dtype)


def _reads(codes: Sequence[torch.Tensor], target: int, frac_bits: int, dtype: torch.dtype) -> list[torch.Tensor | None]:
    return [None if i == target else read(c, frac_bits, dtype) for i, c in enumerate(codes)]


def _magnitude(t: torch.Tensor) -> torch.Tensor:
    """max |t| as a float64 device scalar (NaN propagates)."""
    return t.abs().amax().to(torch.float64) if t.numel() else t.new_zeros((), dtype=torch.float64)


def apply_shear(shear: Shear, codes: Sequence[torch.Tensor], frac_bits: int, dtype: torch.dtype,
                values: Sequence[torch.Tensor] | None = None
                ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, torch.Tensor]:
    """One shear forward: the new codes, and ``max |code|`` over the rounded increment and the new part
    (a float64 device scalar, NaN or inf when the increment is not finite, whose int64 conversion
    would wrap silently; compare it with :data:`fixed_point.WIDE_CODE_LIMIT`).

    With ``values`` (the parts' values as autograd tensors, equal to the codes' values) the increment is
    computed from them and the new values carry its straight-through gradient: this is the
    stored-activation run of the same arithmetic, whose forward numbers are the codes' exactly.
    """
    target = shear.target
    reads = _reads(codes, target, frac_bits, dtype) if values is None else \
        [None if i == target else v for i, v in enumerate(values)]
    increment = shear.increment(reads)
    b, span = fp.to_codes(increment.detach(), frac_bits, torch.int64)
    new = list(codes)
    new[target] = codes[target] * shear.sign + b if shear.sign != 1 else codes[target] + b
    check = torch.maximum(_magnitude(span), _magnitude(new[target]))
    if values is None:
        return new, None, check
    expression = values[target] * shear.sign + increment
    new_values = list(values)
    new_values[target] = read(new[target], frac_bits, dtype) + (expression - expression.detach())
    return new, new_values, check


def shear_codes(shear: Shear, codes: Sequence[torch.Tensor], frac_bits: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """One shear forward on codes without range checks: the codes :func:`apply_shear` gives (an
    inference form's step, where nothing would read the checks)."""
    b = fp.codes_unchecked(shear.increment(_reads(codes, shear.target, frac_bits, dtype)), frac_bits)
    new = list(codes)
    new[shear.target] = codes[shear.target] * shear.sign + b if shear.sign != 1 else codes[shear.target] + b
    return new


def undo_shear(shear: Shear, codes: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], frac_bits: int,
               dtype: torch.dtype, params: Sequence[torch.Tensor]
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]]:
    """One shear backward: the codes before it (bit-exact), the gradients w.r.t. the parts before it, and
    the gradients w.r.t. ``params`` (``None`` where unused), from the codes and gradients after it.

    The increment is recomputed once, with gradients, and serves both the inversion and the
    vector–Jacobian product (straight-through for Q): g_target ← σ·g_target, g_j += (∂g/∂p_j)ᵀ g_target.
    """
    target = shear.target
    reads = [None if r is None else r.requires_grad_() for r in _reads(codes, target, frac_bits, dtype)]
    with torch.enable_grad():
        increment = shear.increment(reads)
    b, _ = fp.to_codes(increment.detach(), frac_bits, torch.int64)
    before = list(codes)
    before[target] = (codes[target] - b) * shear.sign if shear.sign != 1 else codes[target] - b
    g = grads[target]
    new_grads = list(grads)
    new_grads[target] = g * shear.sign if shear.sign != 1 else g
    param_grads: list[torch.Tensor | None] = [None] * len(params)
    if increment.requires_grad:
        read_index = [i for i, r in enumerate(reads) if r is not None]
        inputs = [reads[i] for i in read_index] + list(params)
        vjp = torch.autograd.grad(increment, inputs, g, allow_unused=True)
        for i, gi in zip(read_index, vjp):
            if gi is not None:
                new_grads[i] = new_grads[i] + gi
        param_grads = list(vjp[len(read_index):])
    return before, new_grads, param_grads


def float_shears(shears: Sequence[Shear], values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The shears on floating-point values without quantization (the scheme's plain float form)."""
    values = list(values)
    for shear in shears:
        reads = [None if i == shear.target else v for i, v in enumerate(values)]
        values[shear.target] = values[shear.target] * shear.sign + shear.increment(reads)
    return values


# ---------------------------------------------------------------- the chain stepping interface
class BlockMap(Protocol):
    """One block (or sublayer) of a chain as a map of the stream, as the runtime hands it to a scheme."""

    def output(self, z: torch.Tensor) -> torch.Tensor:
        """F(z): the block's output stream (a residual block's z + h(z))."""

    def increment(self, z: torch.Tensor) -> torch.Tensor:
        """h(z): what the block adds to the stream (a branch module's own output)."""


Quantizer = Callable[[torch.Tensor], torch.Tensor]
"""Q on stream values, as an inference form applies it (the runtime's, or the reverse pass's graph node)."""


class ChainScheme(ABC):
    """How a chain of blocks steps: the one interface the chain runtime, ``revert`` and ONNX export run.

    A chain's state is ``parts`` (fixed-point codes of ``code_dtype``, part 0 starts as the stream
    x_0 = Q[x_in], the others at zero). Chain step n (one block, or one sublayer) is a list of
    :class:`Shear` updates (:meth:`chain_updates`), each exactly invertible from the state after it
    (with ``side_bits`` per element where it halves); after step n the stream the parent sees is part
    :meth:`stream_part`. The runtime does the rest the same way for every scheme: fixed-point codes,
    the reversible backward (undo each update from the top, recomputing its increment once for both
    the inverse and the vector–Jacobian product), the stored reference, the checks. The inference
    form (eval, ``revert``, ONNX) is :meth:`infer_start` / :meth:`infer_step` / :meth:`infer_stream`;
    ``original_at_inference`` says its unquantized form is the original model itself (BDIA at γ = 0).
    ``takes_signs``: step n receives a sign per sample (±1; γ = sign/2 for BDIA), drawn per call.
    """

    name: str
    parts: tuple[str, ...]
    side_bits: int = 0
    code_dtype: torch.dtype = torch.int64
    takes_signs: bool = False
    original_at_inference: bool = False

    @property
    def code_limit(self) -> int:
        """|code| bound that keeps every integer step inside ``code_dtype``."""
        return fp.CODE_LIMIT if self.code_dtype == torch.int32 else fp.WIDE_CODE_LIMIT

    @abstractmethod
    def chain_updates(self, n: int, block: BlockMap, sign: torch.Tensor | None) -> list[Shear]:
        """The updates of chain step n (``sign``: step n's signs, when :attr:`takes_signs`)."""

    def stream_part(self, n: int) -> int:
        """The part holding the stream after chain step n."""
        return 0

    @abstractmethod
    def infer_start(self, x: torch.Tensor, frac_bits: int, quantize: Quantizer | None) -> list:
        """The inference state at the chain's input ``x`` (``quantize``: the quantized form)."""

    @abstractmethod
    def infer_step(self, n: int, state: list, block: BlockMap, frac_bits: int, quantize: Quantizer | None,
                   dtype: torch.dtype) -> list:
        """Chain step n of the inference form (``dtype``: the stream's)."""

    @abstractmethod
    def infer_stream(self, state: list, frac_bits: int, dtype: torch.dtype) -> torch.Tensor:
        """The stream the parent sees in an inference state."""

    def traceable_inference(self, quantized: bool) -> bool:
        """Whether the inference form runs on stream values alone, so the reverse pass can put it on a graph."""
        return True


# ---------------------------------------------------------------- shear schemes
class Scheme(ChainScheme):
    """A reversible one-step scheme written as shears (see Note: [shears]).

    ``parts`` names the state it carries (part 0 is the solution); ``order`` is its claimed order
    (``tests/test_schemes.py`` measures it); ``error_order`` is the order q of its local error
    estimate (the estimate scales as h^(q+1); the step controller uses it); ``side_bits`` is what it
    stores per element per step beside the step size.
    """

    name: str
    order: int
    error_order: int
    parts: tuple[str, ...]
    side_bits: int = 0

    @abstractmethod
    def start(self, f: Field, t0: float) -> list[Shear]:
        """Shears that fill parts 1… from part 0 = z_0 (the extra parts start at zero); never part 0."""

    @abstractmethod
    def step(self, f: Field, t: float, h: float, errors: list[torch.Tensor] | None = None) -> list[Shear]:
        """The shears of one step from t to t + h. In forward, ``errors`` collects what increments know
        about the local error (``None`` in backward)."""

    @abstractmethod
    def error(self, f: Field, t: float, h: float, before: Sequence[torch.Tensor], after: Sequence[torch.Tensor],
              errors: Sequence[torch.Tensor]) -> torch.Tensor:
        """A local error estimate of part 0 for the step from ``before`` to ``after`` (values)."""

    def float_step(self, f: Field, t: float, h: float, values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One step on float values without quantization: the scheme's inference form."""
        return float_shears(self.step(f, t, h), values)

    # as a chain scheme: block n is the vector field of step n, f_n(t, z) = h_n(z), step size 1 from t = n
    def chain_updates(self, n: int, block: BlockMap, sign: torch.Tensor | None = None) -> list[Shear]:
        def field(t: float, z: torch.Tensor) -> torch.Tensor:
            return block.increment(z)
        return (self.start(field, 0.0) if n == 0 else []) + self.step(field, float(n), 1.0)

    def infer_start(self, x: torch.Tensor, frac_bits: int, quantize: Quantizer | None) -> list:
        parts = [x] + [torch.zeros_like(x) for _ in self.parts[1:]]
        return [fp.codes_unchecked(p, frac_bits) for p in parts] if quantize is not None else parts

    def infer_step(self, n: int, state: list, block: BlockMap, frac_bits: int, quantize: Quantizer | None,
                   dtype: torch.dtype) -> list:
        if quantize is None:
            return float_shears(self.chain_updates(n, block), state)
        for shear in self.chain_updates(n, block):
            state = shear_codes(shear, state, frac_bits, dtype)
        return state

    def infer_stream(self, state: list, frac_bits: int, dtype: torch.dtype) -> torch.Tensor:
        codes = isinstance(state[0], torch.Tensor) and not state[0].is_floating_point()  # graph values are floats
        return read(state[0], frac_bits, dtype) if codes else state[0]

    def traceable_inference(self, quantized: bool) -> bool:
        return not quantized  # the quantized form runs on int64 codes

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, order {self.order})"


class AsyncLeapfrog(Scheme):
    """The asynchronous leapfrog (MALI, Zhuang et al. 2021), state (z, v), v_0 = f(t_0, z_0):

        s = z + Q[(h/2)v];  v' = −v + Q[2 f(t + h/2, s)];  z' = s + Q[(h/2)v'].

    Symmetric (its inverse is the step with −h from t + h), second order; local error estimate
    (h/2)(u − v) = (h/4)(v' − v) with u = f(t + h/2, s).
    """

    name = "alf"
    order = 2
    error_order = 1
    parts = ("z", "v")

    def start(self, f: Field, t0: float) -> list[Shear]:
        return [Shear(1, lambda p: f(t0, p[0]))]

    def step(self, f: Field, t: float, h: float, errors: list[torch.Tensor] | None = None) -> list[Shear]:
        half = h / 2
        return [Shear(0, lambda p: half * p[1]),
                Shear(1, lambda p: 2 * f(t + half, p[0]), sign=-1),
                Shear(0, lambda p: half * p[1])]

    def error(self, f, t, h, before, after, errors):
        return (h / 4) * (after[1] - before[1])


TRIPLE_JUMP = (1 / (2 - 2 ** (1 / 3)), 1 - 2 / (2 - 2 ** (1 / 3)), 1 / (2 - 2 ** (1 / 3)))
"""Yoshida's triple jump: substeps c_1 h, c_0 h, c_1 h raise a symmetric order-2 method to order 4."""


class Composition(Scheme):
    """Symmetric composition of a base scheme: substeps ``weights[i] · h`` (default the triple jump).

    Still a sequence of shears, so exact in fixed point. Order: the triple jump of a symmetric
    order-2 one-step method has order 4; for the asynchronous leapfrog, whose velocity update is
    not a consistent step on its own, this is measured (``tests/test_schemes.py``). Error estimate:
    the composed step minus one plain base step of h (in floats, forward only: one step of the
    base's order p, so the estimate scales as h^(p+1)).
    """

    def __init__(self, base: Scheme, weights: Sequence[float] = TRIPLE_JUMP, order: int | None = None,
                 name: str | None = None):
        if not math.isclose(sum(weights), 1.0):
            raise ValueError(f"weights must sum to 1, got {list(weights)} (sum {sum(weights)})")
        self.base = base
        self.weights = tuple(weights)
        self.order = base.order + 2 if order is None else order
        self.error_order = base.order
        self.parts = base.parts
        self.name = name or f"{base.name}{self.order}"

    def start(self, f: Field, t0: float) -> list[Shear]:
        return self.base.start(f, t0)

    def step(self, f: Field, t: float, h: float, errors: list[torch.Tensor] | None = None) -> list[Shear]:
        shears: list[Shear] = []
        for w in self.weights:
            shears += self.base.step(f, t, w * h)
            t += w * h
        return shears

    def error(self, f, t, h, before, after, errors):
        return after[0] - self.base.float_step(f, t, h, before)[0]


# ---------------------------------------------------------------- explicit Runge–Kutta and its reversible wrapper
@dataclass(frozen=True)
class Tableau:
    """An explicit Runge–Kutta pair: nodes c, rows of a, weights b, and b − b̂ (the embedded estimate)."""

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_error: tuple[float, ...]


def _pair(name: str, order: int, c, a, b, b_hat) -> Tableau:
    return Tableau(name, order, tuple(c), tuple(tuple(r) for r in a), tuple(b),
                   tuple(x - y for x, y in zip(b, b_hat)))


BOGACKI_SHAMPINE = _pair("bosh3", 3, (0, 1 / 2, 3 / 4, 1),
                         ((), (1 / 2,), (0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
                         (2 / 9, 1 / 3, 4 / 9, 0), (7 / 24, 1 / 4, 1 / 3, 1 / 8))
DORMAND_PRINCE = _pair("dopri5", 5, (0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1),
                       ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
                        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
                        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
                        (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)),
                       (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0),
                       (5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40))


def rk_increment(tableau: Tableau, f: Field, t: float, h: float, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Φ_h(t, z) = h Σ b_i k_i of one explicit RK step, and its embedded error estimate h Σ (b_i − b̂_i) k_i."""
    stages: list[torch.Tensor] = []
    for c, row in zip(tableau.c, tableau.a):
        z_stage = z
        for a, k in zip(row, stages):
            if a:
                z_stage = z_stage + (h * a) * k
        stages.append(f(t + c * h, z_stage))
    increment = sum((h * b) * k for b, k in zip(tableau.b, stages) if b)
    error = sum((h * e) * k for e, k in zip(tableau.b_error, stages) if e)
    return increment, error


class ReversibleRK(Scheme):
    """McCallum & Foster's reversible wrapper of an explicit RK step Φ (arXiv 2410.11648) at λ = 1,
    state (z, y), y_0 = z_0:

        y' = y + Q[Φ_h(t, z)];   z' = z − Q[Φ_{−h}(t + h, y')].

    Both lines are shears, so the step is exact in fixed point with no side bits. (Their λ < 1
    damps the y − z coupling but needs a division by λ to invert, which is not exact on integer
    codes; λ = 1 is the shear case.) Order: the base method's (measured). Error estimate: the
    base pair's embedded estimate of the y update.
    """

    error_order: int
    parts = ("z", "y")

    def __init__(self, tableau: Tableau):
        self.tableau = tableau
        self.order = tableau.order
        self.error_order = tableau.order - 1
        self.name = f"reversible_{tableau.name}"

    def start(self, f: Field, t0: float) -> list[Shear]:
        return [Shear(1, lambda p: p[0])]

    def step(self, f: Field, t: float, h: float, errors: list[torch.Tensor] | None = None) -> list[Shear]:
        def y_update(p: Reads) -> torch.Tensor:
            increment, error = rk_increment(self.tableau, f, t, h, p[0])
            if errors is not None:
                errors.append(error.detach())
            return increment

        return [Shear(1, y_update), Shear(0, lambda p: -rk_increment(self.tableau, f, t + h, -h, p[1])[0])]

    def error(self, f, t, h, before, after, errors):
        return errors[0]


# ---------------------------------------------------------------- BDIA in the interface's terms
class BDIAScheme(ChainScheme):
    """BDIA (seeds 000–002), the default scheme of :func:`bdia_fx.convert`.

    State (x_{k−1}, x_k) in two parts whose roles alternate: step n updates the part holding x_{n−1}
    by one *halving* shear, ``x_{n+1} = Q[γx_{n−1}] + Q[(1+γ)F(x_n) − 2γx_n]`` with γ = sign/2 per
    sample (the −2γx_n term exact: ``−sign · code(x_n)``), so the stream is part (n+1) mod 2. Step 0
    fills the empty part: x_1 = Q[F(x_0)]. Exact inverse with one side bit per element per step (the
    low code bit the halving drops). Inference at γ = 0: x_{n+1} = Q[F(x_n)], the original block up
    to Q (the original model without Q). int32 codes (:data:`fixed_point.CODE_LIMIT`). Not a shear
    scheme, so :func:`bdia_fx.odeint` does not take it.
    """

    name = "bdia"
    parts = ("x_even", "x_odd")
    side_bits = 1
    code_dtype = torch.int32
    takes_signs = True
    original_at_inference = True

    def chain_updates(self, n: int, block: BlockMap, sign: torch.Tensor | None) -> list[Shear]:
        if n == 0:
            return [Shear(1, lambda p: block.output(p[0]))]
        read, target = n % 2, (n + 1) % 2
        gamma = 0.5 * sign

        def update(p: Reads) -> torch.Tensor:
            out = block.output(p[read])
            return out * (1.0 + gamma.to(fp.compute_dtype(out.dtype)))
        return [Shear(target, update, sign=sign, halving=True, exact=(read, -sign))]

    def stream_part(self, n: int) -> int:
        return (n + 1) % 2

    def infer_start(self, x: torch.Tensor, frac_bits: int, quantize: Quantizer | None) -> list:
        return [quantize(x) if quantize is not None else x]

    def infer_step(self, n: int, state: list, block: BlockMap, frac_bits: int, quantize: Quantizer | None,
                   dtype: torch.dtype) -> list:
        out = block.output(state[0])
        return [quantize(out) if quantize is not None else out]

    def infer_stream(self, state: list, frac_bits: int, dtype: torch.dtype) -> torch.Tensor:
        return state[0]

    def __repr__(self) -> str:
        return "BDIAScheme('bdia', order 1, 1 side bit)"


BDIA = BDIAScheme()
"""The BDIA scheme (``BDIAConfig(scheme="bdia")``, the default)."""


SCHEMES: dict[str, Scheme] = {s.name: s for s in (AsyncLeapfrog(), Composition(AsyncLeapfrog()),
                                                   ReversibleRK(BOGACKI_SHAMPINE), ReversibleRK(DORMAND_PRINCE))}
"""The built-in schemes by name: ``alf`` (order 2), ``alf4`` (its triple jump, order 4),
``reversible_bosh3`` (order 3), ``reversible_dopri5`` (order 5)."""


def scheme_of(scheme: str | Scheme) -> Scheme:
    """A shear :class:`Scheme` (what ``odeint`` integrates with) from itself or its name; ValueError
    naming the known ones otherwise."""
    if isinstance(scheme, Scheme):
        return scheme
    if scheme == "bdia" or isinstance(scheme, BDIAScheme):
        raise ValueError("BDIA is not a shear scheme (it stores one side bit per element per step): it runs as "
                         f"bdia_fx.convert's chain scheme, not here; pass one of {sorted(SCHEMES)}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be a Scheme or one of {sorted(SCHEMES)}, got {scheme!r}")
    return SCHEMES[scheme]


def chain_scheme_of(scheme: str | ChainScheme) -> ChainScheme:
    """The :class:`ChainScheme` a chain runs: ``"bdia"``, a shear scheme's name, or a scheme object
    (any :class:`ChainScheme`, e.g. one defined outside bdia_fx)."""
    if isinstance(scheme, ChainScheme):
        return scheme
    return BDIA if scheme == "bdia" else scheme_of(scheme)
