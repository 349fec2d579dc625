"""Frozen results of the eigensolvers: every value comes with its residual, bound and flag."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

WHICH = ("LA", "SA", "LM")
END_NAMES = {"LA": "largest", "SA": "smallest", "LM": "largest_magnitude"}


def _finite_or_none(rows: np.ndarray) -> list:
    return [[v if np.isfinite(v) else None for v in row] for row in np.asarray(rows).tolist()]


@dataclass(frozen=True)
class EigenPairs:
    """Ritz pairs for one end of the spectrum (``which``): LA descending, SA ascending, LM by |λ|.

    Certain, for the unit vector xᵢ: some eigenvalue of A lies within ``residual_norms[i]``
    = ‖A xᵢ − θᵢ xᵢ‖ of θᵢ, and θᵢ ≤ λᵢ for the i-th largest (Cauchy interlacing; SA mirrored).
    ``relative_widths[i]`` = rᵢ/|θᵢ|. ``met[i]``: ``"rtol"`` (rᵢ ≤ rtol·|θᵢ|), ``"tol"`` (rᵢ ≤
    tol·max|θ|; with rtol given, the floor for a value at or near 0) or ``""`` (not done);
    ``converged[i]`` is ``met[i] != ""``. ``error_bounds[i]`` refines rᵢ to min(r, r²/gap) with
    the gap to the other Ritz values standing in for the gap to the rest of the spectrum (an
    estimate). ``intervals[i]`` = [lower, upper] for λᵢ: the Rayleigh–Ritz side is certain; the
    far side is θᵢ ± rᵢ for a done pair — λᵢ itself unless an eigenvalue beyond was missed (an
    outlier the start vector hid, a second copy of a repeated one), out to ``limit`` for the
    extreme pair where there is one — and ``limit`` (±inf without one) for a pair not done.
    ``limit`` (LA/SA, runs whose start held a random vector): with the run's ``confidence``, no
    eigenvalue lies beyond it (:mod:`hessdist.solvers.limits`)."""

    which: str
    values: np.ndarray
    residual_norms: np.ndarray
    error_bounds: np.ndarray
    converged: np.ndarray
    met: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="<U4"))
    relative_widths: np.ndarray = field(default_factory=lambda: np.zeros(0))
    intervals: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    limit: float | None = None
    vectors: np.ndarray | None = None


@dataclass(frozen=True)
class EigenResult:
    """What a solve returns: the requested ends, its cost and how the run stopped.

    ``hvps``: products, one per column of a block, on whatever data they ran; ``fpe``: full-data
    product equivalents (a product over a fraction f of the data costs f). ``stop_reason`` is one
    of ``converged``, ``max_hvps``, ``max_fpe``, ``budget``, ``exhausted`` (the Krylov space
    stopped growing: the pairs are exact for the subspace reached), ``certified`` (a
    Rayleigh–Ritz check) or ``precision`` (the residuals confirmed with real products miss the
    accuracy the projection reported: the products' precision limits the answer). ``seed`` is the
    random seed the run drew (pass it back to repeat the run). ``recoveries``: times a basis on
    lost workers was rebuilt from the last checkpoint, with ``products_redone`` products lost;
    ``basis_peak_bytes``: the most memory the basis took per process holding a part of it.
    ``confirmation``: per end, whether its pairs were confirmed with real products and why;
    ``rounding_gap``: what was added to every projected residual for the products' rounding
    (None: nothing, the pairs were confirmed or the products are exact)."""

    pairs: dict[str, EigenPairs]
    hvps: int
    seconds: float
    stop_reason: str
    fpe: float = 0.0
    confidence: float = 0.999
    restarts: int = 0
    krylov_degree: int | None = None
    seed: int | None = None
    accuracy: dict = field(default_factory=dict)
    confirm_hvps: int = 0
    confirmation: dict[str, str] = field(default_factory=dict)
    rounding_gap: float | None = None
    recoveries: int = 0
    products_redone: int = 0
    basis_peak_bytes: int = 0
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
        """JSON-ready; an unbounded interval side or relative width is written as null."""
        out: dict[str, Any] = {}
        pairs = {END_NAMES[w]: p for w, p in self.pairs.items()}
        for name, p in pairs.items():
            out[name] = p.values.tolist()
        out["residual_norms"] = {name: p.residual_norms.tolist() for name, p in pairs.items()}
        out["relative_widths"] = {name: _finite_or_none(p.relative_widths[None])[0] for name, p in pairs.items()}
        out["error_bounds"] = {name: p.error_bounds.tolist() for name, p in pairs.items()}
        out["converged_pairs"] = {name: p.converged.tolist() for name, p in pairs.items()}
        out["met"] = {name: [m or None for m in p.met.tolist()] for name, p in pairs.items()}
        out["intervals"] = {name: _finite_or_none(p.intervals) for name, p in pairs.items()}
        out["limits"] = {name: p.limit for name, p in pairs.items() if p.limit is not None}
        out.update(converged=self.converged, stop_reason=self.stop_reason, hvps=self.hvps, fpe=self.fpe,
                   seconds=self.seconds, confidence=self.confidence, restarts=self.restarts,
                   krylov_degree=self.krylov_degree, seed=self.seed, accuracy=self.accuracy,
                   confirm_hvps=self.confirm_hvps, confirmation=self.confirmation, rounding_gap=self.rounding_gap,
                   recoveries=self.recoveries, products_redone=self.products_redone,
                   basis_peak_bytes=self.basis_peak_bytes)
        return out
