"""``subset``: a fixed fraction of the data against all of it (Alain et al. 2019, §3) — how far
the k extreme eigenvalues of the subset's Hessian lie from the full data's, and the angles
between matching eigenvectors (the i-th of one against the i-th of the other, and against its
best match among the other's k: a swap of two close eigenvalues is not a different direction).
The subset is spread evenly over every shard (:meth:`Operator.subset`)."""
from __future__ import annotations

import time

import numpy as np

from ..operator import Operator
from ..solvers.certify import angles
from ..solvers.lanczos import lanczos


def best_match_angles(A: np.ndarray, B: np.ndarray) -> list[float]:
    """For each column of A, the angle (degrees, sign-blind) to its closest column of B."""
    cos = np.abs(A.T @ B) / np.outer(np.linalg.norm(A, axis=0), np.linalg.norm(B, axis=0))
    return np.degrees(np.arccos(np.clip(cos.max(axis=1), 0.0, 1.0))).tolist()


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
        ends[end] = {"subset": s.values.tolist(), "full": f.values.tolist(),
                     "difference": (s.values - f.values).tolist(),
                     "relative_difference": ((s.values - f.values) / np.abs(f.values)).tolist(),
                     "angle_deg": angles(s.vectors, f.vectors),
                     "best_match_angle_deg": best_match_angles(s.vectors, f.vectors),
                     "converged": [bool(s.converged.all()), bool(f.converged.all())]}
    return {"fraction": fraction, "subset_samples": sub.n_samples, "samples": op.n_samples, "k": k, "tol": tol,
            "ends": ends, "subset_fpe": part.fpe, "full_fpe": full.fpe, "hvps": part.hvps + full.hvps,
            "fpe": part.fpe + full.fpe, "seed": full.seed, "seconds": time.perf_counter() - t0}


def plot_subset(out: dict, path: str) -> None:
    """PNG: the k largest and the k smallest eigenvalues, subset against all the data, by index;
    and the angles between matching eigenvectors."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, end, title in zip(axes, ("LA", "SA"), ("largest", "smallest")):
        e = out["ends"][end]
        index = range(1, len(e["full"]) + 1)
        ax.plot(index, e["full"], "o-", label="all the data")
        ax.plot(index, e["subset"], "s--", label=f"{100 * out['fraction']:g}% subset")
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xticks(list(index))
        ax.set_xlabel("index i")
        ax.set_title(f"the {len(e['full'])} {title} eigenvalues")
        ax.legend(fontsize=8)
    for end, marker in (("LA", "o"), ("SA", "s")):
        e = out["ends"][end]
        index = range(1, len(e["full"]) + 1)
        axes[2].plot(index, e["angle_deg"], marker + "-", label=f"{end}: i-th vs i-th")
        axes[2].plot(index, e["best_match_angle_deg"], marker + ":", label=f"{end}: best match")
    axes[2].set_xticks(list(range(1, out["k"] + 1)))
    axes[2].set_xlabel("index i")
    axes[2].set_ylabel("angle between eigenvectors (degrees)")
    axes[2].set_ylim(0, 90)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{out['subset_samples']:,} of {out['samples']:,} samples against all of them")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
