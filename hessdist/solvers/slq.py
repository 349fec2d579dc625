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
import torch
from scipy import stats

from ..errors import InputError
from ..basis import BasisLost, KrylovBasis
from ..operator import Operator
from .starts import draw_seed

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
    basis_peak_bytes: int = 0
    products_redone: int = 0

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

    def to_dict(self, sigma: float | None = None, points: int = 1000) -> dict:
        """The smoothed density on its default grid, with the quadrature rules it comes from."""
        grid, phi = self.density(sigma=sigma, points=points)
        return {"grid": grid.tolist(), "density": phi.tolist(), "sigma": sigma or self.default_sigma(),
                "support": list(self.support), "moments": self.moments(3).tolist(), "probes": len(self.nodes),
                "nodes": [t.tolist() for t in self.nodes], "weights": [w.tolist() for w in self.weights],
                "tridiagonals": [T.tolist() for T in self.tridiagonals], "hvps": self.hvps, "fpe": self.fpe,
                "seconds": self.seconds}

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


def slq(op: Operator, *, probes: int = 10, steps: int = 80, seed: int | None = None, max_basis: int | None = None,
        basis_dtype: torch.dtype = torch.float64, callback: Progress | None = None) -> SpectralDensity:
    """``probes`` Lanczos runs of ``steps`` products each from random Rademacher probes, on the
    operator's Krylov basis; a run that finds an invariant subspace stops early with an exact
    rule. Each new vector is re-orthogonalised against the last ``max_basis`` ones (default:
    all of them, up to half a GPU's free memory or 4 GiB of host memory per process holding a
    part of the basis), so memory stays bounded
    by that option whatever ``steps`` is; beyond it the rule loses some accuracy to lost
    orthogonality (a window of a few tens of vectors is usual for densities). A probe whose
    basis was lost with a worker is redone. ``seed``: drawn fresh when None, and reported."""
    if probes < 1 or steps < 1:
        raise InputError(f"probes and steps must be positive, got probes={probes}, steps={steps}")
    steps = min(steps, op.n)
    share = -(-op.n // op.basis_shards) * torch.finfo(basis_dtype).bits // 8
    window = min(steps + 1, max(3, op.basis_bytes() // share)) if max_basis is None else int(max_basis)
    if window < 3:
        raise InputError(f"max_basis must be at least 3 (the three-term recurrence), got {max_basis}")
    seed = draw_seed(seed)
    rng = np.random.default_rng(seed)
    t0, hvps, fpe0, redone, peak = time.perf_counter(), 0, op.fpe, 0, 0
    nodes, weights, residuals, tridiagonals = [], [], [], []
    p = 0
    while p < probes:
        probe = rng.choice([-1.0, 1.0], size=op.n)
        basis, before = op.krylov_basis(capacity=window, dtype=basis_dtype), op.hvps
        try:
            alpha, beta = _lanczos_coefficients(basis, probe, steps)
        except BasisLost:                    # the workers holding it were lost: redo this probe
            redone += op.hvps - before
            continue
        finally:
            peak = max(peak, basis.peak_bytes)
        hvps += len(alpha)
        m = len(alpha)
        T = np.diag(alpha) + np.diag(beta[:m - 1], 1) + np.diag(beta[:m - 1], -1)
        theta, Y = np.linalg.eigh(T)
        nodes.append(theta)
        weights.append(Y[0] ** 2)
        residuals.append(np.abs(beta[m - 1] * Y[m - 1]))
        tridiagonals.append(T)
        p += 1
        if callback is not None:
            callback({"probe": p, "probes": probes, "hvps": hvps, "seconds": time.perf_counter() - t0})
    return SpectralDensity(n=op.n, nodes=nodes, weights=weights, node_residuals=residuals,
                           tridiagonals=tridiagonals, hvps=hvps, seconds=time.perf_counter() - t0,
                           fpe=op.fpe - fpe0, seed=seed, basis_peak_bytes=peak, products_redone=redone)


def _lanczos_coefficients(basis: KrylovBasis, start: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """α₀…α_{m−1} and β₁…β_m of up to ``steps`` Lanczos steps from ``start`` (β_m = 0 when an
    invariant subspace was found), keeping at most the basis's capacity of vectors: the oldest
    is dropped when it is full."""
    basis.add_start(start)
    alpha, beta, dropped = [], [], 0
    capacity = basis.capacity
    for m in range(steps):
        if basis.size == capacity:          # keep the newest vectors: drop q_dropped
            e = basis.size - 1
            basis.compress(np.eye(e)[:, 1:], e)
            dropped += 1
        col = basis.expand(m - dropped)[0]
        alpha.append(col[m - dropped])
        beta.append(col[-1])
        if col[-1] == 0.0:
            break
    return np.array(alpha), np.array(beta)
