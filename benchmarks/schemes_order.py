"""Measured order of every reversible scheme: error against the step size on the Kepler problem.

Kepler problem (GM = a = 1, eccentricity 0.5, from perihelion) over t ∈ [0, 2], fixed steps, run
through ``bdia_fx.odeint`` in float64 on a fine grid (frac_bits 48, so rounding stays far below the
errors). Error: max |z(2) − exact| (the exact solution from Kepler's equation). Order: the least
squares slope of log error against log h, and the slope between consecutive step counts.

    python benchmarks/schemes_order.py [--json results/schemes_order.json]
"""

from __future__ import annotations

import argparse
import math

import torch

import bdia_fx
from bdia_fx.report import write_json
from bdia_fx.schemes import SCHEMES

STEPS = (16, 32, 64, 128, 256)
ECCENTRICITY, END = 0.5, 2.0


def kepler(t, z):
    q, p = z[..., :2], z[..., 2:]
    return torch.cat([p, -q / q.square().sum(-1, keepdim=True) ** 1.5], -1)


def exact(t: float) -> torch.Tensor:
    """Position and velocity at time t from Kepler's equation E − e sin E = t (Newton's method)."""
    e, anomaly = ECCENTRICITY, t
    for _ in range(50):
        anomaly -= (anomaly - e * math.sin(anomaly) - t) / (1 - e * math.cos(anomaly))
    c, s, b = math.cos(anomaly), math.sin(anomaly), math.sqrt(1 - e * e)
    return torch.tensor([c - e, b * s, -s / (1 - e * c), b * c / (1 - e * c)], dtype=torch.float64)


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    t = torch.tensor([0.0, END], dtype=torch.float64)
    rows = []
    for name, scheme in SCHEMES.items():
        errors = [(bdia_fx.odeint(kepler, exact(0.0), t, scheme=name, step_size=END / n, frac_bits=48)[-1]
                   - exact(END)).abs().max().item() for n in STEPS]
        logs = [math.log(e) for e in errors]
        hs = [math.log(END / n) for n in STEPS]
        local = [(logs[i + 1] - logs[i]) / (hs[i + 1] - hs[i]) for i in range(len(STEPS) - 1)]
        rows.append({"scheme": name, "claimed_order": scheme.order, "errors": errors,
                     "fitted_order": slope(hs, logs), "local_orders": local})
    print(f"Kepler e={ECCENTRICITY}, t in [0, {END}], fixed steps, float64, frac_bits 48; max |z(T) - exact|")
    print(f"{'scheme':20s} {'claimed':>7s} " + "".join(f"{'n=' + str(n):>10s}" for n in STEPS) + "  fitted  local")
    for r in rows:
        print(f"{r['scheme']:20s} {r['claimed_order']:7d} " + "".join(f"{e:10.2e}" for e in r["errors"])
              + f"  {r['fitted_order']:6.2f}  " + " ".join(f"{s:.2f}" for s in r["local_orders"]))
    if args.json:
        write_json(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
