"""``along``: the loss along each extreme eigenvector against its quadratic model (Alain, Le Roux
& Manzagol 2019, §2.3–2.4).

For a unit eigenvector v with eigenvalue λ and slope s = gᵀv, the paper's gradient-scaled step
is d = s·v, and the loss along θ − αd has the quadratic model

    q(α) = L(θ) − α s² + ½ α² s² λ,

whose minimiser is α = 1/λ (for λ > 0). Per vector: the true loss at each α of each scale
(α ∈ [−a, a]), the second-order coefficient of a least-squares quadratic fit of it, in the units
of λ (``fitted_curvature``: 2c/s², or 2c for the unscaled step d = v), and the empirically
optimal step α* = argmin_{α>0} L(θ − αd) by a bracketing line search on the full-data loss (the
bracket grows ×2 from ``first_step`` until the loss rises; then golden-section search to a
relative tolerance ``xtol`` in α), with its loss evaluations counted and the best improvement
L(θ) − L(θ − α*d).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..operator import Operator

#: the paper's two scales: α ∈ [−0.1, 0.1] and [−1, 1]
SCALES = (0.1, 1.0)
GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass(frozen=True)
class LineSearch:
    """α* (≥ 0) minimising ``loss(α)``, the loss there, and the evaluations it took."""

    step: float
    loss: float
    evaluations: int
    bracketed: bool           # False: the loss still fell at the largest α tried (``max_step``)


def line_search(loss: Callable[[float], float], loss0: float, *, first_step: float = 1e-2, max_step: float = 1e4,
                xtol: float = 1e-3) -> LineSearch:
    """argmin_{α ≥ 0} loss(α) (``loss0`` = loss(0)): double α until the loss rises, then a
    golden-section search of the last bracket to ``xtol`` relative in α."""
    if not (first_step > 0 and max_step > first_step and 0 < xtol < 1):
        raise InputError("the line search needs 0 < first_step < max_step and 0 < xtol < 1")
    evaluations = 0

    def f(a: float) -> float:
        nonlocal evaluations
        evaluations += 1
        return loss(a)

    lo, mid, f_mid = 0.0, first_step, f(first_step)
    if f_mid >= loss0:                     # rises at once: the minimum lies in (0, first_step)
        hi = first_step
    else:
        hi = 2 * mid
        f_hi = f(hi)
        while f_hi < f_mid and hi < max_step:
            lo, mid, f_mid = mid, hi, f_hi
            hi = 2 * hi
            f_hi = f(hi)
        if f_hi < f_mid:                   # still falling at max_step
            return LineSearch(hi, f_hi, evaluations, bracketed=False)
    # golden section on [lo, hi], which holds a point below both ends
    a, b = lo, hi
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while (b - a) > xtol * max(abs(c), abs(d)):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = f(d)
    step, best = (c, fc) if fc < fd else (d, fd)
    if best >= loss0:                      # no α > 0 lowers the loss (to the search's resolution)
        step, best = 0.0, loss0
    return LineSearch(step, best, evaluations, bracketed=True)


def quadratic_fit(alphas: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """(a, b, c) of the least-squares fit a + bα + cα²."""
    return np.polynomial.polynomial.polyfit(alphas, losses, 2)


def along_vector(op: Operator, theta: np.ndarray, loss0: float, g: np.ndarray, v: np.ndarray, eigenvalue: float, *,
                 scales: Sequence[float] = SCALES, points: int = 21, scaled: bool = True,
                 xtol: float = 1e-3) -> dict:
    """The analysis for one unit eigenvector (see the module docstring)."""
    slope = float(g @ v)
    d = slope * v if scaled else v
    unit = slope ** 2 if scaled else 1.0        # d's squared length: the fit's c·2/unit is in λ's units
    evaluations = 0

    def loss(alpha: float) -> float:
        nonlocal evaluations
        evaluations += 1
        return op.loss(torch.from_numpy(theta - alpha * d))

    lines, fitted = [], []
    for a in scales:
        alphas = np.linspace(-a, a, points)
        losses = np.array([loss(x) if x != 0 else loss0 for x in alphas])
        model = loss0 - alphas * float(g @ d) + 0.5 * alphas ** 2 * unit * eigenvalue
        c = quadratic_fit(alphas, losses)[2]
        fitted.append(2 * c / unit if unit > 0 else math.nan)
        lines.append({"scale": a, "alphas": alphas.tolist(), "loss": losses.tolist(), "quadratic_model": model.tolist()})
    if unit > 0:
        first = min(1.0 / abs(eigenvalue), max(scales)) if eigenvalue != 0 else max(scales)
        search = line_search(loss, loss0, first_step=first / 8, xtol=xtol)
        optimal = {"optimal_step": search.step, "best_improvement": loss0 - search.loss, "bracketed": search.bracketed,
                   "line_search_evaluations": search.evaluations}
    else:                                        # gᵀv = 0: the scaled step does not move
        optimal = {"optimal_step": math.nan, "best_improvement": 0.0, "bracketed": False, "line_search_evaluations": 0}
    return {"eigenvalue": eigenvalue, "slope": slope, "fitted_curvature": dict(zip(map(str, scales), map(float, fitted))),
            **optimal, "loss_evaluations": evaluations, "lines": lines}


def along(op: Operator, vectors: dict[str, tuple[np.ndarray, np.ndarray]], *, scales: Sequence[float] = SCALES,
          points: int = 21, scaled: bool = True, xtol: float = 1e-3,
          callback: Callable[[str, int, dict], None] | None = None) -> dict:
    """:func:`along_vector` for each end's (eigenvalues (k,), vectors (n, k)) in ``vectors``."""
    if not scales or any(not (math.isfinite(a) and a > 0) for a in scales):
        raise InputError(f"every scale must be a positive number (α runs over [−scale, scale]), got {list(scales)}")
    if points < 3:
        raise InputError(f"a quadratic fit needs at least 3 points per scale, got {points}")
    t0, hvps0 = time.perf_counter(), op.hvps
    loss0, g = op.loss_and_gradient()
    theta, g = np.asarray(op.parameters, dtype=np.float64), np.asarray(g, dtype=np.float64)
    out = {}
    for end, (values, V) in vectors.items():
        if V.ndim != 2 or V.shape[0] != op.n or V.shape[1] != len(values):
            raise InputError(f"the {end} vectors have shape {V.shape}, but the model has n = {op.n} parameters "
                             f"and {len(values)} eigenvalues were given (saved for the same model and --params?)")
        rows = []
        for i in range(V.shape[1]):
            v = V[:, i] / np.linalg.norm(V[:, i])
            rows.append(along_vector(op, theta, loss0, g, v, float(values[i]), scales=scales, points=points,
                                     scaled=scaled, xtol=xtol))
            if callback:
                callback(end, i, rows[-1])
        out[end] = rows
    return {"loss_at_theta": loss0, "gradient_norm": float(np.linalg.norm(g)), "scaled": scaled,
            "scales": list(scales), "points": points, "xtol": xtol, "ends": out,
            "loss_evaluations": 1 + sum(r["loss_evaluations"] for rows in out.values() for r in rows),
            "hvps": op.hvps - hvps0, "seconds": time.perf_counter() - t0}


def plot_along(out: dict, prefix: str) -> list[str]:
    """The paper's figures, one PNG each: ``PREFIX-lines.png`` (loss and quadratic model along
    the top and the bottom eigenvector, each scale), ``-fits.png`` (λᵢ against the fitted
    curvature yᵢ per scale, with y = x), ``-steps.png`` (1/αᵢ* against λᵢ) and
    ``-improvement.png`` (best loss improvement against λᵢ). Returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(end, r) for end in ("LA", "SA") for r in out["ends"].get(end, [])]
    lam = np.array([r["eigenvalue"] for _, r in rows])
    paths = []

    def save(fig, name):
        fig.tight_layout()
        paths.append(f"{prefix}-{name}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    picks = [(end, out["ends"][end][0]) for end in ("LA", "SA") if out["ends"].get(end)]
    fig, axes = plt.subplots(len(picks), len(out["scales"]), figsize=(5 * len(out["scales"]), 3.6 * len(picks)),
                             squeeze=False)
    for row, (end, r) in zip(axes, picks):
        for ax, line in zip(row, r["lines"]):
            ax.plot(line["alphas"], line["loss"], "o-", ms=3, label="loss")
            ax.plot(line["alphas"], line["quadratic_model"], "--", label="quadratic model")
            ax.set_title(f"{'top' if end == 'LA' else 'bottom'} eigenvector, λ = {r['eigenvalue']:.3g}, "
                         f"α ∈ ±{line['scale']:g}", fontsize=9)
            ax.set_xlabel("α" + (" (step α·(gᵀv)·v)" if out["scaled"] else " (step α·v)"))
            ax.xaxis.set_major_locator(plt.MaxNLocator(5))
            ax.legend(fontsize=8)
    save(fig, "lines")

    fig, axes = plt.subplots(1, len(out["scales"]), figsize=(5 * len(out["scales"]), 4), squeeze=False)
    for ax, scale in zip(axes[0], out["scales"]):
        y = np.array([r["fitted_curvature"][str(scale)] for _, r in rows])
        ax.plot(lam, y, "o", ms=4)
        span = [min(lam.min(), np.nanmin(y)), max(lam.max(), np.nanmax(y))]
        ax.plot(span, span, color="grey", lw=0.8, label="y = x")
        ax.set_xlabel("eigenvalue λᵢ")
        ax.set_ylabel("fitted curvature yᵢ")
        ax.set_title(f"quadratic fit over α ∈ ±{scale:g}")
        ax.legend(fontsize=8)
    save(fig, "fits")

    steps = np.array([r["optimal_step"] for _, r in rows])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    with np.errstate(divide="ignore"):
        ax.plot(lam, np.where(steps > 0, 1.0 / steps, np.nan), "o", ms=4, label="1/α* (line search)")
    positive = lam[lam > 0]
    if positive.size:
        ax.plot(np.sort(positive), np.sort(positive), color="grey", lw=0.8, label="1/α* = λ (quadratic model)")
    ax.set_xlabel("eigenvalue λᵢ")
    ax.set_ylabel("1 / optimal step α*")
    ax.legend(fontsize=8)
    save(fig, "steps")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(lam, [r["best_improvement"] for _, r in rows], "o", ms=4)
    ax.set_xlabel("eigenvalue λᵢ")
    ax.set_ylabel("best improvement L(θ) − L(θ − α*(gᵀv)v)")
    ax.set_yscale("symlog", linthresh=1e-8)
    save(fig, "improvement")
    return paths
