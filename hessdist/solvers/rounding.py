"""When a rounded answer needs no confirming product: the inexact-Krylov residual gap.

With rounded products (float32, TF32, bfloat16, finite differences) or a float32 basis, the
computed fl(A q_j) = A q_j + e_j, and a residual read off the projection C is the residual of
the computed products: for a Ritz pair x = Q y it differs from the one a real product gives by
the gap d = fl(A x) − Q C y (what the projection predicts A x to be), of norm at most about
‖Σ y_j e_j‖ — the products' rounding, whatever the projected residual has fallen to. A
confirmation (one real product per pair) measures d for the very vectors it checks; the
operator keeps the largest ‖d‖ relative to the spectrum's scale (max|θ|), per basis precision
(:func:`measure`). A later solve on the same operator (the next epoch: other parameters, the
same model and arithmetic) adds ``SAFETY`` times that ratio, at its own scale, to every residual
and widens each interval's certain side by the same amount; an end whose pairs still meet the
accuracy with it needs no confirmation (:func:`allowance`). Near the rounding level — a target
residual within ``SAFETY`` gaps of zero — the inflated residuals miss and the end is confirmed,
which also measures the gap again.

``SAFETY`` = 10: the ratio is one solve's measurement on its own vectors, reused at other
parameters; along the digits training (benchmarks/results/warm_chain.json, ``rounding_gap``)
it varies by less than that between epochs. ``SCALE_WINDOW`` = 4: a measurement is reused only
while max|θ| stays within a factor 4 of the scale it was taken at (a spectrum that moved further
is a different regime for the rounding), else the end is confirmed and the gap measured anew;
λ_max moves by up to 2.6× between the tests' early SGD states and 2.2× between the digits
epochs.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..operator import Operator
from .results import EigenPairs

SAFETY = 10.0
SCALE_WINDOW = 4.0


def measure(op: Operator, basis_dtype: torch.dtype, gaps: np.ndarray, scale: float) -> None:
    """Record a confirmation's gaps ‖fl(Ax) − QCy‖ (one per confirmed pair) at ``scale``."""
    if scale > 0 and len(gaps):
        op.rounding_gaps = {**(op.rounding_gaps or {}), str(basis_dtype): (float(np.max(gaps)) / scale, scale)}


def allowance(op: Operator, basis_dtype: torch.dtype, scale: float) -> float | None:
    """What to add to each projected residual at ``scale``: ``SAFETY`` × the measured gap ratio ×
    scale; None when nothing usable was measured (never, or at a scale outside ``SCALE_WINDOW``)."""
    ratio, at = (op.rounding_gaps or {}).get(str(basis_dtype), (None, None))
    if ratio is None or not at / SCALE_WINDOW <= scale <= at * SCALE_WINDOW:
        return None
    return SAFETY * ratio * scale


def widen_certain_side(pairs: EigenPairs, gap: float) -> EigenPairs:
    """The Rayleigh–Ritz side of each interval moved out by ``gap``: a projected θ is the
    Rayleigh quotient of the computed products, within the gap of the operator's own."""
    lower, upper = pairs.intervals[:, 0].copy(), pairs.intervals[:, 1].copy()
    if pairs.which == "LA":
        lower -= gap
    elif pairs.which == "SA":
        upper += gap
    return dataclasses.replace(pairs, intervals=np.column_stack([lower, upper]))
