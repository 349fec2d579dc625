"""Block Lanczos with full re-orthogonalisation and thick restart: both ends of the spectrum from
one Krylov space, started from a random vector or from a block of previous eigenvectors.

The driver keeps the projected coefficients C = QᵀAQ (float64) and solves the small problem
after every block of products; the basis lives with the operator (see
:mod:`hessdist.solvers.krylov`). Columns are expanded in order, so the space after e products
is the same whatever the block width; ``block`` only sets how many columns share one data
pass. Ritz pairs are accepted when their residual ‖Ax − θx‖ — read off C, exact up to rounding
because every product is re-orthogonalised against the whole basis — is at most ``tol`` ×
max|θ|.

Every returned value comes with a certified interval: the Rayleigh–Ritz side (θᵢ ≤ λᵢ for the
i-th largest, by interlacing) is certain; the other side is θᵢ ± rᵢ, some eigenvalue lying
within the residual rᵢ of θᵢ. When the start block held a random vector, the Kuczyński–
Woźniakowski bound adds a probabilistic ``limit``: with probability ≥ ``confidence`` no
eigenvalue lies beyond it, whatever the run missed.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Sequence, Union

import numpy as np

from ..errors import InputError
from ..operator import Operator
from .krylov import KrylovBasis
from .results import WHICH, EigenPairs, EigenResult

Progress = Callable[[dict], None]
BASIS_BYTES = 4 << 30


def parse_which(which: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """``"LA,SA"`` or ``("LA", "SA")`` → ``("LA", "SA")``, validated."""
    parts = tuple(w.strip().upper() for w in (which.split(",") if isinstance(which, str) else which))
    bad = [w for w in parts if w not in WHICH]
    if bad or not parts:
        raise InputError(f"which must be a non-empty subset of {WHICH}, got {which!r}")
    return tuple(dict.fromkeys(parts))


def select(theta: np.ndarray, which: str, k: int) -> np.ndarray:
    """Indices of the k values of ``theta`` at end ``which`` (LA descending, SA ascending, LM by |θ|)."""
    order = {"LA": np.argsort(-theta, kind="stable"), "SA": np.argsort(theta, kind="stable"),
             "LM": np.argsort(-np.abs(theta), kind="stable")}[which]
    return order[:k]


class RitzState:
    """Ritz values, vectors (in the basis) and true residual norms after ``e`` columns of an
    ``m``-vector basis were expanded: A Q[:, :e] = Q[:, :m] C[:m, :e]."""

    def __init__(self, C: np.ndarray, e: int, m: int):
        T = C[:e, :e]
        self.theta, self.Y = np.linalg.eigh((T + T.T) / 2)
        R = C[:m, :e] @ self.Y
        R[:e] -= self.Y * self.theta
        self.residuals = np.sqrt((R ** 2).sum(axis=0))
        self.scale = float(np.abs(self.theta).max()) if e else 0.0

    def bounds(self, idx: np.ndarray) -> np.ndarray:
        """min(r, r²/gap) with the gap to the nearest other Ritz value (an estimate: the true gap
        to the rest of the spectrum may be smaller)."""
        out = []
        for i in idx:
            others = np.delete(self.theta, i)
            gap = float(np.abs(others - self.theta[i]).min()) if others.size else np.inf
            r = float(self.residuals[i])
            out.append(min(r, r * r / gap) if gap > r else r)
        return np.array(out)


def kw_epsilon(n: int, degree: int, delta: float) -> float:
    """Kuczyński–Woźniakowski: after a Krylov space of dimension ``degree`` from a random start,
    λ_max − θ_max ≤ ε (λ_max − λ_min) with probability ≥ 1 − δ, for this ε."""
    if degree < 1:
        return math.inf
    return (math.log(1.648 * math.sqrt(n) / delta) / (2 * degree - 1)) ** 2


def start_block(v0: np.ndarray | None, n: int, block: int, rng: np.random.Generator) -> tuple[np.ndarray, int | None]:
    """The start columns and the index of the random one (None if there is none). No v0: ``block``
    random columns. A single v0: used as is. A block v0 (n, b): one random column appended,
    so directions the previous vectors miss are still searched and ``limit`` applies."""
    if v0 is None:
        return rng.standard_normal((n, block)), 0
    V = np.asarray(v0, dtype=np.float64)
    if V.ndim == 1:
        V = V[:, None]
        random_col = None
    else:
        V, random_col = np.column_stack([V, rng.standard_normal(n)]), V.shape[1]
    if V.ndim != 2 or V.shape[0] != n:
        raise InputError(f"v0 must be a vector of length n = {n} or a block (n, b), got shape {np.shape(v0)}")
    if not np.isfinite(V).all():
        raise InputError("v0 must be finite (it holds NaN or inf)")
    return V, random_col


def warm_start_vector(previous: Mapping[str, np.ndarray], n: int, seed: int = 0) -> np.ndarray | None:
    """One start vector rich in every previous eigenvector (both ends), plus a little noise so
    that directions the previous solve missed are not excluded. Measured (benchmarks/
    warm_start.json) to need fewer products than starting from the block of those vectors,
    which pays a product per column per step; when the vectors are exact both take a handful."""
    columns = [v for block in previous.values() for v in np.asarray(block, dtype=np.float64).T]
    if not columns or any(c.shape != (n,) for c in columns):
        return None
    v0 = sum(c / np.linalg.norm(c) for c in columns)
    noise = np.random.default_rng(seed).standard_normal(n)
    return v0 / np.linalg.norm(v0) + 1e-3 * noise / np.linalg.norm(noise)


def lanczos(op: Union[Operator, KrylovBasis], *, which: Union[str, Sequence[str]] = ("LA", "SA"),
            k: int = 1, tol: float = 1e-6, max_hvps: int | None = None, budget_s: float | None = None,
            v0: np.ndarray | None = None, block: int | None = None, max_basis: int | None = None,
            seed: int = 0, confidence: float = 0.999, return_vectors: bool = True,
            callback: Progress | None = None) -> EigenResult:
    """The k extreme eigenpairs at each end in ``which`` (``LA`` largest, ``SA`` smallest,
    ``LM`` largest magnitude) of a symmetric operator, from ONE Krylov run.

    ``v0``: a start vector, or a block (n, b) of previous eigenvectors (warm start; a random
    column is appended). ``block``: columns per product call (default: the start block's width;
    1 for a random start). ``max_basis``: vectors kept before a thick restart, which keeps the
    wanted Ritz pairs at each end and locks every converged pair (so later search stays
    orthogonal to found outliers). Stops when every requested pair has residual ≤ ``tol`` ·
    max|θ|, at ``max_hvps`` products (never exceeded), or before a block would overrun
    ``budget_s`` seconds; the result says which, and flags every pair that did not converge.
    ``callback`` receives a progress dict after each block."""
    t0 = time.perf_counter()
    basis = op.krylov_basis() if isinstance(op, Operator) else op
    n = basis.n
    ends = parse_which(which)
    if not isinstance(k, (int, np.integer)) or k < 1 or k > n:
        raise InputError(f"k must be between 1 and n = {n} (the number of parameters), got {k}")
    if not tol > 0:
        raise InputError(f"tol must be positive, got {tol}")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if block is not None and (block < 1 or block > n):
        raise InputError(f"block must be between 1 and n = {n}, got {block}")
    max_hvps = min(n, max(300, 20 * k)) if max_hvps is None else int(max_hvps)
    if max_hvps < 1:
        raise InputError(f"max_hvps must be at least 1, got {max_hvps}")
    rng = np.random.default_rng(seed)
    starts, random_col = start_block(v0, n, block or 1, rng)
    width = block or starts.shape[1]
    min_basis = (k + 1) * len(ends) + starts.shape[1] + width
    if max_basis is None:         # default: a 4 GiB float64 basis, restarting only when that fills
        max_basis = min(n, max(2 * min_basis, BASIS_BYTES // (8 * n)))
    elif max_basis < min(n, min_basis):
        raise InputError(f"max_basis must be at least {min_basis} for k = {k}, {len(ends)} end(s) and "
                         f"block {width}, got {max_basis}")
    added = [basis.add_start(c) for c in starts.T]
    if not any(added):
        raise InputError("v0 must be a non-zero vector (or block)")
    random_col = None if random_col is None or not added[random_col] else sum(
        1 for a in added[:random_col] if a)
    start_width = basis.size

    size = min(max_basis, max_hvps + starts.shape[1]) + width + 1
    C = np.zeros((size, size))
    e, hvps, per_column, reason, restarts = 0, 0, 0.0, "max_hvps", 0
    degree = None if random_col is None else 1          # Krylov dimension reached by the random column
    hi, lo = -math.inf, math.inf                         # most extreme Ritz values seen
    ritz = None
    while True:
        if e == basis.size:       # breakdown: invariant subspace found; continue in a fresh direction
            degree = n if degree is not None and restarts == 0 else degree   # holds K(A, v) whole
            if basis.size >= n or basis.add_start(rng.standard_normal(n)) == 0.0:
                reason = "exhausted"
                break
        count = min(width, basis.size - e, max_hvps - hvps)
        if count <= 0:
            reason = "max_hvps"
            break
        if budget_s is not None:
            left = budget_s - (time.perf_counter() - t0)
            count = min(count, int(left / per_column) if per_column > 0 else count)
            if count <= 0:
                reason = "budget"
                break
        if basis.size + count > max_basis and max_basis < n and ritz is not None:
            e = _thick_restart(basis, C, ritz, e, ends, k, tol, (max_basis - (basis.size - e) - width) // 2)
            restarts += 1
            count = min(count, basis.size - e)
        t_step = time.perf_counter()
        cols = basis.expand(e, count)
        per_column = (time.perf_counter() - t_step) / count
        for i, col in enumerate(cols):
            C[: len(col), e + i] = col
        e, hvps = e + count, hvps + count
        if degree is not None and restarts == 0 and degree < n:
            degree = 1 + (e - random_col + start_width - 1) // start_width if e > random_col else 1
        ritz = RitzState(C, e, basis.size)
        hi, lo = max(hi, float(ritz.theta[-1])), min(lo, float(ritz.theta[0]))
        picked = {w: select(ritz.theta, w, k) for w in ends}
        if callback is not None:
            callback({"hvps": hvps, "seconds": time.perf_counter() - t0,
                      **{w: (ritz.theta[idx], ritz.residuals[idx]) for w, idx in picked.items()}})
        if e >= min(n, k * len(ends)) and all(
                idx.size == k and bool((ritz.residuals[idx] <= tol * ritz.scale).all()) for idx in picked.values()):
            reason = "converged"
            break

    if ritz is None:
        raise InputError(f"no product fits the budget (budget_s={budget_s}, max_hvps={max_hvps})")
    delta = (1 - confidence) / 2
    eps = kw_epsilon(n, degree, delta) if degree is not None else math.inf
    reach = eps * (hi - lo) / (1 - 2 * eps) if eps < 0.5 else math.inf
    pairs = {}
    for w in ends:
        idx = select(ritz.theta, w, k)
        theta, res = ritz.theta[idx], ritz.residuals[idx]
        lower, upper = (theta, theta + res) if w == "LA" else (theta - res, theta) if w == "SA" else (
            theta - res, theta + res)
        limit = {"LA": hi + reach, "SA": lo - reach}.get(w) if math.isfinite(reach) else None
        converged = res <= tol * ritz.scale
        far = {"LA": math.inf, "SA": -math.inf}.get(w) if limit is None else limit
        if far is not None:       # an unconverged pair may sit next to an eigenvalue that is not λᵢ
            upper = np.where(converged, upper, np.maximum(upper, far)) if w == "LA" else upper
            lower = np.where(converged, lower, np.minimum(lower, far)) if w == "SA" else lower
        pairs[w] = EigenPairs(
            which=w, values=theta, residual_norms=res, error_bounds=ritz.bounds(idx),
            converged=converged, intervals=np.column_stack([lower, upper]), limit=limit,
            vectors=basis.combine(ritz.Y[:, idx]) if return_vectors else None)
    return EigenResult(pairs=pairs, hvps=hvps, seconds=time.perf_counter() - t0, stop_reason=reason,
                       confidence=confidence, restarts=restarts, krylov_degree=degree,
                       projected=C[: basis.size, :e].copy())


def _thick_restart(basis: KrylovBasis, C: np.ndarray, ritz: RitzState, e: int, ends: tuple[str, ...],
                   k: int, tol: float, room: int) -> int:
    """Compress the expanded part of the basis to the k wanted Ritz vectors at each end, every
    converged pair (locked: later vectors stay orthogonal to them), and more from each end in
    turn up to ``room`` in all. Rewrites C in place; returns the new expanded count."""
    m = basis.size
    orders = [select(ritz.theta, w, e) for w in ends]
    converged = np.flatnonzero(ritz.residuals <= tol * ritz.scale)
    must = list(dict.fromkeys(int(i) for i in [*(i for order in orders for i in order[:k]), *converged]))
    more = [int(order[rank]) for rank in range(e) for order in orders]
    keep = list(dict.fromkeys(must + more))[:max(room, len(must))]
    Y = ritz.Y[:, keep]
    coupling = C[e:m, :e] @ Y
    basis.compress(Y, e)
    c, u = len(keep), m - e
    C[:] = 0.0
    C[:c, :c] = np.diag(ritz.theta[keep])
    C[c:c + u, :c] = coupling
    return c
