"""Which solver for which case, measured: products for the k = 3 largest and k = 3 smallest pairs
(residual tolerance 1e-6 relative) from a cold start, as one Krylov run with block width 1, 2
and 4, and with a thick-restarted basis capped at ``max_basis`` vectors, checked against dense
float64 ``eigh``. Block width sets how many columns share one data pass; on the CPU a block of
B columns costs about B products (``product_cost.json``), so products are the cost here.
"""
from __future__ import annotations

import argparse

import numpy as np

from hessdist.solvers.lanczos import lanczos

from .common import merged_rows, operator, write

K, TOL = 3, 1e-6


def solve(op, eig: np.ndarray, **kw) -> dict:
    res = lanczos(op, which="LA,SA", k=K, tol=TOL, seed=0, return_vectors=False, **kw)
    top, bottom = eig[::-1][:K], eig[:K]
    scale = abs(eig).max()
    return {**kw, "hvps": res.hvps, "restarts": res.restarts,
            "stop_reason": res.stop_reason,
            "max_abs_err_over_norm": float(max(abs(res.largest.values - top).max(),
                                               abs(res.smallest.values - bottom).max()) / scale)}


def run(problem: str, max_basis: int) -> dict:
    op = operator(problem)
    H = op.matmat(np.eye(op.n))
    eig = np.linalg.eigvalsh((H + H.T) / 2)
    runs = [solve(op, eig, block=b) for b in (1, 2, 4)] + [solve(op, eig, max_basis=max_basis)]
    row = {"problem": problem, "n_params": op.n, "k": K, "tol": TOL, "runs": runs}
    print(row, flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--problems", nargs="+", default=["digits-mlp"])
    ap.add_argument("--max-basis", type=int, default=60)
    args = ap.parse_args(argv)
    write("solver_choice", {"rows": merged_rows("solver_choice", [run(p, args.max_basis) for p in args.problems])})


if __name__ == "__main__":
    main()
