"""float32 vs float64 Krylov basis: the same solve (float64 products, both ends, k = 3) with the
basis stored in either precision. Reported: products, values, the largest relative difference of
the float32-basis values from the float64-basis ones, the largest confirmed residual / |θ|, and
peak basis memory. A float32 basis holds twice the vectors in the same memory; its rounding is
invisible to the projection, so its pairs are confirmed with real products."""
from __future__ import annotations

import argparse

import numpy as np
import torch

from hessdist.solvers.lanczos import lanczos

from .common import merged_rows, operator, write

PROBLEMS = ("digits-mlp", "digits-cnn")


def run(name: str, rtol: float, seed: int) -> dict:
    op = operator(name, dtype=torch.float64)
    results = {str(dt).removeprefix("torch."): lanczos(op, which="LA,SA", k=3, rtol=rtol, seed=seed, basis_dtype=dt)
               for dt in (torch.float64, torch.float32)}
    ref = np.concatenate([results["float64"].pairs[w].values for w in ("LA", "SA")])
    bases = {}
    for dt, res in results.items():
        values = np.concatenate([res.pairs[w].values for w in ("LA", "SA")])
        residuals = np.concatenate([res.pairs[w].residual_norms for w in ("LA", "SA")])
        bases[dt] = {"hvps": res.hvps, "confirm_hvps": res.confirm_hvps, "converged": bool(res.converged),
                     "stop_reason": res.stop_reason, "lambda_max": float(res.pairs["LA"].values[0]),
                     "lambda_min": float(res.pairs["SA"].values[0]),
                     "max_relative_difference": float(np.max(np.abs(values - ref) / np.abs(ref))),
                     "max_relative_residual": float(np.max(residuals / np.abs(values))),
                     "basis_peak_bytes": int(res.basis_peak_bytes)}
        print(name, dt, bases[dt], flush=True)
    return {"problem": name, "n_params": op.n, "rtol": rtol, "seed": seed, "bases": bases}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = [run(name, args.rtol, args.seed) for name in args.problems.split(",")]
    write("basis_precision", {"rows": merged_rows("basis_precision", rows)})


if __name__ == "__main__":
    main()
