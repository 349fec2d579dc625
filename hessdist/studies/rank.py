"""``rank``: the numerical rank — how many eigenvalues have |λ| > τ — counted on each side of zero.

Two ways, and the result says which it used: ``exact`` — eigh of the dense matrix built from n
products of the unit vectors (for n up to ``exact_max_n``; no stochastic error, and every copy of
a repeated eigenvalue counted, which a single-vector Lanczos cannot do); ``slq`` — stochastic
Lanczos quadrature counts above τ and below −τ, each at confidence (1 + c)/2 so that their sum's
interval holds at c. τ is absolute, or ``relative`` × λ_max.
"""
from __future__ import annotations

import math
import time

import torch

from ..errors import InputError
from ..operator import Operator
from ..solvers.slq import slq
from .verify import dense_matrix

#: the largest n for which ``method="auto"`` counts exactly (n products and an n × n eigh)
EXACT_MAX_N = 3000


def rank(op: Operator, *, threshold: float | None = None, relative: float | None = None,
         method: str = "auto", exact_max_n: int = EXACT_MAX_N, probes: int = 10, steps: int = 80,
         confidence: float = 0.95, seed: int | None = None) -> dict:
    """Eigenvalues above τ and below −τ, τ = ``threshold`` or ``relative``·λ_max (see the module docstring)."""
    if (threshold is None) == (relative is None):
        raise InputError("give the threshold τ (--threshold) or τ relative to λ_max (--relative), one of them")
    tau = relative if threshold is None else threshold
    if not (math.isfinite(tau) and tau > 0):
        raise InputError(f"the threshold must be a positive number, got {tau}")
    if method not in ("auto", "exact", "slq"):
        raise InputError(f"method must be auto, exact or slq, got {method!r}")
    if method == "auto":
        method = "exact" if op.n <= exact_max_n else "slq"
    t0, hvps0, fpe0 = time.perf_counter(), op.hvps, op.fpe
    if method == "exact":
        M = dense_matrix(op)
        lam = torch.linalg.eigvalsh(torch.from_numpy((M + M.T) / 2)).numpy()
        tau = tau if threshold is not None else tau * float(lam[-1])
        above, below = int((lam > tau).sum()), int((lam < -tau).sum())
        out = {"method": "exact", "how": f"eigh of the dense matrix from {op.n} products", "lambda_max": float(lam[-1]),
               "positive": above, "negative": below, "rank": above + below,
               "interval": [above + below, above + below], "eigenvalues": lam.tolist()}
    else:
        d = slq(op, probes=probes, steps=steps, seed=seed)
        lam_max = d.support[1]
        tau = tau if threshold is not None else tau * lam_max
        side = (1 + confidence) / 2
        up, down = d.count(tau, math.inf, confidence=side), d.count(-math.inf, -tau, confidence=side)
        out = {"method": "slq", "how": f"stochastic Lanczos quadrature, {probes} probes × {steps} steps",
               "lambda_max": lam_max, "positive": up.estimate, "negative": down.estimate,
               "rank": up.estimate + down.estimate,
               "interval": [up.interval[0] + down.interval[0], min(float(op.n), up.interval[1] + down.interval[1])],
               "positive_interval": list(up.interval), "negative_interval": list(down.interval),
               "probes": probes, "steps": steps, "seed": d.seed}
    return {**out, "threshold": tau, "relative": relative, "confidence": confidence if method == "slq" else 1.0,
            "n": op.n, "hvps": op.hvps - hvps0, "fpe": op.fpe - fpe0, "seconds": time.perf_counter() - t0}
