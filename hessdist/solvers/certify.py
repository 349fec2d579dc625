"""Search on a data subset, certify on the full data.

A product over a fraction f of the data costs f of a full one, and the subset Hessian's extreme
eigenvectors are close to the full one's. So: run the search on a subset, then spend ONE full
product per Ritz vector for a Rayleigh–Ritz step on the full data — exact Rayleigh quotients
(Ritz values of the full operator, so θ ≤ λ_max and θ ≥ λ_min hold) and true residual norms.
Double the subset, warm-starting from the last vectors, until the certified full-data values
stop moving. (A subset overstates both ends on average; the certified values do not.)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np

from ..errors import InputError
from ..operator import Operator
from .lanczos import lanczos
from .results import EigenResult
from .ritz import parse_which, rayleigh_ritz


@dataclass(frozen=True)
class SubsetSearch:
    """The certified full-data result (its ``hvps``: products over the full data) and, per subset
    size, what the subset said and what the full data certified. ``hvps_equivalent`` counts a
    product over a fraction f of the data as f."""

    result: EigenResult
    levels: list[dict] = field(default_factory=list)
    hvps_equivalent: float = 0.0

    def to_dict(self) -> dict:
        return {**self.result.to_dict(), "subset_levels": self.levels, "hvps_equivalent": self.hvps_equivalent}


def _angles(X: np.ndarray, Y: np.ndarray) -> list[float]:
    """Angles (radians) between matching unit columns, sign-blind."""
    cos = np.abs(np.sum(X * Y, axis=0)) / (np.linalg.norm(X, axis=0) * np.linalg.norm(Y, axis=0))
    return np.arccos(np.clip(cos, 0.0, 1.0)).tolist()


def subset_search(op: Operator, *, which: Union[str, Sequence[str]] = ("LA", "SA"), k: int = 1,
                  tol: float = 1e-4, start_fraction: float = 0.125, move_tol: float = 1e-3,
                  seed: int = 0, **solve_options) -> SubsetSearch:
    """Search on the leading ``start_fraction`` of the data, certify on all of it, and double the
    fraction (warm-starting from the subset vectors) until the certified values move by at most
    ``move_tol`` × max|λ| between two sizes, or the subset is the whole data set. Each level
    reports subset values, certified values, their differences, the angles between the subset's
    and the certified eigenvectors, and between the certified eigenvectors of successive sizes."""
    ends = parse_which(which)
    if not 0 < start_fraction <= 1:
        raise InputError(f"start_fraction must lie in (0, 1], got {start_fraction}")
    t0, fraction, levels, previous, v0 = time.perf_counter(), float(start_fraction), [], None, None
    cost, full = 0.0, 0
    while True:
        sub = op.subset(fraction) if fraction < 1 else op
        found = lanczos(sub, which=ends, k=k, tol=tol, v0=v0, seed=seed, **solve_options)
        X = np.column_stack([found.pairs[w].vectors for w in ends])
        certified = rayleigh_ritz(op, X, ends, k, tol)
        cost += fraction * found.hvps + certified.hvps
        full += certified.hvps + (found.hvps if fraction >= 1 else 0)
        values = np.concatenate([certified.pairs[w].values for w in ends])
        scale = float(np.abs(values).max())
        move = None if previous is None else float(np.abs(values - previous).max())
        levels.append({
            "fraction": fraction, "n_samples": sub.n_samples, "subset_hvps": found.hvps,
            "subset_values": {w: found.pairs[w].values.tolist() for w in ends},
            "certified_values": {w: certified.pairs[w].values.tolist() for w in ends},
            "certified_residuals": {w: certified.pairs[w].residual_norms.tolist() for w in ends},
            "subset_minus_certified": {w: (found.pairs[w].values - certified.pairs[w].values).tolist() for w in ends},
            "angles": {w: _angles(found.pairs[w].vectors, certified.pairs[w].vectors) for w in ends},
            "angles_to_previous": None if v0 is None else {
                w: _angles(v0[:, i * k:(i + 1) * k], certified.pairs[w].vectors) for i, w in enumerate(ends)},
            "move": move})
        if fraction >= 1 or (move is not None and move <= move_tol * scale):
            break
        previous, fraction = values, min(1.0, 2 * fraction)
        v0 = np.column_stack([certified.pairs[w].vectors for w in ends])
    result = EigenResult(pairs=certified.pairs, hvps=full, seconds=time.perf_counter() - t0,
                         stop_reason="certified")
    return SubsetSearch(result=result, levels=levels, hvps_equivalent=cost)
