"""Frozen results of the eigensolvers: every value comes with its residual, bound and flag."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

WHICH = ("LA", "SA", "LM")


@dataclass(frozen=True)
class EigenPairs:
    """Ritz pairs for one end of the spectrum (``which``): LA descending, SA ascending, LM by |λ|.

    ``residual_norms[i]`` is ‖A xᵢ − θᵢ xᵢ‖ for the unit vector xᵢ: some eigenvalue of A lies
    within it of θᵢ (certified). ``error_bounds[i]`` refines it to min(r, r²/gap), with the gap
    to the other Ritz values standing in for the gap to the rest of the spectrum (an estimate).
    ``intervals[i]`` = [lower, upper] for the i-th eigenvalue from this end. For LA the lower
    side θᵢ ≤ λᵢ is certain (Cauchy interlacing); the upper side is θᵢ + rᵢ for a converged
    pair (holds unless an eigenvalue above was missed, e.g. a second copy of a repeated one)
    and ``limit`` (±inf without one) for an unconverged one, whose neighbouring eigenvalue need not be λᵢ. SA
    mirrors it. ``limit`` (LA/SA, runs whose start held a random vector): with the run's
    ``confidence``, no eigenvalue lies beyond it (Kuczyński–Woźniakowski bound)."""

    which: str
    values: np.ndarray
    residual_norms: np.ndarray
    error_bounds: np.ndarray
    converged: np.ndarray
    intervals: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    limit: float | None = None
    vectors: np.ndarray | None = None


@dataclass(frozen=True)
class EigenResult:
    """What a solve returns: the requested ends, the product count and how the run stopped.

    ``stop_reason`` is one of ``converged``, ``max_hvps``, ``budget``, ``exhausted`` (the
    Krylov space stopped growing: the pairs are exact for the subspace reached)."""

    pairs: dict[str, EigenPairs]
    hvps: int
    seconds: float
    stop_reason: str
    confidence: float = 0.999
    restarts: int = 0
    krylov_degree: int | None = None
    projected: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))

    @property
    def converged(self) -> bool:
        return all(bool(p.converged.all()) for p in self.pairs.values())

    @property
    def largest(self) -> EigenPairs:
        return self.pairs["LA"]

    @property
    def smallest(self) -> EigenPairs:
        return self.pairs["SA"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; an unbounded interval side is written as null."""
        out: dict[str, Any] = {}
        names = {"LA": "largest", "SA": "smallest", "LM": "largest_magnitude"}
        for which, p in self.pairs.items():
            out[names[which]] = p.values.tolist()
        out["residual_norms"] = {names[w]: p.residual_norms.tolist() for w, p in self.pairs.items()}
        out["error_bounds"] = {names[w]: p.error_bounds.tolist() for w, p in self.pairs.items()}
        out["converged_pairs"] = {names[w]: p.converged.tolist() for w, p in self.pairs.items()}
        out["intervals"] = {names[w]: [[v if np.isfinite(v) else None for v in row] for row in p.intervals.tolist()]
                            for w, p in self.pairs.items()}
        out["limits"] = {names[w]: p.limit for w, p in self.pairs.items() if p.limit is not None}
        out.update(converged=self.converged, stop_reason=self.stop_reason, hvps=self.hvps,
                   seconds=self.seconds, confidence=self.confidence, restarts=self.restarts,
                   krylov_degree=self.krylov_degree)
        return out
