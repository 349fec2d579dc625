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
    to the other Ritz values standing in for the gap to the rest of the spectrum."""

    which: str
    values: np.ndarray
    residual_norms: np.ndarray
    error_bounds: np.ndarray
    converged: np.ndarray
    vectors: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"values": self.values.tolist(), "residual_norms": self.residual_norms.tolist(),
                "error_bounds": self.error_bounds.tolist(), "converged": self.converged.tolist()}


@dataclass(frozen=True)
class EigenResult:
    """What a solve returns: the requested ends, the product count and how the run stopped.

    ``stop_reason`` is one of ``converged``, ``max_hvps``, ``budget``, ``exhausted`` (the
    Krylov space stopped growing: the pairs are exact for the subspace reached)."""

    pairs: dict[str, EigenPairs]
    hvps: int
    seconds: float
    stop_reason: str
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
        out: dict[str, Any] = {}
        names = {"LA": "largest", "SA": "smallest", "LM": "largest_magnitude"}
        for which, p in self.pairs.items():
            out[names[which]] = p.values.tolist()
        out["residual_norms"] = {names[w]: p.residual_norms.tolist() for w, p in self.pairs.items()}
        out["error_bounds"] = {names[w]: p.error_bounds.tolist() for w, p in self.pairs.items()}
        out["converged_pairs"] = {names[w]: p.converged.tolist() for w, p in self.pairs.items()}
        out.update(converged=self.converged, stop_reason=self.stop_reason, hvps=self.hvps,
                   seconds=self.seconds)
        return out
