"""Spectral density and eigenvalue counts by stochastic Lanczos quadrature (SLQ).

For a random unit probe z, m Lanczos steps from z give a Gauss quadrature rule — nodes θⱼ (the
Ritz values) and weights wⱼ = (first component of the j-th Ritz vector)² — with
zᵀ f(A) z ≈ Σⱼ wⱼ f(θⱼ), exact for polynomials of degree < 2m. Averaged over probes,
(1/n) tr f(A) is estimated: f = Gaussian bump → a smoothed density; f = indicator of an
interval → (1/n) × the number of eigenvalues in it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats

from ..errors import InputError
from ..operator import Operator
from .lanczos import draw_seed

Progress = Callable[[dict], None]


@dataclass(frozen=True)
class EigenvalueCount:
    """Estimated number of eigenvalues in [lower, upper] with an interval at ``confidence``.

    The interval adds two parts: the spread over probes (Student t) and, for every quadrature
    node whose Ritz interval θ ± r straddles a boundary, its full weight (those eigenvalues may
    lie on either side)."""

    lower: float
    upper: float
    estimate: float
    interval: tuple[float, float]
    confidence: float
    probe_std_error: float
    boundary_mass: float

    def to_dict(self) -> dict:
        return {"lower": self.lower, "upper": self.upper, "estimate": self.estimate,
                "interval": list(self.interval), "confidence": self.confidence,
                "probe_std_error": self.probe_std_error, "boundary_mass": self.boundary_mass}


@dataclass(frozen=True)
class SpectralDensity:
    """Quadrature rules from ``probes`` Lanczos runs: ``nodes[p]``, ``weights[p]`` (each summing
    to 1), ``node_residuals[p]`` and the tridiagonal matrices ``tridiagonals[p]``."""

    n: int
    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    node_residuals: list[np.ndarray]
    tridiagonals: list[np.ndarray]
    hvps: int
    seconds: float
    fpe: float = 0.0
    seed: int | None = None

    @property
    def support(self) -> tuple[float, float]:
        return float(min(t.min() for t in self.nodes)), float(max(t.max() for t in self.nodes))

    def default_sigma(self) -> float:
        """Smoothing width: the support divided by the number of nodes per probe."""
        lo, hi = self.support
        return max(hi - lo, 1e-12) / max(max(len(t) for t in self.nodes), 1)

    def density(self, grid: np.ndarray | None = None, sigma: float | None = None,
                points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """(grid, φ(grid)): the Gaussian-smoothed density, which integrates to 1 over the real line
        (the default grid spans the support ± 5σ)."""
        sigma = self.default_sigma() if sigma is None else float(sigma)
        if not sigma > 0:
            raise InputError(f"sigma must be positive, got {sigma}")
        if grid is None:
            lo, hi = self.support
            grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, points)
        grid = np.asarray(grid, dtype=np.float64)
        phi = np.zeros_like(grid)
        for theta, w in zip(self.nodes, self.weights):
            phi += (w[None, :] * np.exp(-0.5 * ((grid[:, None] - theta[None, :]) / sigma) ** 2)).sum(axis=1)
        return grid, phi / (len(self.nodes) * sigma * math.sqrt(2 * math.pi))

    def moments(self, powers: int = 4) -> np.ndarray:
        """Estimates of tr(A^p)/n for p = 0 … powers−1 (exact per probe while p < 2m)."""
        return np.array([np.mean([w @ t ** p for t, w in zip(self.nodes, self.weights)]) for p in range(powers)])

    def count(self, lower: float = -math.inf, upper: float = math.inf,
              confidence: float = 0.95) -> EigenvalueCount:
        """How many eigenvalues lie in [lower, upper]; ``count(threshold)`` estimates the number
        above a threshold (a numerical rank)."""
        if not lower < upper:
            raise InputError(f"need lower < upper, got [{lower}, {upper}]")
        if not 0 < confidence < 1:
            raise InputError(f"confidence must lie strictly between 0 and 1, got {confidence}")
        per_probe, ambiguous = [], []
        for theta, w, r in zip(self.nodes, self.weights, self.node_residuals):
            per_probe.append(self.n * w[(theta >= lower) & (theta <= upper)].sum())
            straddles = np.zeros(theta.shape, dtype=bool)
            for b in (lower, upper):
                if math.isfinite(b):
                    straddles |= np.abs(theta - b) <= r
            ambiguous.append(self.n * w[straddles].sum())
        per_probe = np.array(per_probe)
        p = len(per_probe)
        std_error = float(per_probe.std(ddof=1) / math.sqrt(p)) if p > 1 else math.inf
        t = float(stats.t.ppf((1 + confidence) / 2, p - 1)) if p > 1 else math.inf
        estimate, boundary = float(per_probe.mean()), float(np.mean(ambiguous))
        half = t * std_error + boundary
        return EigenvalueCount(lower=lower, upper=upper, estimate=estimate,
                               interval=(max(0.0, estimate - half), min(float(self.n), estimate + half)),
                               confidence=confidence, probe_std_error=std_error, boundary_mass=boundary)


def slq(op: Operator, *, probes: int = 10, steps: int = 80, seed: int | None = None,
        callback: Progress | None = None) -> SpectralDensity:
    """``probes`` Lanczos runs of ``steps`` products each from random Rademacher probes (fully
    re-orthogonalised, on the operator's Krylov basis); a run that finds an invariant subspace
    stops early with an exact rule. ``seed``: drawn fresh when None, and reported."""
    if probes < 1 or steps < 1:
        raise InputError(f"probes and steps must be positive, got probes={probes}, steps={steps}")
    steps = min(steps, op.n)
    seed = draw_seed(seed)
    rng = np.random.default_rng(seed)
    t0, hvps, fpe0 = time.perf_counter(), 0, op.fpe
    nodes, weights, residuals, tridiagonals = [], [], [], []
    for p in range(probes):
        basis = op.krylov_basis()
        basis.add_start(rng.choice([-1.0, 1.0], size=op.n))
        C = np.zeros((steps + 1, steps))
        m = 0
        while m < steps and basis.size > m:
            col = basis.expand(m)[0]
            C[: len(col), m] = col
            m, hvps = m + 1, hvps + 1
        T = (C[:m, :m] + C[:m, :m].T) / 2
        theta, Y = np.linalg.eigh(T)
        nodes.append(theta)
        weights.append(Y[0] ** 2)
        residuals.append(np.abs(C[m, m - 1] * Y[m - 1]) if basis.size > m else np.zeros(m))
        tridiagonals.append(T)
        if callback is not None:
            callback({"probe": p + 1, "probes": probes, "hvps": hvps, "seconds": time.perf_counter() - t0})
    return SpectralDensity(n=op.n, nodes=nodes, weights=weights, node_residuals=residuals,
                           tridiagonals=tridiagonals, hvps=hvps, seconds=time.perf_counter() - t0,
                           fpe=op.fpe - fpe0, seed=seed)
