"""Learn a damped pendulum from irregularly sampled trajectories with a neural ODE (seed 003's setting).

Data: θ'' = −sin θ − 0.1 θ' from random initial states, observed at random (irregular) times in
[0, T], solved by scipy (DOP853, rtol 1e-10). Model: an MLP vector field f(t, z) on z = (θ, θ').
Two runs from the same initial weights on the same batches: bdia_fx.odeint with a reversible
scheme (memory: the final state + one scalar per step) and torchdiffeq.odeint (direct backprop
through dopri5, every activation stored), same tolerances. Reported: the trajectory error on
held-out initial states over [0, 2T] (half of it beyond the training horizon), wall time, and the
bytes one training step keeps for backward against the number of (fixed) steps.

    python examples/neural_ode.py            # 3 seeds x 600 iterations, about 6 minutes on 2 CPU cores
    python examples/neural_ode.py --quick    # 1 seed x 120 iterations, under a minute
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchdiffeq  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402
from torch import nn  # noqa: E402

import bdia_fx  # noqa: E402
from bdia_fx.report import write_json  # noqa: E402

DAMPING = 0.1
RUNS = ("reversible", "direct backprop")
COLORS = {"truth": "black", "reversible": "C0", "direct backprop": "C1"}


def pendulum(t: float, z: np.ndarray) -> np.ndarray:
    return np.array([z[1], -np.sin(z[0]) - DAMPING * z[1]])


def trajectories(z0: np.ndarray, times: np.ndarray) -> torch.Tensor:
    """Exact-enough trajectories (len(times), n, 2) from each row of z0."""
    runs = [solve_ivp(pendulum, (0.0, times[-1]), z, t_eval=times, method="DOP853", rtol=1e-10, atol=1e-10).y.T
            for z in z0]
    return torch.tensor(np.stack(runs, 1), dtype=torch.float32)


def initial_states(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.stack([rng.uniform(-2.0, 2.0, n), rng.uniform(-1.0, 1.0, n)], 1)


class VectorField(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, 2))

    def forward(self, t, z):
        return self.net(z)


def solver(name: str, scheme: str, tol: float):
    if name == "reversible":
        return lambda f, z0, t: bdia_fx.odeint(f, z0, t, scheme=scheme, rtol=tol, atol=tol)
    return lambda f, z0, t: torchdiffeq.odeint(f, z0, t, rtol=tol, atol=tol)


def train(f: nn.Module, solve, data: dict, args: argparse.Namespace, seed: int) -> dict:
    """Adam on the mean square error at the irregular observation times; losses and wall time."""
    opt = torch.optim.Adam(f.parameters(), lr=args.lr)
    rng = np.random.default_rng(seed + 1000)  # the same batches for both runs of a seed
    losses, start = [], time.perf_counter()
    for _ in range(args.iterations):
        idx = torch.as_tensor(rng.choice(len(data["z0"]), args.batch, replace=False))
        window = int(rng.integers(len(data["t"]) // 2, len(data["t"]) + 1))  # a random prefix of the series
        t, target = data["t"][:window], data["y"][:window, idx]
        loss = (solve(f, data["z0"][idx], t) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "seconds": time.perf_counter() - start}


def gradient_agreement(f: nn.Module, args: argparse.Namespace, data: dict) -> float:
    """‖g_reversible − g_direct‖ / ‖g_direct‖ of the full-data loss at the initial weights: the two
    solvers' gradients differ by their discretisations (tolerance-sized), not by the reversible backward."""
    grads = []
    for name in ("reversible", "direct backprop"):
        loss = (solver(name, args.scheme, args.tol)(f, data["z0"], data["t"]) - data["y"]).square().mean()
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(f.parameters()))]))
    return ((grads[0] - grads[1]).norm() / grads[1].norm()).item()


def memory_by_steps(f: nn.Module, scheme: str, counts: list[int]) -> dict[str, list[int]]:
    """Bytes one training step keeps for backward, fixed steps over [0, 1] (batch 16)."""
    z0 = torch.randn(16, 2)
    t = torch.tensor([0.0, 1.0])
    methods = {
        "reversible": lambda n: bdia_fx.odeint(f, z0, t, scheme=scheme, step_size=1 / n),
        "direct backprop": lambda n: torchdiffeq.odeint(f, z0, t, method="rk4", options={"step_size": 1 / n}),
    }
    return {name: [bdia_fx.saved_activation_bytes(f, lambda: solve(n)[-1].square().mean())  # noqa: B023
                   for n in counts] for name, solve in methods.items()}


def plot(out: Path, t_eval: torch.Tensor, errors: dict, memory: dict, counts: list[int], horizon: float,
         example: dict) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, err in errors.items():
        axes[0].semilogy(t_eval, err, label=f"{name} (mean over seeds)", color=COLORS[name])
    axes[0].axvline(horizon, color="grey", ls=":", label="end of training data")
    axes[0].set(xlabel="t", ylabel="RMS trajectory error (held-out initial states)", title="trajectory error")
    axes[0].legend()
    for name, curve in example.items():
        axes[1].plot(curve[:, 0], curve[:, 1], label=name, ls="--" if name != "truth" else "-", color=COLORS[name])
    axes[1].set(xlabel="θ", ylabel="θ'", title="one held-out trajectory over [0, 2T] (first seed)")
    axes[1].legend()
    for name, values in memory.items():
        axes[2].loglog(counts, [v / 1024 for v in values], "o-", label=name, color=COLORS[name])
    axes[2].set(xlabel="number of steps", ylabel="KiB kept for backward (batch 16)", title="memory against steps")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed x 120 iterations, under a minute")
    parser.add_argument("--seeds", type=int, default=3, help="initial weights and batch orders (data fixed)")
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--scheme", default="reversible_dopri5", help="a bdia_fx.schemes name")
    parser.add_argument("--tol", type=float, default=1e-5, help="rtol = atol for both solvers")
    parser.add_argument("--horizon", type=float, default=10.0)
    parser.add_argument("--observations", type=int, default=24)
    parser.add_argument("--train", type=int, default=64, help="training trajectories")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--seed", type=int, default=0, help="the data's seed and the first weights' seed")
    parser.add_argument("--out", type=Path, default=Path("results/neural_ode"))
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.seeds = 120, 1
    torch.set_num_threads(1)  # many small ops per step: one thread is fastest on a shared machine
    rng = np.random.default_rng(args.seed)
    times = np.sort(np.concatenate([[0.0], rng.uniform(0.0, args.horizon, args.observations - 1)]))
    train_z0 = initial_states(args.train, rng)
    data = {"t": torch.tensor(times, dtype=torch.float32), "z0": torch.tensor(train_z0, dtype=torch.float32),
            "y": trajectories(train_z0, times)}
    test_z0 = initial_states(16, rng)
    t_eval = np.linspace(0.0, 2 * args.horizon, 81)
    truth = trajectories(test_z0, t_eval)

    runs: dict[str, list[dict]] = {name: [] for name in RUNS}
    curves: dict[str, list[np.ndarray]] = {name: [] for name in RUNS}
    example = {"truth": truth[:, 0].numpy()}
    for seed in range(args.seed, args.seed + args.seeds):
        torch.manual_seed(seed)
        initial = VectorField()
        if seed == args.seed:
            agreement = gradient_agreement(initial, args, data)
            memory = memory_by_steps(initial, args.scheme, args.steps)
        for name in RUNS:
            f = copy.deepcopy(initial)
            run = train(f, solver(name, args.scheme, args.tol), data, args, seed)
            with torch.no_grad():  # both models evaluated by the same tight solve (the learnt flow itself)
                pred = bdia_fx.odeint(f, torch.tensor(test_z0, dtype=torch.float32),
                                      torch.tensor(t_eval, dtype=torch.float32), scheme="reversible_dopri5",
                                      rtol=1e-6, atol=1e-6)
            error = (pred - truth).square().mean(dim=(1, 2)).sqrt().numpy()
            run["rms_error_train_horizon"] = float(np.sqrt(np.mean(error[t_eval <= args.horizon] ** 2)))
            run["rms_error_extrapolation"] = float(np.sqrt(np.mean(error[t_eval > args.horizon] ** 2)))
            runs[name].append(run)
            curves[name].append(error)
            if seed == args.seed:
                example[name] = pred[:, 0].numpy()
    errors = {name: np.mean(c, axis=0) for name, c in curves.items()}

    args.out.mkdir(parents=True, exist_ok=True)
    plot(args.out / "neural_ode.png", t_eval, errors, memory, args.steps, args.horizon, example)
    print(f"pendulum, {args.train} trajectories x {args.observations} irregular times in [0, {args.horizon:g}], "
          f"{args.iterations} iterations, {args.seeds} seed(s), reversible scheme {args.scheme}, "
          f"tolerance {args.tol:g}")
    print(f"{'run (mean ± std)':18s} {'final loss':>20s} {'RMS err [0,T]':>20s} {'RMS err (T,2T]':>20s} {'wall s':>8s}")

    def stat(values: list[float], fmt: str) -> str:
        return f"{np.mean(values):{fmt}} ± {np.std(values):{fmt}}"

    for name, seeds in runs.items():
        print(f"{name:18s} {stat([np.mean(r['losses'][-10:]) for r in seeds], '.2e'):>20s} "
              f"{stat([r['rms_error_train_horizon'] for r in seeds], '.2e'):>20s} "
              f"{stat([r['rms_error_extrapolation'] for r in seeds], '.2e'):>20s} "
              f"{np.mean([r['seconds'] for r in seeds]):8.1f}")
    print(f"gradient at the initial weights, reversible vs direct backprop: relative difference {agreement:.1e}")
    print("bytes kept for backward by one training step, fixed steps (batch 16):")
    print(f"{'steps':>16s}" + "".join(f"{n:>10d}" for n in args.steps))
    for name, values in memory.items():
        print(f"{name:>16s}" + "".join(f"{v:10d}" for v in values))
    write_json({"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "runs": runs, "gradient_agreement_at_init": agreement,
                "memory_by_steps": {"steps": args.steps, **memory},
                "t_eval": t_eval.tolist(), "mean_rms_error_by_time": {k: v.tolist() for k, v in errors.items()}},
               args.out / "results.json")


if __name__ == "__main__":
    main()
