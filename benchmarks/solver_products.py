"""Products needed for λ_max within 1e-3 and λ_min within 1e-2 (relative): hessdist's single
Lanczos run for both ends vs scipy's eigsh (ARPACK) run for LA and for SA vs power iteration.

Same operator (float64, exact products) for every method; reference values from a tight Lanczos
run (residual tolerance 1e-9 relative). Counts are full-dataset products.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
from scipy.sparse.linalg import LinearOperator, eigsh

from hessdist.solvers.lanczos import lanczos

from .common import RESULTS, operator, write

TOL_MAX, TOL_MIN = 1e-3, 1e-2


def first_within(history, ref, rel):
    """First product count after which the estimate stays within rel·|ref|."""
    ok = [abs(v - ref) <= rel * abs(ref) for _, v in history]
    for i in range(len(ok)):
        if all(ok[i:]):
            return history[i][0]
    return None


def counting(op):
    calls = {"n": 0}

    def mv(v):
        calls["n"] += 1 if np.ndim(v) == 1 else np.shape(v)[1]
        return op.matmat(np.asarray(v, dtype=np.float64).reshape(op.n, -1)).reshape(np.shape(v))

    return LinearOperator(op.shape, matvec=mv, matmat=mv, dtype=np.float64), calls


def power_iteration(op, target, rel, cap, shift=0.0, seed=0, stop_rel=None):
    """Power iteration on H − shift·I. Returns (products to reach target within rel, products when
    the PyHessian-style stopping rule |Δλ| ≤ stop_rel·|λ| fired, final estimate)."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(op.n)
    v /= np.linalg.norm(v)
    reached, stopped, prev, est = None, None, None, None
    for i in range(1, cap + 1):
        w = op.matvec(v) - shift * v
        est = float(v @ w) + shift
        if reached is None and abs(est - target) <= rel * abs(target):
            reached = i
        if stop_rel and stopped is None and prev is not None and abs(est - prev) <= stop_rel * abs(prev):
            stopped = i
        if reached and (stopped or not stop_rel):
            break
        prev = est
        v = w / np.linalg.norm(w)
    return reached, stopped, est


def run(problem: str, power_cap: int, ref_tol: float) -> dict:
    op = operator(problem)
    ref = lanczos(op, which="LA,SA", k=1, tol=ref_tol, max_hvps=min(op.n, 2000), seed=123)
    lmax, lmin = float(ref.largest.values[0]), float(ref.smallest.values[0])
    row = {"problem": problem, "power_cap": power_cap, "reference_tol": ref_tol, "n_params": op.n, "n_samples": op.n_samples, "lambda_max": lmax,
           "lambda_min": lmin, "reference_converged": ref.converged}

    hist_max, hist_min = [], []
    res = lanczos(op, which="LA,SA", k=1, tol=1e-4, seed=0, callback=lambda s: (
        hist_max.append((s["hvps"], s["LA"][0][0])), hist_min.append((s["hvps"], s["SA"][0][0]))))
    a, b = first_within(hist_max, lmax, TOL_MAX), first_within(hist_min, lmin, TOL_MIN)
    row["hessdist_oracle_both_ends"] = max(a, b) if a and b else None
    row["hessdist_tol1e-4"] = {"hvps": res.hvps, "err_max": abs(res.largest.values[0] - lmax) / abs(lmax),
                               "err_min": abs(res.smallest.values[0] - lmin) / abs(lmin)}

    A, calls = counting(op)
    eig = {}
    for which in ("LA", "SA"):
        calls["n"] = 0
        val = float(eigsh(A, k=1, which=which, tol=1e-3, v0=np.random.default_rng(0).standard_normal(op.n))[0][0])
        eig[which] = {"hvps": calls["n"], "value": val, "rel_err": abs(val - (lmax if which == "LA" else lmin))
                      / abs(lmax if which == "LA" else lmin)}
    row["eigsh"] = {**eig, "total": eig["LA"]["hvps"] + eig["SA"]["hvps"]}

    reached, stopped, est = power_iteration(op, lmax, TOL_MAX, power_cap, stop_rel=1e-3)
    row["power_max"] = {"oracle_hvps": reached, "pyhessian_rule_hvps": stopped, "estimate": est}
    reached, _, est = power_iteration(op, lmin, TOL_MIN, power_cap, shift=lmax)
    row["power_min_shifted"] = {"oracle_hvps": reached, "cap": power_cap, "estimate": est,
                                "note": "plain power iteration cannot give λ_min; this is power "
                                        "iteration on H − λ_max·I, given the exact λ_max"}
    row["ratio_hessdist_to_eigsh"] = (row["hessdist_oracle_both_ends"] / row["eigsh"]["total"]
                                      if row["hessdist_oracle_both_ends"] else None)
    print(row)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--problems", default="digits-mlp,digits-cnn,cnn-100k")
    ap.add_argument("--power-cap", type=int, default=300)
    ap.add_argument("--ref-tol", type=float, default=1e-9, help="residual tolerance of the reference run")
    args = ap.parse_args(argv)
    old = os.path.join(RESULTS, "solver_products.json")
    rows = json.load(open(old))["rows"] if os.path.exists(old) else []
    for p in args.problems.split(","):          # written after every problem: nothing lost if stopped
        rows = [r for r in rows if r["problem"] != p] + [run(p, args.power_cap, args.ref_tol)]
        write("solver_products", {"tolerances": {"lambda_max": TOL_MAX, "lambda_min": TOL_MIN},
                                  "rows": rows})


if __name__ == "__main__":
    main()
