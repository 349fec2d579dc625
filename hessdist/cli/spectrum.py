"""``hessdist density | trace | count``: the spectrum as a whole (SLQ density and counts,
Hutchinson / Hutch++ trace)."""
from __future__ import annotations

import argparse
import math

import numpy as np

from ..errors import InputError
from ..solvers.slq import slq
from ..solvers.trace import hutchinson, hutchpp
from .common import add_problem_options, run_problem, write_png

def cmd_density(args: argparse.Namespace) -> int:
    def body(op, job, say):
        progress = None if args.quiet else (lambda i: say(f"probe {i['probe']}/{i['probes']}: {i['hvps']} products, "
                                                          f"{i['seconds']:.1f}s"))
        d = slq(op, probes=args.probes, steps=args.steps, seed=args.seed, callback=progress)
        out = d.to_dict(sigma=args.sigma, points=args.points)
        write_png(args.png, lambda path: plot_density(np.array(out["grid"]), np.array(out["density"]), path), say)
        table = (f"spectral density from {args.probes} probes × {args.steps} steps: support "
                 f"[{d.support[0]:.6g}, {d.support[1]:.6g}], trace/n ≈ {out['moments'][1]:.6g}, "
                 f"σ = {out['sigma']:.3g}")
        return out, table, 0

    return run_problem(args, body)


def cmd_trace(args: argparse.Namespace) -> int:
    def body(op, job, say):
        estimator = hutchpp if args.method == "hutch++" else hutchinson
        est = estimator(op, hvps=args.hvps, block=args.block, seed=args.seed, confidence=args.confidence)
        out = est.to_dict()
        table = (f"trace ≈ {est.value:.8g} ± {est.std_error:.2g} (std. error); {100 * est.confidence:g}% interval "
                 f"[{est.interval[0]:.8g}, {est.interval[1]:.8g}] ({est.method}, {est.samples} samples)")
        return out, table, 0

    return run_problem(args, body)


def cmd_count(args: argparse.Namespace) -> int:
    lower = args.threshold if args.threshold is not None else args.lower
    if lower is None and args.upper is None:
        raise InputError("give --threshold T (count eigenvalues ≥ T) or an interval --lower A --upper B")

    def body(op, job, say):
        d = slq(op, probes=args.probes, steps=args.steps, seed=args.seed)
        c = d.count(-math.inf if lower is None else lower, math.inf if args.upper is None else args.upper,
                    confidence=args.confidence)
        out = {**c.to_dict(), "probes": args.probes, "steps": args.steps, "hvps": d.hvps, "fpe": d.fpe,
               "seconds": d.seconds}
        table = (f"eigenvalues in [{c.lower:.6g}, {c.upper:.6g}]: ≈ {c.estimate:.1f}; "
                 f"{100 * c.confidence:g}% interval [{c.interval[0]:.1f}, {c.interval[1]:.1f}] "
                 f"(probe std. error {c.probe_std_error:.2g}, boundary mass {c.boundary_mass:.2g})")
        return out, table, 0

    return run_problem(args, body)


def plot_density(grid: np.ndarray, phi: np.ndarray, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(grid, np.maximum(phi, 1e-12))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (Gaussian-smoothed)")
    ax.set_title("Hessian spectral density (SLQ)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("density", help="spectral density by stochastic Lanczos quadrature")
    add_problem_options(p)
    p.add_argument("--probes", type=int, default=10)
    p.add_argument("--steps", type=int, default=80, help="Lanczos steps (products) per probe")
    p.add_argument("--sigma", type=float, help="Gaussian smoothing width (default: support / steps)")
    p.add_argument("--points", type=int, default=1000, help="grid points")
    p.add_argument("--png", help="plot the density here")
    p.set_defaults(func=cmd_density)

    p = sub.add_parser("trace", help="trace of the curvature with an error bar")
    add_problem_options(p)
    p.add_argument("--method", choices=("hutch++", "hutchinson"), default="hutch++")
    p.add_argument("--hvps", type=int, default=60, help="products to spend")
    p.add_argument("--block", type=int, default=8, help="columns per product call")
    p.add_argument("--confidence", type=float, default=0.95)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("count", help="number of eigenvalues above a threshold or in an interval (SLQ)")
    add_problem_options(p)
    p.add_argument("--threshold", type=float, help="count eigenvalues ≥ this (a numerical rank)")
    p.add_argument("--lower", type=float)
    p.add_argument("--upper", type=float)
    p.add_argument("--probes", type=int, default=10)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--confidence", type=float, default=0.95)
    p.set_defaults(func=cmd_count)
