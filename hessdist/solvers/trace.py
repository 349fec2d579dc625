"""Trace estimates with error bars: Hutchinson and Hutch++.

Hutchinson: tr(A) ≈ mean of zᵀAz over Rademacher z. Hutch++ (Meyer, Musco, Musco, Woodruff
2021) spends a third of its products on a sketch Q of A's dominant range, takes tr(QᵀAQ)
exactly and runs Hutchinson on the deflated (I − QQᵀ)A(I − QQᵀ): for Hessians with a few large
outliers over a bulk, far less variance for the same products. Error bars: the sample standard
error of the stochastic part with a Student-t quantile.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ..errors import InputError
from ..operator import Operator
from .lanczos import draw_seed


@dataclass(frozen=True)
class TraceEstimate:
    """``value`` ± half the width of ``interval`` (at ``confidence``); ``hvps`` products."""

    method: str
    value: float
    std_error: float
    interval: tuple[float, float]
    confidence: float
    samples: int
    hvps: int
    seconds: float
    fpe: float = 0.0
    seed: int | None = None

    def to_dict(self) -> dict:
        return {"method": self.method, "trace": self.value, "std_error": self.std_error,
                "interval": list(self.interval), "confidence": self.confidence, "samples": self.samples,
                "hvps": self.hvps, "fpe": self.fpe, "seconds": self.seconds, "seed": self.seed}


def _rademacher(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.choice([-1.0, 1.0], size=(n, k))


def _quadratic_forms(op: Operator, Z: np.ndarray, block: int) -> np.ndarray:
    """zᵢᵀ A zᵢ for the columns of Z, ``block`` columns per product call."""
    out = []
    for j in range(0, Z.shape[1], block):
        Zb = Z[:, j:j + block]
        out.append(np.sum(Zb * np.asarray(op.matmat(Zb)), axis=0))
    return np.concatenate(out)


def _estimate(method: str, exact: float, samples: np.ndarray, confidence: float, hvps: int, t0: float,
              fpe: float, seed: int) -> TraceEstimate:
    s = len(samples)
    std_error = float(samples.std(ddof=1) / math.sqrt(s)) if s > 1 else math.inf
    half = float(stats.t.ppf((1 + confidence) / 2, s - 1)) * std_error if s > 1 else math.inf
    value = exact + float(samples.mean())
    return TraceEstimate(method=method, value=value, std_error=std_error, interval=(value - half, value + half),
                         confidence=confidence, samples=s, hvps=hvps, seconds=time.perf_counter() - t0, fpe=fpe,
                         seed=seed)


def _check(hvps: int, minimum: int, confidence: float) -> None:
    if hvps < minimum:
        raise InputError(f"need at least {minimum} products for this estimator, got hvps={hvps}")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def hutchinson(op: Operator, *, hvps: int = 30, block: int = 8, seed: int | None = None,
               confidence: float = 0.95) -> TraceEstimate:
    """tr(A) from ``hvps`` Rademacher probes (``seed``: drawn fresh when None, and reported)."""
    _check(hvps, 2, confidence)
    seed = draw_seed(seed)
    t0, rng, fpe0 = time.perf_counter(), np.random.default_rng(seed), op.fpe
    samples = _quadratic_forms(op, _rademacher(rng, op.n, hvps), block)
    return _estimate("hutchinson", 0.0, samples, confidence, hvps, t0, op.fpe - fpe0, seed)


def hutchpp(op: Operator, *, hvps: int = 30, block: int = 8, seed: int | None = None,
            confidence: float = 0.95) -> TraceEstimate:
    """tr(A) by Hutch++ with ``hvps`` products: a third sketch A's range, a third give the exact
    trace on it, a third estimate the rest (``seed``: drawn fresh when None, and reported)."""
    _check(hvps, 6, confidence)
    seed = draw_seed(seed)
    t0, rng, fpe0 = time.perf_counter(), np.random.default_rng(seed), op.fpe
    s = hvps // 3
    S = _rademacher(rng, op.n, s)
    AS = np.column_stack([np.asarray(op.matmat(S[:, j:j + block])) for j in range(0, s, block)])
    Q, _ = np.linalg.qr(AS)
    exact = float(np.sum(Q * np.column_stack([np.asarray(op.matmat(Q[:, j:j + block]))
                                              for j in range(0, s, block)])))
    G = _rademacher(rng, op.n, hvps - 2 * s)
    G -= Q @ (Q.T @ G)
    samples = _quadratic_forms(op, G, block)
    return _estimate("hutch++", exact, samples, confidence, hvps, t0, op.fpe - fpe0, seed)
