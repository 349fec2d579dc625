"""Block Lanczos with full re-orthogonalisation and thick restart: both ends of the spectrum from
one Krylov space, started from a random vector or from a block of previous eigenvectors.

The driver keeps the projected coefficients C = QᵀAQ (float64) and solves the small problem
after every block of products; the basis lives with the operator (see
:mod:`hessdist.solvers.krylov`). Columns are expanded in order, so the space after e products
is the same whatever the block width; ``block`` only sets how many columns share one data
pass. A requested pair is done when its residual ‖Ax − θx‖ meets the :class:`Accuracy` —
``rtol`` relative to |θ| itself, ``tol`` relative to max|θ|. The residual is read off C: true
to rounding when products are exact (float64), because every product is re-orthogonalised
against the whole basis. When they are not (float32, TF32, bfloat16, finite differences), the
returned pairs are confirmed with real products before they are reported (one per pair, kept
back within ``max_hvps``/``max_fpe``/``budget_s``; when those leave no room, the projected
residuals are reported and ``confirm_hvps`` is 0) — unless the rounding gap an earlier
confirmation measured on the same operator, added to every residual, still meets the accuracy
(:mod:`hessdist.solvers.rounding`); ``confirmation`` in the result says, per end, which.

What is certain and what is probable: see :mod:`hessdist.solvers.ritz`. From a start block that
held a random vector, :mod:`hessdist.solvers.limits` adds a ``limit``: with probability ≥
``confidence`` no eigenvalue lies beyond it, whatever the run missed.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Sequence, Union

import numpy as np
import torch

from ..basis import BasisLost, KrylovBasis
from ..errors import InputError, WorkerError
from ..operator import Operator
from .results import EigenPairs, EigenResult
from . import rounding
from .limits import StartKrylov
from .ritz import Accuracy, Rtol, end_pairs, parse_which, rayleigh_ritz, select
from .starts import WarmStart, draw_seed, start_block, warm_start_vector

Progress = Callable[[dict], None]


class RitzState:
    """Ritz values, vectors (in the basis) and residual norms after ``e`` columns of an
    ``m``-vector basis were expanded: A Q[:, :e] = Q[:, :m] C[:m, :e] (+ what thick restarts
    dropped, at most ``dropped`` in norm, added to every residual)."""

    def __init__(self, C: np.ndarray, e: int, m: int, dropped: float = 0.0):
        T = C[:e, :e]
        self.theta, self.Y = np.linalg.eigh((T + T.T) / 2)
        R = C[:m, :e] @ self.Y
        R[:e] -= self.Y * self.theta
        self.residuals = np.sqrt((R ** 2).sum(axis=0)) + dropped
        self.scale = float(np.abs(self.theta).max()) if e else 0.0


class Limits:
    """The hard limits of one run: products (never exceeded), full-data product equivalents
    (never exceeded) and seconds (after the first block, none is started that is predicted to
    overrun). The prediction is the median time per column of the recent blocks; the first block of an
    operator that had computed nothing before may hold one-time costs (CUDA start-up,
    compilation), so it does not count once a later block exists, and when it alone would stop
    the run, one single product is taken to measure the real cost."""

    def __init__(self, max_hvps: int, max_fpe: float | None, budget_s: float | None, fraction: float,
                 warm: bool, t0: float, reserve: int = 0):
        self.max_hvps, self.max_fpe, self.budget_s = max_hvps, max_fpe, budget_s
        self.fraction, self.warm, self.t0 = fraction, warm, t0
        self.per_column: list[float] = []
        fits = max_hvps - reserve >= 1 and (max_fpe is None or max_fpe / fraction - reserve >= 1 - 1e-9)
        #: products kept back for a final check (confirming residuals); 0 when the limits leave no room
        self.reserve = reserve if fits else 0

    def record(self, seconds: float, columns: int) -> None:
        self.per_column.append(seconds / columns)

    def allow(self, wanted: int, hvps: int, fpe: float) -> tuple[int, str | None]:
        """How many of ``wanted`` columns may be expanded now, and the stop reason when none."""
        count = min(wanted, self.max_hvps - self.reserve - hvps)
        if count <= 0:
            return 0, "max_hvps"
        if self.max_fpe is not None:
            count = min(count, int(math.floor((self.max_fpe - fpe) / self.fraction + 1e-9)) - self.reserve)
            if count <= 0:
                return 0, "max_fpe"
        times = self.per_column
        if self.budget_s is not None and times:      # the first block always runs: nothing to predict from
            per_column = statistics.median(times[1:][-5:] or times)
            left = self.budget_s - (time.perf_counter() - self.t0) - self.reserve * per_column
            if left <= 0:
                return 0, "budget"
            if len(times) == 1 and not self.warm and left < times[0] * count:
                count = 1                        # a probe: the first block may have been a warm-up
            else:
                count = min(count, int(left / per_column))
            if count <= 0:
                return 0, "budget"
        return count, None


class _Run:
    """One Krylov run on one basis: the projected coefficients C, the Ritz state, and the
    random start column's own Krylov space (for the probabilistic limit). A lost basis ends it
    (``BasisLost``); the caller starts another from the last checkpointed Ritz vectors."""

    def __init__(self, basis: KrylovBasis, starts: np.ndarray, share: float | None, rng: np.random.Generator,
                 max_basis: int, width: int, size: int):
        self.basis, self.rng, self.max_basis, self.width = basis, rng, max_basis, width
        added = [basis.add_start(c) for c in starts.T]
        if not any(added):
            raise InputError("v0 must be a non-zero vector (or block)")
        self.C = np.zeros((size, size))
        self.e, self.restarts, self.dropped = 0, 0, 0.0
        self.start = None if share is None else StartKrylov(size, share)   # the random column is the basis' first
        self.ritz: RitzState | None = None

    @property
    def degree(self) -> int | None:
        """The dimension of the random column's Krylov space the limit comes from (None without one)."""
        return None if self.start is None else len(self.start.beta)

    def step(self, limits: "Limits", hvps: int, fpe: float, ends: tuple[str, ...], k: int,
             accuracy: Accuracy) -> tuple[int, str | None]:
        """Expand one block; returns (products, stop reason or None)."""
        basis, n = self.basis, self.basis.n
        if self.e == basis.size:       # breakdown: invariant subspace found; continue in a fresh direction
            if basis.size >= n or basis.add_start(self.rng.standard_normal(n)) == 0.0:
                return 0, "exhausted"
        count, stop = limits.allow(min(self.width, basis.size - self.e), hvps, fpe)
        if stop:
            return 0, stop
        if basis.size + count > self.max_basis and self.max_basis < n and self.ritz is not None:
            room = (self.max_basis - (basis.size - self.e) - self.width) // 2
            self.e, lost = _thick_restart(basis, self.C, self.ritz, self.e, ends, k, accuracy, room)
            self.dropped += lost
            self.restarts += 1
            count = min(count, basis.size - self.e)
        t_step = time.perf_counter()
        cols = basis.expand(self.e, count)
        limits.record(time.perf_counter() - t_step, count)
        for i, col in enumerate(cols):
            self.C[: len(col), self.e + i] = col
        self.e += count
        if self.start is not None and self.restarts == 0:    # a restart discards what the limit needs
            self.start.extend(self.C, self.e, basis.size)
        self.ritz = RitzState(self.C, self.e, basis.size, self.dropped)
        return count, None

    def far_sides_met(self, picked: dict[str, np.ndarray], accuracy: Accuracy, delta: float) -> bool:
        """Whether each extreme value's far side — the probabilistic limit — meets the accuracy
        too, while the limit can still tighten (the random start's Krylov space intact): a
        residual alone says an eigenvalue is near θ, not that none lies beyond it."""
        if self.start is None or self.restarts or self.start.frozen:
            return True
        ritz = self.ritz
        for w, idx in picked.items():
            if w == "LM":
                continue
            lim, i = self.start.limit(w, self.basis.n, delta), idx[:1]
            if lim is None or (accuracy.met(w, ritz.theta[i], np.abs(lim - ritz.theta[i]), ritz.scale) == "").any():
                return False
        return True


def default_max_basis(op: Operator, dtype: torch.dtype = torch.float64) -> int:
    """Basis vectors that fill ``op.basis_bytes()`` (half a GPU's free memory, 4 GiB on the
    host) in each process holding 1/basis_shards of each."""
    return min(op.n, op.basis_bytes() // (-(-op.n // op.basis_shards) * torch.finfo(dtype).bits // 8))


def lanczos(op: Operator, *, which: Union[str, Sequence[str]] = ("LA", "SA"),
            k: int = 1, tol: float | None = None, rtol: Rtol = None, max_hvps: int | None = None,
            max_fpe: float | None = None, budget_s: float | None = None, v0: np.ndarray | WarmStart | None = None,
            block: int | None = None, max_basis: int | None = None, basis_dtype: torch.dtype = torch.float64,
            seed: int | None = None, confidence: float = 0.999, return_vectors: bool = True,
            checkpoint_every: int = 10, max_recoveries: int = 3, callback: Progress | None = None) -> EigenResult:
    """The k extreme eigenpairs at each end in ``which`` (``LA`` largest, ``SA`` smallest,
    ``LM`` largest magnitude) of a symmetric operator, from ONE Krylov run.

    Accuracy: ``rtol`` — a number, or {end: number} — asks for residual ≤ rtol·|θ| per value;
    ``tol`` (default 1e-6) asks for residual ≤ tol·max|θ|, and with ``rtol`` is the floor for
    values at or near 0. ``v0``: a :class:`WarmStart` (:func:`warm_start_vector`: previous
    eigenvectors and a random part, certified as a cold start is), or an array used as given:
    a start vector (no random part, so no far side), or a block (n, b) of previous
    eigenvectors (a random column is added first; its limit widens the intervals at the stop).
    ``block``: columns per product call (default: the start block's width; 1 for a random start). ``max_basis``: vectors kept before a thick
    restart, which keeps the wanted Ritz pairs at each end and locks every converged pair (so
    later search stays orthogonal to found outliers); the default fills half a GPU's free memory
    (4 GiB of host memory on a CPU) in each process that holds a part of the basis.
    ``basis_dtype``: float64 (default) or float32 (twice the vectors
    in the same memory; its rounding, ~1e-7, is invisible to the projection, so the returned
    pairs are confirmed with real products, one per pair; a run whose confirmed residuals miss
    the target says so: ``stop_reason="precision"``).
    Stops when every requested pair is done — from a random start or a :class:`WarmStart`, the
    extreme pair at each end only when its probabilistic far side (``limit``) meets the
    accuracy too — at
    ``max_hvps`` products or ``max_fpe`` full-data product equivalents (never exceeded), or
    before a block would overrun ``budget_s`` seconds;
    the result says which, and flags every pair that is not done. ``seed`` (default: drawn
    fresh and reported) fixes the random start. When the basis lives on workers that can be
    lost, the wanted Ritz vectors are checkpointed every ``checkpoint_every`` blocks and a lost
    basis is rebuilt from them (at most ``max_recoveries`` times; the result reports the
    products redone). ``callback`` receives a progress dict after each block."""
    t0 = time.perf_counter()
    n = op.n
    ends = parse_which(which)
    accuracy = Accuracy.of(tol, rtol, ends)
    if not isinstance(k, (int, np.integer)) or k < 1 or k > n:
        raise InputError(f"k must be between 1 and n = {n} (the number of parameters), got {k}")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if block is not None and (block < 1 or block > n):
        raise InputError(f"block must be between 1 and n = {n}, got {block}")
    max_hvps = min(n, max(300, 20 * k)) if max_hvps is None else int(max_hvps)
    if max_hvps < 1:
        raise InputError(f"max_hvps must be at least 1, got {max_hvps}")
    if max_fpe is not None and not max_fpe > 0:
        raise InputError(f"max_fpe must be positive, got {max_fpe}")
    seed = draw_seed(seed)
    rng = np.random.default_rng(seed)
    starts, share = start_block(v0, n, block or 1, rng)
    certify_far = v0 is None or isinstance(v0, WarmStart)      # a v0 array is a start as given
    width = block or starts.shape[1]
    min_basis = (k + 1) * len(ends) + starts.shape[1] + width
    if max_basis is None:
        max_basis = max(min(n, 2 * min_basis), default_max_basis(op, basis_dtype))
    elif max_basis < min(n, min_basis):
        raise InputError(f"max_basis must be at least {min_basis} for k = {k}, {len(ends)} end(s) and "
                         f"block {width}, got {max_basis}")
    hvps0, fpe0 = op.hvps, op.fpe
    delta = (1 - confidence) / 2            # per end, for the probabilistic limits
    exact = op.exact and basis_dtype == torch.float64     # else the projection cannot see the rounding
    limits = Limits(max_hvps, max_fpe, budget_s, op.data_fraction, warm=hvps0 > 0, t0=t0,
                    reserve=0 if exact else k * len(ends))
    size = min(max_basis, max_hvps + starts.shape[1]) + width + 1
    hvps, reason, recoveries, redone, peak = 0, "max_hvps", 0, 0, 0
    checkpoint, checkpoint_hvps, blocks = None, 0, 0
    while True:
        run = _Run(op.krylov_basis(capacity=max_basis, dtype=basis_dtype), starts, share, rng, max_basis,
                   width, size)
        try:
            while True:
                count, stop = run.step(limits, hvps, op.fpe - fpe0, ends, k, accuracy)
                if stop:
                    reason = stop
                    break
                hvps, blocks, ritz = hvps + count, blocks + 1, run.ritz
                picked = {w: select(ritz.theta, w, k) for w in ends}
                if callback is not None:
                    callback({"hvps": hvps, "fpe": op.fpe - fpe0, "seconds": time.perf_counter() - t0,
                              **{w: (ritz.theta[idx], ritz.residuals[idx]) for w, idx in picked.items()}})
                gap = None if exact else rounding.allowance(op, basis_dtype, ritz.scale)
                if run.e >= min(n, k * len(ends)) and all(
                        idx.size == k and _done(accuracy, w, ritz.theta[idx], ritz.residuals[idx], ritz.scale, gap)
                        for w, idx in picked.items()) \
                        and (not certify_far or run.far_sides_met(picked, accuracy, delta)):
                    reason = "converged"
                    break
                if run.basis.volatile and blocks % checkpoint_every == 0:
                    idx = np.concatenate(list(picked.values()))
                    checkpoint, checkpoint_hvps = run.basis.combine(ritz.Y[:, idx]), hvps
            peak = max(peak, run.basis.peak_bytes)
            break
        except BasisLost as exc:
            if recoveries >= max_recoveries:
                raise WorkerError(f"the Krylov basis was lost {recoveries + 1} times ({exc}); giving up") from exc
            recoveries += 1
            redone += hvps - checkpoint_hvps
            peak = max(peak, run.basis.peak_bytes)
            # continue from the checkpointed Ritz vectors (or afresh when there is none yet)
            starts, share = start_block(warm_start_vector({"checkpoint": checkpoint}, n, int(rng.integers(2**62)))
                                        if checkpoint is not None else None, n, width, rng)

    ritz, basis = run.ritz, run.basis
    if ritz is None:
        raise InputError(f"no product fits the limits (budget_s={budget_s}, max_hvps={max_hvps}, max_fpe={max_fpe})")
    limit = {w: run.start.limit(w, n, delta) if run.start is not None and w != "LM" else None for w in ends}
    picked = {w: select(ritz.theta, w, k) for w in ends}
    gap = None if exact else rounding.allowance(op, basis_dtype, ritz.scale)
    residuals = ritz.residuals + (gap or 0.0)
    pairs = {w: end_pairs(w, ritz.theta, residuals, idx, accuracy, ritz.scale, limit[w],
                          basis.combine(ritz.Y[:, idx]) if return_vectors or limits.reserve else None)
             for w, idx in picked.items()}
    confirm, confirmation = _confirmation_plan(pairs, exact, gap, limits.reserve > 0)
    if gap is not None:
        pairs = {w: p if w in confirm else rounding.widen_certain_side(p, gap) for w, p in pairs.items()}
    confirm_hvps = 0
    if confirm:                   # residuals from real products: the projection cannot see their error
        checked, confirm_hvps = _confirm(op, run, {w: picked[w] for w in confirm}, pairs, k, accuracy, limit,
                                         basis_dtype)
        pairs = {**pairs, **checked}
    if reason == "converged" and not all(p.converged.all() for p in pairs.values()):
        reason = "precision"          # confirmed residuals, or the rounding gap added, miss the target
    if not return_vectors:
        pairs = {w: dataclasses.replace(p, vectors=None) for w, p in pairs.items()}
    return EigenResult(pairs=pairs, hvps=hvps + confirm_hvps, fpe=op.fpe - fpe0,
                       seconds=time.perf_counter() - t0, stop_reason=reason, confidence=confidence,
                       restarts=run.restarts, krylov_degree=run.degree, seed=seed, accuracy=accuracy.to_dict(),
                       confirm_hvps=confirm_hvps, confirmation=confirmation, rounding_gap=gap,
                       recoveries=recoveries, products_redone=redone,
                       basis_peak_bytes=peak, projected=run.C[: basis.size, :run.e].copy())


def _done(accuracy: Accuracy, which: str, theta: np.ndarray, residuals: np.ndarray, scale: float,
          gap: float | None) -> bool:
    """Whether these pairs are done. With a measured rounding ``gap``, a pair whose target
    allows twice the gap runs on until it is met with the gap added (a product or two more
    instead of a confirming one); below that it stops on its projected residual and is confirmed."""
    met = accuracy.met(which, theta, residuals, scale) != ""
    if gap is not None:
        skippable = accuracy.met(which, theta, np.full_like(residuals, 2 * gap), scale) != ""
        met = np.where(skippable, accuracy.met(which, theta, residuals + gap, scale) != "", met)
    return bool(met.all())


def _confirmation_plan(pairs: dict[str, EigenPairs], exact: bool, gap: float | None,
                       room: bool) -> tuple[list[str], dict[str, str]]:
    """The ends to confirm with real products, and for every end why (or why not)."""
    confirm, why = [], {}
    for w, p in pairs.items():
        if exact:
            why[w] = "not needed: exact products and basis (the projected residuals are true)"
        elif not room:
            why[w] = "not confirmed: the limits left no product for it (projected residuals reported)"
        elif gap is not None and p.converged.all():
            why[w] = (f"skipped: met with the rounding gap ({rounding.SAFETY:g} x the measured one, "
                      f"{gap:.3g}) added to each residual")
        else:
            confirm.append(w)
            why[w] = ("confirmed: no rounding gap measured on this operator at this scale" if gap is None
                      else f"confirmed: not met with the rounding gap ({gap:.3g}) added")
    return confirm, why


def _confirm(op: Operator, run: _Run, picked: dict[str, np.ndarray], pairs: dict[str, EigenPairs], k: int,
             accuracy: Accuracy, limit: dict, basis_dtype: torch.dtype) -> tuple[dict[str, EigenPairs], int]:
    """A Rayleigh–Ritz step over the ends' returned vectors with real products: the values,
    vectors and residuals reported are those of the operator as computed. The products are
    also compared with what the projection predicts for them (Q C y), which measures the
    rounding gap for later solves (:mod:`hessdist.solvers.rounding`). Returns (pairs, products)."""
    ends = tuple(picked)
    X = np.column_stack([pairs[w].vectors for w in ends])
    AX = np.asarray(op.matmat(X))
    m = run.basis.size
    Y = run.ritz.Y[:, np.concatenate([picked[w] for w in ends])]
    predicted = run.basis.combine(run.C[:m, :run.e] @ Y)
    rounding.measure(op, basis_dtype, np.linalg.norm(AX - predicted, axis=0), run.ritz.scale)
    checked = rayleigh_ritz(op, X, ends, k, accuracy=accuracy, limits=limit, AX=AX, scale=run.ritz.scale)
    return checked.pairs, X.shape[1]


def _thick_restart(basis: KrylovBasis, C: np.ndarray, ritz: RitzState, e: int, ends: tuple[str, ...],
                   k: int, accuracy: Accuracy, room: int) -> tuple[int, float]:
    """Compress the expanded part of the basis to the k wanted Ritz vectors at each end, every
    converged pair (locked: later vectors stay orthogonal to them), and more from each end in
    turn up to ``room`` in all. Rewrites C in place, keeping the kept block's whole projection
    (its skew part too); returns the new expanded count and the norm of what the compression
    could not keep (the skew part's component outside the kept vectors, added to later
    residuals)."""
    m = basis.size
    orders = [select(ritz.theta, w, e) for w in ends]
    converged = [int(i) for w in ends
                 for i in np.flatnonzero(accuracy.met(w, ritz.theta, ritz.residuals, ritz.scale) != "")]
    must = list(dict.fromkeys(int(i) for i in [*(i for order in orders for i in order[:k]), *converged]))
    more = [int(order[rank]) for rank in range(e) for order in orders]
    keep = list(dict.fromkeys(must + more))[:max(room, len(must))]
    Y = ritz.Y[:, keep]
    T = C[:e, :e]
    TY = T @ Y
    lost = float(np.linalg.norm(TY - Y @ (Y.T @ TY), 2)) if len(keep) < e else 0.0
    coupling = C[e:m, :e] @ Y
    basis.compress(Y, e)
    c, u = len(keep), m - e
    C[:] = 0.0
    C[:c, :c] = Y.T @ TY
    C[c:c + u, :c] = coupling
    return c, lost
