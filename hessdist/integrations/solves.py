"""A solve a training callback requested — its step, epoch and outcome — and the flat
``hessian/...`` metrics a framework's loggers get from it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

#: the callbacks' defaults: both ends, λ_max to 1% and λ_min (often small, near 0) to 5%, relative
DEFAULT_WHICH = "LA,SA"
DEFAULT_RTOL: Mapping[str, float] = {"LA": 1e-2, "SA": 5e-2}
#: metric names of the result dict's ends
END_METRICS = {"largest": "lambda_max", "smallest": "lambda_min", "largest_magnitude": "lambda_maxabs"}


class HessianSolveWarning(UserWarning):
    """A Hessian solve started by a callback failed (or was still running when training ended);
    training goes on, the message names the step and the cause."""


@dataclass
class Solve:
    """One requested solve: the training ``step`` and ``epoch`` whose parameters it used, and
    either its ``entry`` (the eigen-service's history entry, or the same dict from an in-process
    solve: ``largest``, ``smallest``, ``intervals``, ``hvps``, ``fpe``, ``converged``, ``seed``,
    ``warm_start``, ...) or the ``error`` it raised."""

    step: int
    epoch: float | None
    entry: dict | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def solve_metrics(solve: Solve, prefix: str = "hessian") -> dict[str, float]:
    """A finished solve as flat scalar metrics: ``{prefix}/lambda_max`` with ``_lo``/``_hi`` (its
    certified interval; an unbounded side is left out) and ``_residual``, the same for
    ``lambda_min`` (and ``lambda_maxabs`` for which="LM"; the i-th value for k > 1 is
    ``lambda_max_{i}``), then ``hvps``, ``fpe``, ``converged`` (1/0), ``warm_start`` (1/0),
    ``seconds``, and the ``step`` and ``epoch`` the parameters came from — a result arrives later
    than the step it belongs to, and a logger may stamp it with the current one."""
    entry = solve.entry or {}
    out: dict[str, float] = {}
    for end, name in END_METRICS.items():
        values = entry.get(end)
        if values is None:
            continue
        intervals = (entry.get("intervals") or {}).get(end) or []
        residuals = (entry.get("residual_norms") or {}).get(end) or []
        for i, value in enumerate(values):
            key = f"{prefix}/{name}" + (f"_{i + 1}" if i else "")
            out[key] = float(value)
            if i < len(intervals):
                lo, hi = intervals[i]
                if lo is not None and math.isfinite(lo):
                    out[f"{key}_lo"] = float(lo)
                if hi is not None and math.isfinite(hi):
                    out[f"{key}_hi"] = float(hi)
            if i < len(residuals):
                out[f"{key}_residual"] = float(residuals[i])
    for key in ("hvps", "fpe", "seconds"):
        if entry.get(key) is not None:
            out[f"{prefix}/{key}"] = float(entry[key])
    for key in ("converged", "warm_start"):
        if key in entry:
            out[f"{prefix}/{key}"] = float(bool(entry[key]))
    out[f"{prefix}/step"] = float(solve.step)
    if solve.epoch is not None:
        out[f"{prefix}/epoch"] = float(solve.epoch)
    return out
