"""``decompose``: the Hessian as Gauss–Newton plus the rest, next to the empirical Fisher.

    H = G + S,   G = (1/N) Σᵢ Jᵢᵀ ∇²_o ℓᵢ Jᵢ   (PSD for a convex loss of the outputs),
                 S = (1/N) Σᵢ Σ_c ∂ℓᵢ/∂o_c ∇²o_c   (the model's own curvature, weighted by the residuals),
    F̂ = (1/N) Σᵢ ∇ℓᵢ ∇ℓᵢᵀ   (the empirical Fisher: per-sample gradients, not a curvature of f).

For each matrix at each checkpoint: λ_max, λ_min and the trace (Hutch++ with an error bar), all
from the same operator switched between curvatures (no rebuilt workers). Over training the
studies saw S shrink against G as the residuals do; F̂ tracks G only where the model fits the
labels (it is G at a perfect fit of the data's own distribution, not in general).
"""
from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import torch

from ..operator import Operator
from ..solvers.lanczos import lanczos
from ..solvers.trace import hutchpp

#: in the order the summary prints them
CURVATURES = ("hessian", "ggn", "residual", "empirical-fisher")


def decompose_at(op: Operator, *, tol: float = 1e-3, trace_hvps: int = 60, seed: int | None = None,
                 curvatures: Sequence[str] = CURVATURES) -> dict:
    """{curvature: {"largest", "smallest", "residuals", "trace", "trace_interval", "hvps"}} at
    ``op``'s current parameters. ``tol`` is relative to ‖A‖ (G and F̂ are PSD: their λ_min sits
    at 0, where a relative accuracy means nothing)."""
    rows = {}
    for curvature in curvatures:
        view = op.with_curvature(curvature)
        t0, hvps0, fpe0 = time.perf_counter(), view.hvps, view.fpe
        res = lanczos(view, which="LA,SA", k=1, tol=tol, seed=seed, return_vectors=False)
        trace = hutchpp(view, hvps=trace_hvps, seed=seed)
        rows[curvature] = {"largest": float(res.largest.values[0]), "smallest": float(res.smallest.values[0]),
                           "residuals": [float(res.largest.residual_norms[0]), float(res.smallest.residual_norms[0])],
                           "converged": res.converged, "trace": trace.value, "trace_interval": list(trace.interval),
                           "hvps": view.hvps - hvps0, "fpe": view.fpe - fpe0, "seconds": time.perf_counter() - t0}
    return rows


def decompose(op: Operator, checkpoints: Sequence[tuple[str, Mapping[str, torch.Tensor] | None]], *,
              tol: float = 1e-3, trace_hvps: int = 60, seed: int | None = None,
              callback: Callable[[str, dict], None] | None = None) -> list[dict]:
    """:func:`decompose_at` at each (label, state_dict) — None: the operator's current parameters."""
    out = []
    for label, state in checkpoints:
        if state is not None:
            op.set_parameters(state)
        out.append({"checkpoint": label, "curvatures": decompose_at(op, tol=tol, trace_hvps=trace_hvps, seed=seed)})
        if callback:
            callback(label, out[-1]["curvatures"])
    return out


def plot_decomposition(rows: Sequence[dict], path: str) -> None:
    """PNG: λ_max, λ_min and the trace of H, G, S and F̂ over the checkpoints."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    x = range(len(rows))
    labels = [r["checkpoint"] for r in rows]
    for ax, key, title in zip(axes, ("largest", "smallest", "trace"), ("λ_max", "λ_min", "trace")):
        for curvature, style in zip(CURVATURES, ("o-", "s--", "^-.", "d:")):
            ax.plot(x, [r["curvatures"][curvature][key] for r in rows], style, label=curvature)
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle("H = G + S, and the empirical Fisher F̂")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
