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
from ..basis import HOST_BASIS_BYTES
from .starts import draw_seed


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


def _quadratic_forms(op: Operator, rng: np.random.Generator, count: int, block: int,
                     deflate: np.ndarray | None = None) -> np.ndarray:
    """zᵢᵀ A zᵢ for ``count`` Rademacher probes (projected off ``deflate``'s orthonormal columns
    when given), drawn ``block`` at a time: memory n × block, whatever ``count`` is."""
    out = []
    for j in range(0, count, block):
        Z = _rademacher(rng, op.n, min(block, count - j))
        if deflate is not None:
            Z -= deflate @ (deflate.T @ Z)
        out.append(np.sum(Z * np.asarray(op.matmat(Z)), axis=0))
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
    """tr(A) from ``hvps`` Rademacher probes, drawn ``block`` at a time (memory n × block;
    ``seed``: drawn fresh when None, and reported)."""
    _check(hvps, 2, confidence)
    seed = draw_seed(seed)
    t0, rng, fpe0 = time.perf_counter(), np.random.default_rng(seed), op.fpe
    samples = _quadratic_forms(op, rng, hvps, block)
    return _estimate("hutchinson", 0.0, samples, confidence, hvps, t0, op.fpe - fpe0, seed)


def hutchpp(op: Operator, *, hvps: int = 30, block: int = 8, seed: int | None = None,
            confidence: float = 0.95, max_bytes: int = HOST_BASIS_BYTES) -> TraceEstimate:
    """tr(A) by Hutch++ with ``hvps`` products: a third sketch A's range, a third give the exact
    trace on it, a third estimate the rest (``seed``: drawn fresh when None, and reported). The
    sketch and its orthonormal basis take 2 · n · hvps/3 floats, refused beyond ``max_bytes``
    (use fewer products or Hutchinson); every other probe is drawn ``block`` at a time."""
    _check(hvps, 6, confidence)
    s = hvps // 3
    if 2 * op.n * s * 8 > max_bytes:
        raise InputError(f"Hutch++'s sketch of {s} vectors of n = {op.n:,} takes {2 * op.n * s * 8 / 2**30:.1f} GiB, "
                         f"over max_bytes = {max_bytes / 2**30:.1f} GiB: use fewer --hvps, raise max_bytes, or "
                         "--method hutchinson (memory n × block)")
    seed = draw_seed(seed)
    t0, rng, fpe0 = time.perf_counter(), np.random.default_rng(seed), op.fpe
    AS = np.empty((op.n, s))
    for j in range(0, s, block):
        AS[:, j:j + block] = np.asarray(op.matmat(_rademacher(rng, op.n, min(block, s - j))))
    Q, _ = np.linalg.qr(AS, mode="reduced")
    del AS
    exact = float(sum(np.sum(Q[:, j:j + block] * np.asarray(op.matmat(Q[:, j:j + block])))
                      for j in range(0, s, block)))
    samples = _quadratic_forms(op, rng, hvps - 2 * s, block, deflate=Q)
    return _estimate("hutch++", exact, samples, confidence, hvps, t0, op.fpe - fpe0, seed)
