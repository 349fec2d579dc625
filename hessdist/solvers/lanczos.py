"""Lanczos with full re-orthogonalisation: both ends of the spectrum from one Krylov space.

The driver keeps the projected matrix T = QᵀAQ in float64 and solves it each step; the basis
lives with the operator (see :mod:`hessdist.solvers.krylov`). Ritz pairs are accepted when
their residual ‖Ax − θx‖ — read off the projected problem, exact up to rounding because every
product is re-orthogonalised against the whole basis — is at most ``tol`` × max|θ|.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence, Union

import numpy as np

from ..errors import InputError
from ..operator import Operator
from .krylov import KrylovBasis
from .results import WHICH, EigenPairs, EigenResult

Progress = Callable[[dict], None]


def parse_which(which: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """``"LA,SA"`` or ``("LA", "SA")`` → ``("LA", "SA")``, validated."""
    parts = tuple(w.strip().upper() for w in (which.split(",") if isinstance(which, str) else which))
    bad = [w for w in parts if w not in WHICH]
    if bad or not parts:
        raise InputError(f"which must be a non-empty subset of {WHICH}, got {which!r}")
    return tuple(dict.fromkeys(parts))


def _select(theta: np.ndarray, which: str, k: int) -> np.ndarray:
    order = {"LA": np.argsort(-theta, kind="stable"), "SA": np.argsort(theta, kind="stable"),
             "LM": np.argsort(-np.abs(theta), kind="stable")}[which]
    return order[:k]


class RitzState:
    """Ritz values, vectors (in the basis) and true residual norms of an m-step projection."""

    def __init__(self, H: np.ndarray, m: int):
        T = H[:m, :m]
        self.theta, self.Y = np.linalg.eigh((T + T.T) / 2)
        coupling = H[m, :m] if H.shape[0] > m else np.zeros(m)
        inner = T @ self.Y - self.Y * self.theta
        self.residuals = np.sqrt((inner ** 2).sum(axis=0) + (coupling @ self.Y) ** 2)
        self.scale = float(np.abs(self.theta).max()) if m else 0.0

    def bounds(self, idx: np.ndarray) -> np.ndarray:
        """min(r, r²/gap) with the gap to the nearest other Ritz value."""
        out = []
        for i in idx:
            others = np.delete(self.theta, i)
            gap = float(np.abs(others - self.theta[i]).min()) if others.size else np.inf
            r = float(self.residuals[i])
            out.append(min(r, r * r / gap) if gap > r else r)
        return np.array(out)


def lanczos(op: Union[Operator, KrylovBasis], *, which: Union[str, Sequence[str]] = ("LA", "SA"),
            k: int = 1, tol: float = 1e-6, max_hvps: int | None = None, budget_s: float | None = None,
            v0: np.ndarray | None = None, seed: int = 0, return_vectors: bool = True,
            callback: Progress | None = None) -> EigenResult:
    """The k extreme eigenpairs at each end in ``which`` (``LA`` largest, ``SA`` smallest,
    ``LM`` largest magnitude) of a symmetric operator, from ONE Krylov run.

    Stops when every requested pair has residual ≤ ``tol`` · max|θ|, after ``max_hvps``
    products, or before a step would overrun ``budget_s`` seconds — whichever comes first; the
    result says which, and flags every pair that did not converge. ``v0`` is the start vector
    (random normal from ``seed`` by default). ``callback`` receives a progress dict each step."""
    basis = op.krylov_basis() if isinstance(op, Operator) else op
    n = basis.n
    ends = parse_which(which)
    if not isinstance(k, (int, np.integer)) or k < 1 or k > n:
        raise InputError(f"k must be between 1 and n = {n} (the number of parameters), got {k}")
    if not tol > 0:
        raise InputError(f"tol must be positive, got {tol}")
    max_hvps = min(n, max(300, 20 * k)) if max_hvps is None else int(max_hvps)
    if max_hvps < 1:
        raise InputError(f"max_hvps must be at least 1, got {max_hvps}")
    rng = np.random.default_rng(seed)
    start = rng.standard_normal(n) if v0 is None else np.asarray(v0, dtype=np.float64)
    if start.shape != (n,):
        raise InputError(f"v0 must be a vector of length n = {n}, got shape {start.shape}")
    if not np.isfinite(start).all() or basis.add_start(start) == 0.0:
        raise InputError("v0 must be a finite, non-zero vector")

    t0 = time.perf_counter()
    H = np.zeros((65, 64))
    m, hvps, last_step, reason = 0, 0, 0.0, "max_hvps"
    while True:
        if m == basis.size:       # breakdown: invariant subspace found; continue in a fresh direction
            if basis.add_start(rng.standard_normal(n)) == 0.0:
                reason = "exhausted"
                break
        if hvps >= max_hvps:
            reason = "max_hvps"
            break
        if budget_s is not None and time.perf_counter() - t0 + last_step > budget_s:
            reason = "budget"
            break
        if m + 1 >= H.shape[1]:
            H = np.pad(H, ((0, H.shape[0]), (0, H.shape[1])))
        t_step = time.perf_counter()
        col = basis.expand(m)
        last_step = time.perf_counter() - t_step
        H[: len(col), m] = col
        m, hvps = m + 1, hvps + 1
        ritz = RitzState(H, m)
        done = {w: ritz.residuals[_select(ritz.theta, w, k)] <= tol * ritz.scale for w in ends}
        if callback is not None:
            callback({"hvps": hvps, "seconds": time.perf_counter() - t0, **{
                w: (ritz.theta[_select(ritz.theta, w, k)], ritz.residuals[_select(ritz.theta, w, k)])
                for w in ends}})
        if m >= min(n, k * len(ends)) and all(bool(d.all()) and d.size == k for d in done.values()):
            reason = "converged"
            break

    ritz = RitzState(H, m)
    pairs = {}
    for w in ends:
        idx = _select(ritz.theta, w, k)
        res = ritz.residuals[idx]
        pairs[w] = EigenPairs(
            which=w, values=ritz.theta[idx], residual_norms=res, error_bounds=ritz.bounds(idx),
            converged=res <= tol * ritz.scale,
            vectors=basis.combine(ritz.Y[:, idx]) if return_vectors else None)
    return EigenResult(pairs=pairs, hvps=hvps, seconds=time.perf_counter() - t0, stop_reason=reason,
                       projected=H[:m + 1, :m].copy())
