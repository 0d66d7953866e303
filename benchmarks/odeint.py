"""bdia_fx.odeint against torchdiffeq on one neural-ODE problem: memory, time, gradient error.

The problem: an MLP vector field f(t, z) = W_2 tanh(W_1 z + b_1) + b_2 (dim 8, hidden 64, batch
128, float64) from t = 0 to 2, loss = mean square of the solution at t = 0.5, 1.3, 2.
Reference gradient: torchdiffeq.odeint (dopri5, direct backprop) at rtol = atol = 1e-12. Each
method runs at the same rtol/atol. Saved bytes: tensors autograd keeps between forward and
backward (``bdia_fx.saved_activation_bytes``: parameters excluded; for bdia_fx the final codes,
the step sizes and the z0 checksum). Time: median of ``--repeats`` forward + backward runs, one
thread. Gradient error: ‖g − g_ref‖ / ‖g_ref‖ over (z0, all parameters). The second table is saved
bytes against the number of fixed steps (rk4 for torchdiffeq).

    python benchmarks/odeint.py [--rtol 1e-6] [--repeats 3] [--json results/odeint.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torchdiffeq
from torch import nn

import bdia_fx
from bdia_fx.report import write_json

DIM, HIDDEN, BATCH = 8, 64, 128
TIMES = (0.0, 0.5, 1.3, 2.0)


class Field(nn.Module):
    """The MLP vector field, counting its evaluations."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, DIM)).double()
        self.calls = 0

    def forward(self, t, z):
        self.calls += 1
        return self.net(z)


def solvers(rtol: float, atol: float) -> dict[str, Callable]:
    """name → solve(f, z0, t) at the given tolerances."""
    def ours(scheme: str) -> Callable:
        return lambda f, z, t: bdia_fx.odeint(f, z, t, scheme=scheme, rtol=rtol, atol=atol)

    out = {f"bdia_fx {name}": ours(name) for name in ("alf", "alf4", "reversible_bosh3", "reversible_dopri5")}
    out["bdia_fx alf4, stored"] = lambda f, z, t: bdia_fx.odeint(f, z, t, rtol=rtol, atol=atol, reversible=False)
    out["torchdiffeq odeint dopri5"] = lambda f, z, t: torchdiffeq.odeint(f, z, t, rtol=rtol, atol=atol)
    out["torchdiffeq odeint_adjoint dopri5"] = lambda f, z, t: torchdiffeq.odeint_adjoint(f, z, t, rtol=rtol, atol=atol)
    return out


def gradients(f: Field, solve: Callable, z0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The flattened gradient w.r.t. (z0, parameters), and the field evaluations in forward and backward."""
    z = z0.clone().requires_grad_()
    f.calls = 0
    out = solve(f, z, t)
    forward_calls = f.calls
    grads = torch.autograd.grad(out[1:].square().mean(), [z, *f.parameters()])
    return torch.cat([g.reshape(-1) for g in grads]), forward_calls, f.calls - forward_calls


def compare(rtol: float, atol: float, repeats: int) -> list[dict]:
    f = Field()
    z0 = torch.randn(BATCH, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(TIMES, dtype=torch.float64)
    reference, _, _ = gradients(f, lambda f, z, t: torchdiffeq.odeint(f, z, t, rtol=1e-12, atol=1e-12), z0, t)
    rows = []
    for name, solve in solvers(rtol, atol).items():
        grad, forward_calls, backward_calls = gradients(f, solve, z0, t)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            gradients(f, solve, z0, t)
            seconds.append(time.perf_counter() - start)
        z = z0.clone().requires_grad_()
        saved = bdia_fx.saved_activation_bytes(f, lambda: solve(f, z, t)[1:].square().mean())  # noqa: B023
        rows.append({"method": name, "saved_bytes": saved, "seconds": statistics.median(seconds),
                     "forward_evals": forward_calls, "backward_evals": backward_calls,
                     "grad_rel_error": ((grad - reference).norm() / reference.norm()).item()})
    return rows


def memory_by_steps(counts: tuple[int, ...]) -> list[dict]:
    f = Field()
    z0 = torch.randn(BATCH, DIM, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    methods = {
        "bdia_fx alf4": lambda n: bdia_fx.odeint(f, z0, t, step_size=1 / n),
        "bdia_fx alf4, stored": lambda n: bdia_fx.odeint(f, z0, t, step_size=1 / n, reversible=False),
        "torchdiffeq odeint rk4": lambda n: torchdiffeq.odeint(f, z0, t, method="rk4", options={"step_size": 1 / n}),
        "torchdiffeq odeint_adjoint rk4": lambda n: torchdiffeq.odeint_adjoint(f, z0, t, method="rk4",
                                                                               options={"step_size": 1 / n}),
    }
    rows = []
    for name, solve in methods.items():
        row = {"method": name}
        for n in counts:
            row[str(n)] = bdia_fx.saved_activation_bytes(f, lambda: solve(n)[-1].square().mean())  # noqa: B023
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--atol", type=float, default=1e-8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # many small ops per step; one thread is fastest and steady on a shared machine
    rows = compare(args.rtol, args.atol, args.repeats)
    print(f"neural ODE dim {DIM}, hidden {HIDDEN}, batch {BATCH}, float64, t = {TIMES}, rtol {args.rtol:g}, "
          f"atol {args.atol:g}; reference gradient: torchdiffeq dopri5 at 1e-12")
    print(f"{'method':34s} {'saved KiB':>10s} {'fwd+bwd s':>10s} {'f evals fwd/bwd':>16s} {'grad rel err':>13s}")
    for r in rows:
        evals = f"{r['forward_evals']}/{r['backward_evals']}"
        print(f"{r['method']:34s} {r['saved_bytes'] / 1024:10.1f} {r['seconds']:10.3f} {evals:>16s} "
              f"{r['grad_rel_error']:13.2e}")
    steps = memory_by_steps(tuple(args.steps))
    print("\nsaved bytes against the number of fixed steps (t from 0 to 1):")
    print(f"{'method':34s}" + "".join(f"{n:>12d}" for n in args.steps))
    for r in steps:
        print(f"{r['method']:34s}" + "".join(f"{r[str(n)]:12d}" for n in args.steps))
    result = {"problem": {"dim": DIM, "hidden": HIDDEN, "batch": BATCH, "times": TIMES, "rtol": args.rtol,
                          "atol": args.atol}, "comparison": rows, "memory_by_steps": steps}
    if args.json:
        write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
