"""``verify``: check hessdist's own products and solver on a model small enough for a dense matrix.

The dense matrix M is built from products of the unit vectors (n products, in blocks), so it is
exactly what every solver sees. Reported: its asymmetry ‖M − Mᵀ‖/‖M‖ (a fixed symmetric map has
none beyond rounding), its error against the full-data Hessian from ``torch.func.hessian`` in
float64 (an independent derivative of the same loss; Hessian only), and the extremes from
:func:`~hessdist.solvers.lanczos.lanczos` against ``torch.linalg.eigh`` — with whether each
certified interval holds eigh's value, up to how far the products' own matrix may move it
(Weyl: ‖M − H‖₂, with eigh's rounding).
"""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..batch_products import BatchProducts
from ..data import DataLike, load_batches
from ..errors import InputError
from ..objective import objective_of
from ..operator import Operator
from ..params import ParameterLayout
from ..solvers.lanczos import lanczos

#: the largest n verify builds a dense matrix for by default (n products, n² float64 entries)
MAX_N = 5000


def check_size(n: int, max_n: int = MAX_N) -> None:
    """Refuse a model too large for a dense matrix, naming the way round."""
    if n > max_n:
        raise InputError(f"verify builds the dense {n:,} × {n:,} matrix from {n:,} products and "
                         f"refuses n > {max_n:,} (--max-n): select a few layers with --params, or raise --max-n "
                         f"knowing it costs n products and {n ** 2 * 8 / 2**30:.1f} GiB per dense matrix")


def dense_matrix(op: Operator, block: int = 64, callback: Callable[[int], None] | None = None) -> np.ndarray:
    """M = [A e₁ … A eₙ] from ``op``'s own products, ``block`` unit vectors per call."""
    M = np.empty((op.n, op.n))
    for start in range(0, op.n, block):
        stop = min(start + block, op.n)
        E = np.zeros((op.n, stop - start))
        E[np.arange(start, stop), np.arange(stop - start)] = 1.0
        M[:, start:stop] = np.asarray(op.matmat(E))
        if callback:
            callback(stop)
    return M


def reference_hessian(model: nn.Module, loss: Any, data: DataLike, params: Sequence[str] | None = None,
                      batch_size: int = 32, callback: Callable[[int], None] | None = None) -> np.ndarray:
    """∇²f(θ) of the full-data mean loss in float64 by ``torch.func.hessian``, summed batch by
    batch (small batches: the forward-over-reverse Jacobian holds n tangents of a batch). Costs
    n tangent passes over the data, about twice to three times n products; ``callback(samples
    done)`` after each batch."""
    model = copy.deepcopy(model).double().eval()
    layout = ParameterLayout.of(model, params)
    objective = objective_of(loss)
    products = BatchProducts(model, objective, layout, torch.float64)
    theta = layout.flatten(layout.gather(model))
    total, samples = torch.zeros(layout.n, layout.n, dtype=torch.float64), 0
    for batch in load_batches(data, batch_size, dtype=torch.float64, placement="device", pairs=objective.pairs):
        total += torch.func.hessian(lambda t: products.loss_sum(layout.unflatten(t), batch))(theta)
        samples += objective.count(batch)
        if callback:
            callback(samples)
    return (total / samples).numpy()


def copies(lam: np.ndarray, value: float, slack: float) -> int:
    """How many of the eigenvalues ``lam`` equal ``value`` (to ``slack``, at least 1e-10·‖A‖): a
    miss at a repeated eigenvalue is the single-vector Krylov limit, not a wrong product."""
    return int(np.sum(np.abs(lam - value) <= max(slack, 1e-10 * float(np.abs(lam).max()))))


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """‖a − b‖_F / ‖b‖_F."""
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-300))


def verify(op: Operator, *, k: int = 3, tol: float | None = None, seed: int | None = None,
           reference: np.ndarray | None = None, max_n: int = MAX_N,
           callback: Callable[[int], None] | None = None) -> dict:
    """Dense checks of ``op`` (see the module docstring); ``reference``: the float64 Hessian from
    :func:`reference_hessian` (None: no reference, e.g. for another curvature). ``tol``: the
    solver's, default 1e-8 for exact (float64) products and 1e-5 for float32 ones."""
    check_size(op.n, max_n)
    if not 1 <= k <= op.n // 2:
        raise InputError(f"k must lie in [1, n/2 = {op.n // 2}], got {k}")
    tol = tol if tol is not None else (1e-8 if op.exact else 1e-5)
    t0, hvps0 = time.perf_counter(), op.hvps
    M = dense_matrix(op, callback=callback)
    dense_hvps, seconds = op.hvps - hvps0, time.perf_counter() - t0
    symmetric = (M + M.T) / 2
    truth = reference if reference is not None else symmetric
    lam = torch.linalg.eigvalsh(torch.from_numpy(truth)).numpy()
    # Weyl: the products' matrix moves each eigenvalue by at most ‖M − truth‖₂; eigh's own rounding ~ n·eps·‖M‖
    slack = float(np.linalg.norm(M - truth, 2)) + 10 * op.n * np.finfo(np.float64).eps * float(np.abs(lam).max())
    result = lanczos(op, which="LA,SA", k=k, tol=tol, seed=seed, return_vectors=False)
    ends = {}
    for end, exact in (("LA", lam[::-1][:k]), ("SA", lam[:k])):
        pairs = result.pairs[end]
        inside = [bool(lo - slack <= e <= hi + slack) for e, (lo, hi) in zip(exact, pairs.intervals)]
        ends[end] = {"solver": pairs.values.tolist(), "eigh": exact.tolist(),
                     "relative_error": (np.abs(pairs.values - exact) / np.abs(exact)).tolist(),
                     "residual_norms": pairs.residual_norms.tolist(), "intervals": pairs.intervals.tolist(),
                     "eigh_in_interval": inside}
    out = {"n": op.n, "dense_hvps": dense_hvps, "dense_seconds": seconds, "interval_slack": slack,
           "asymmetry": relative(M, M.T), "eigh_of": "reference" if reference is not None else "products",
           "solver": {"hvps": result.hvps, "converged": result.converged, "stop_reason": result.stop_reason,
                      "tol": tol, "seed": result.seed}, "ends": ends}
    if reference is not None:
        out["reference"] = "torch.func.hessian, float64"
        out["product_error"] = relative(M, reference)
        out["product_max_error"] = float(np.abs(M - reference).max() / np.abs(reference).max())
    else:
        out["reference"] = None
    out["misses"] = [{"end": end, "index": i, "eigh": x, "copies": copies(lam, x, slack)}
                     for end, e in ends.items() for i, (x, ok) in enumerate(zip(e["eigh"], e["eigh_in_interval"]))
                     if not ok]
    out["passed"] = not out["misses"]            # every certificate held
    return out
