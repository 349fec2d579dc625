"""``subset``: a fixed fraction of the data against all of it (Alain et al. 2019, §3) — how far
the k extreme eigenvalues of the subset's Hessian lie from the full data's, and the angles
between matching eigenvectors (the i-th of one against the i-th of the other, and against its
best match among the other's k: a swap of two close eigenvalues is not a different direction).
The subset is spread evenly over every shard (:meth:`Operator.subset`)."""
from __future__ import annotations

import time

import numpy as np

from ..operator import Operator
from ..solvers.lanczos import lanczos


def angles_deg(A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(angle between column i of A and of B, angle between column i of A and its closest column of B), degrees."""
    cos = np.abs(A.T @ B) / np.outer(np.linalg.norm(A, axis=0), np.linalg.norm(B, axis=0))
    cos = np.clip(cos, 0.0, 1.0)
    return np.degrees(np.arccos(np.diag(cos))), np.degrees(np.arccos(cos.max(axis=1)))


def compare_subset(op: Operator, *, fraction: float = 0.05, k: int = 5, tol: float = 1e-4,
                   seed: int | None = None) -> dict:
    """LA(k), SA(k) on ``fraction`` of the data and on all of it (see the module docstring)."""
    t0 = time.perf_counter()
    sub = op.subset(fraction)
    part = lanczos(sub, which="LA,SA", k=k, tol=tol, seed=seed)
    full = lanczos(op, which="LA,SA", k=k, tol=tol, seed=seed)
    ends = {}
    for end in ("LA", "SA"):
        s, f = part.pairs[end], full.pairs[end]
        same, best = angles_deg(s.vectors, f.vectors)
        ends[end] = {"subset": s.values.tolist(), "full": f.values.tolist(),
                     "difference": (s.values - f.values).tolist(),
                     "relative_difference": ((s.values - f.values) / np.abs(f.values)).tolist(),
                     "angle_deg": same.tolist(), "best_match_angle_deg": best.tolist(),
                     "converged": [bool(s.converged.all()), bool(f.converged.all())]}
    return {"fraction": fraction, "subset_samples": sub.n_samples, "samples": op.n_samples, "k": k, "tol": tol,
            "ends": ends, "subset_fpe": part.fpe, "full_fpe": full.fpe, "hvps": part.hvps + full.hvps,
            "fpe": part.fpe + full.fpe, "seed": full.seed, "seconds": time.perf_counter() - t0}


def plot_subset(out: dict, path: str) -> None:
    """PNG: subset against full eigenvalues at each end, and the angles between matching vectors."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for end, marker in (("LA", "o"), ("SA", "s")):
        e = out["ends"][end]
        left.plot(e["full"], e["subset"], marker, ls="", label=f"{end} (k = {len(e['full'])})")
        right.plot(range(1, len(e["full"]) + 1), e["angle_deg"], marker + "-", label=f"{end}: i-th vs i-th")
        right.plot(range(1, len(e["full"]) + 1), e["best_match_angle_deg"], marker + ":", label=f"{end}: best match")
    lo = min(min(out["ends"][e]["full"] + out["ends"][e]["subset"]) for e in ("LA", "SA"))
    hi = max(max(out["ends"][e]["full"] + out["ends"][e]["subset"]) for e in ("LA", "SA"))
    left.plot([lo, hi], [lo, hi], color="grey", lw=0.8, label="y = x")
    left.set_xlabel("eigenvalue, all the data")
    left.set_ylabel(f"eigenvalue, {100 * out['fraction']:g}% subset")
    left.set_xscale("symlog", linthresh=max(1e-3, 1e-3 * max(abs(lo), abs(hi))))
    left.set_yscale("symlog", linthresh=max(1e-3, 1e-3 * max(abs(lo), abs(hi))))
    left.legend(fontsize=8)
    right.set_xlabel("index i")
    right.set_ylabel("angle (degrees)")
    right.set_ylim(0, 90)
    right.legend(fontsize=8)
    fig.suptitle(f"{out['subset_samples']:,} of {out['samples']:,} samples against all of them")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
