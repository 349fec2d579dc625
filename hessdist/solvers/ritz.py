"""Ritz pairs and when they are done: the small dense problems every eigensolver shares.

A Ritz pair (θ, x) of a symmetric A with unit x and residual r = ‖Ax − θx‖ certifies two
things: some eigenvalue of A lies in [θ − r, θ + r], and (Cauchy interlacing) the i-th largest
Ritz value of a projection is at most λᵢ. Whether θ's neighbouring eigenvalue *is* λᵢ — that no
eigenvalue beyond it was missed — no residual can say; from a random start
:mod:`hessdist.solvers.limits` says it with a probability.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import numpy as np

from ..errors import InputError
from ..operator import Operator
from .results import WHICH, EigenPairs, EigenResult

Rtol = Union[float, Mapping[str, float], None]
DEFAULT_TOL = 1e-6


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


@dataclass(frozen=True)
class Accuracy:
    """When a Ritz pair is done. ``rtol`` (per end): its residual — the certified distance to
    the nearest eigenvalue — is at most rtol·|θ| (relative accuracy of *this* value, as ARPACK
    asks). ``tol``: at most tol·max|θ| (accuracy relative to ‖A‖); with ``rtol`` it is the floor
    for values at or near 0, where no relative accuracy exists, and such a pair is reported as
    met by ``"tol"``, not ``"rtol"``."""

    tol: float
    rtol: Mapping[str, float]

    @classmethod
    def of(cls, tol: float | None, rtol: Rtol, ends: Sequence[str]) -> "Accuracy":
        """Validated; ``rtol`` a number (every end) or {end: number}; ``tol`` defaults to 1e-6."""
        if rtol is None:
            per_end = {}
        elif isinstance(rtol, Mapping):
            per_end = {str(w).upper(): float(v) for w, v in rtol.items()}
            extra = set(per_end) - set(ends)
            if extra:
                raise InputError(f"rtol names end(s) {sorted(extra)} that are not in which={list(ends)}")
        else:
            per_end = {w: float(rtol) for w in ends}
        for w, v in per_end.items():
            if not 0 < v < 1:
                raise InputError(f"rtol must lie in (0, 1) (a relative error, e.g. 1e-2 for 1%), got {v} for {w}")
        tol = DEFAULT_TOL if tol is None else float(tol)
        if not tol > 0:
            raise InputError(f"tol must be positive, got {tol}")
        return cls(tol=tol, rtol=per_end)

    def met(self, which: str, theta: np.ndarray, residuals: np.ndarray, scale: float) -> np.ndarray:
        """Per pair: ``"rtol"`` (relative accuracy reached), ``"tol"`` (the ‖A‖-relative
        criterion, or the floor near 0) or ``""`` (not done)."""
        rtol = self.rtol.get(which)
        relative = (residuals <= rtol * np.abs(theta)) & (theta != 0) if rtol else np.zeros(theta.shape, bool)
        floor = residuals <= self.tol * scale
        return np.where(relative, "rtol", np.where(floor, "tol", ""))

    def to_dict(self) -> dict:
        return {"tol": self.tol, "rtol": dict(self.rtol) or None}


def gap_bounds(theta: np.ndarray, idx: np.ndarray, residuals: np.ndarray) -> np.ndarray:
    """min(r, r²/gap), the gap taken to the nearest other Ritz value (an estimate: the true gap
    to the rest of the spectrum may be smaller)."""
    out = []
    for i, r in zip(idx, residuals):
        others = np.delete(theta, i)
        gap = float(np.abs(others - theta[i]).min()) if others.size else np.inf
        out.append(min(r, r * r / gap) if gap > r else r)
    return np.array(out, dtype=np.float64)


def cluster_reach(theta: np.ndarray, residuals: np.ndarray, which: str) -> np.ndarray:
    """Per Ritz value, how far towards end ``which`` its eigenvalue may lie: the far edge of the
    chain of overlapping residual intervals [θ − r, θ + r] it belongs to, from that end in. Ritz
    values whose intervals overlap are not resolved apart, so the i-th eigenvalue may sit at any
    of their places (e.g. λ₂ next to θ₁ while θ₂ already approximates λ₃)."""
    sign = 1.0 if which == "LA" else -1.0
    u = sign * theta                                   # towards the end is +∞
    reach = np.empty_like(theta)
    far, near = -np.inf, np.inf
    for i in np.argsort(-u, kind="stable"):
        if u[i] + residuals[i] >= near:                # overlaps the chain above: joins it
            far, near = max(far, u[i] + residuals[i]), min(near, u[i] - residuals[i])
        else:
            far, near = u[i] + residuals[i], u[i] - residuals[i]
        reach[i] = sign * far
    return reach


def end_pairs(which: str, theta: np.ndarray, residuals: np.ndarray, idx: np.ndarray, accuracy: Accuracy,
              scale: float, limit: float | None = None, vectors: np.ndarray | None = None) -> EigenPairs:
    """The pairs ``idx`` of end ``which`` with flags and intervals. A done pair's interval runs
    from θ (the Rayleigh–Ritz side: certain) to θ ± r, widened to the far edge of any chain of
    overlapping residual intervals towards the end (LA; SA mirrored; LM θ ± r): that side holds
    unless an eigenvalue beyond was missed — so the extreme pair's far side is also taken out
    to ``limit`` where there is one. A pair not done may sit next to an eigenvalue that is not
    λᵢ, so its far side is ``limit`` (infinite without one). ``limit`` is floored at the
    extreme pair's own θ ± r: the bound is exact arithmetic's, and rounded products (float32)
    make the projection look sharper than the products are."""
    th, r = theta[idx], residuals[idx]
    if limit is not None and which in ("LA", "SA") and len(th):
        limit = max(limit, th[0] + r[0]) if which == "LA" else min(limit, th[0] - r[0])
    met = accuracy.met(which, th, r, scale)
    done = met != ""
    if which in ("LA", "SA"):
        reach = cluster_reach(theta, residuals, which)[idx]
        lower, upper = (th, reach) if which == "LA" else (reach, th)
    else:
        lower, upper = th - r, th + r
    far = {"LA": math.inf, "SA": -math.inf}.get(which) if limit is None else limit
    probable = ~done | ((np.arange(len(th)) == 0) & (limit is not None))   # the limit bounds the extreme one
    if which == "LA":
        upper = np.where(probable, np.maximum(upper, far), upper)
    elif which == "SA":
        lower = np.where(probable, np.minimum(lower, far), lower)
    with np.errstate(divide="ignore"):
        widths = np.where(th != 0, r / np.abs(th), np.inf)
    return EigenPairs(which=which, values=th, residual_norms=r, error_bounds=gap_bounds(theta, idx, r),
                      converged=done, met=met, relative_widths=widths,
                      intervals=np.column_stack([lower, upper]), limit=limit, vectors=vectors)


def rayleigh_ritz(op: Operator, X: np.ndarray, which: Union[str, Sequence[str]] = ("LA", "SA"), k: int = 1,
                  tol: float | None = None, rtol: Rtol = None, accuracy: Accuracy | None = None,
                  limits: Mapping[str, float | None] | None = None, AX: np.ndarray | None = None,
                  scale: float = 0.0) -> EigenResult:
    """Ritz pairs of ``op`` in span(X) with their true residuals, from one product per column
    of X (counted in ``hvps`` and ``fpe``; ``AX``: those products, already computed). The values
    are those of ``op`` itself, so the Rayleigh–Ritz side of every interval is certain whatever X
    was found on. ``limits``: a probabilistic "nothing beyond" per end from the run that found X,
    passed through. ``scale``: ‖A‖ as known beyond span(X), for ``tol`` (at least max|θ| here)."""
    t0, hvps0, fpe0 = time.perf_counter(), op.hvps, op.fpe
    ends = parse_which(which)
    accuracy = accuracy or Accuracy.of(tol, rtol, ends)
    X = np.asarray(X, dtype=np.float64)
    Q, R = np.linalg.qr(X)
    AQ = np.asarray(op.matmat(Q)) if AX is None else np.linalg.solve(R.T, np.asarray(AX).T).T   # A X R⁻¹
    T = Q.T @ AQ
    theta, Y = np.linalg.eigh((T + T.T) / 2)
    vectors = Q @ Y
    residuals = np.linalg.norm(AQ @ Y - vectors * theta, axis=0)
    scale = max(scale, float(np.abs(theta).max()))
    pairs = {}
    for w in ends:
        idx = select(theta, w, k)
        pairs[w] = end_pairs(w, theta, residuals, idx, accuracy, scale, (limits or {}).get(w), vectors[:, idx])
    return EigenResult(pairs=pairs, hvps=op.hvps - hvps0, fpe=op.fpe - fpe0, seconds=time.perf_counter() - t0,
                       stop_reason="certified", accuracy=accuracy.to_dict())
