"""The distributed operator: the in-process interface over a :class:`WorkerGroup`.

Each product is one call per worker and one flat all-reduce among them; the driver sends the
block once through the object store (every worker reads the same copy) and gets rank 0's
result back. Solvers get a :class:`RemoteKrylovBasis`, whose vectors stay on the workers.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import ray
import torch

from ..errors import HessdistError, InputError
from ..hvp import products_exact
from ..operator import Operator
from ..solvers.krylov import KrylovBasis
from .group import WorkerGroup


class DistributedOperator(Operator):
    """Full-dataset curvature products computed by a worker group."""

    def __init__(self, group: WorkerGroup, fraction: float = 1.0):
        self.group, self.fraction = group, fraction
        self.n = group.n
        self.n_samples = group.n_samples if fraction == 1.0 else group.run("subset_samples", fraction)[0]
        self.data_fraction = self.n_samples / group.n_samples
        spec = group.spec
        self.exact = products_exact(getattr(torch, spec.dtype), spec.tf32, spec.mode)

    def subset(self, fraction: float) -> "DistributedOperator":
        """The same workers, each using the leading ``fraction`` of its shard."""
        if not 0 < fraction <= 1:
            raise InputError(f"fraction must lie in (0, 1], got {fraction}")
        return DistributedOperator(self.group, float(fraction))

    def set_parameters(self, state: Mapping[str, torch.Tensor]) -> None:
        """Send a ``state_dict`` once; every later product uses it."""
        self.group.set_parameters(state)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        ref = ray.put(V.cpu().numpy())
        return torch.tensor(self.group.run("matmat", ref, self.fraction)[0]).to(V.device)

    @property
    def parameters(self) -> torch.Tensor:
        """The workers' current flat parameter vector θ (float64)."""
        return torch.tensor(self.group.run("parameters")[0])

    def loss_and_gradient(self, theta: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        arg = None if theta is None else ray.put(torch.as_tensor(theta, dtype=torch.float64).numpy())
        loss, g = self.group.run("loss_and_gradient", arg)[0]
        return loss, torch.tensor(g)

    def describe(self) -> dict:
        """Rank 0's product settings; the smallest micro-batch and the largest peak memory over
        the workers."""
        ranks = self.group.run("describe")
        out = dict(ranks[0], workers=len(ranks), micro_batch=min(r["micro_batch"] for r in ranks))
        for key in ("peak_device_bytes", "peak_host_rss_bytes"):
            values = [r[key] for r in ranks if r[key] is not None]
            out[key] = max(values) if values else None
        return out

    def check_determinism(self, seed: int = 0) -> None:
        self.group.run("check_determinism", seed)
        self.count(3)

    def krylov_basis(self) -> "RemoteKrylovBasis":
        return RemoteKrylovBasis(self)


class RemoteKrylovBasis(KrylovBasis):
    """A Krylov basis replicated on every worker. Every rank applies the same arithmetic to the
    same all-reduced numbers, so the replicas agree bit for bit (checked each step). When the
    group is rebuilt, the basis is copied from a surviving worker, or — if none survived —
    recomputed by replaying the logged operations."""

    def __init__(self, op: DistributedOperator):
        self.op, self.group, self.n = op, op.group, op.n
        self._size = 0
        self._log: list[tuple[str, Any]] = []
        self.group.run("basis_reset", op.fraction)
        self.group.holders = [self]          # one solve at a time owns the workers' basis

    @property
    def size(self) -> int:
        return self._size

    def _same_on_every_rank(self, results: Sequence[Any], what: str) -> Any:
        first = results[0]
        if any(not np.array_equal(first, r) for r in results[1:]):
            raise HessdistError(f"worker replicas of the Krylov basis diverged at {what}; the ranks "
                                "computed different products — check that every worker runs the same "
                                "model code and torch version")
        return first

    def add_start(self, v: np.ndarray) -> float:
        v = np.asarray(v, dtype=np.float64)
        left = self._same_on_every_rank(self.group.run("basis_add_start", ray.put(v)), "a start vector")
        if left > 0:
            self._size += 1
            self._log.append(("basis_add_start", v))
        return left

    def expand(self, j: int, count: int = 1) -> list[np.ndarray]:
        results = self.group.run("basis_expand", j, count)
        cols = [self._same_on_every_rank([r[i] for r in results], f"step {j + i}") for i in range(count)]
        self.op.count(count)
        self._size += sum(col[-1] > 0 for col in cols)
        self._log.append(("basis_expand", (j, count)))
        return cols

    def compress(self, Y: np.ndarray, expanded: int) -> None:
        Y = np.asarray(Y, dtype=np.float64)
        self.group.run("basis_compress", ray.put(Y), expanded)
        self._size = Y.shape[1] + self._size - expanded
        self._log.append(("basis_compress", (Y, expanded)))

    def combine(self, Y: np.ndarray) -> np.ndarray:
        return self.group.run("basis_combine", np.asarray(Y, dtype=np.float64))[0]

    # -- StateHolder: carry the basis across a rebuild ----------------------------------------
    def salvage(self, old: Sequence[Any]) -> np.ndarray | None:
        for actor in old:
            try:
                return ray.get(actor.basis_export.remote(self._size), timeout=self.group.collective_timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError):
                continue
        return None

    def restore(self, group: WorkerGroup, rows: np.ndarray | None) -> None:
        if rows is not None:
            group._call("basis_load", ray.put(rows), self.op.fraction)
            return
        group._call("basis_reset", self.op.fraction)
        for method, arg in self._log:          # no survivor: recompute the basis (costs products)
            if method == "basis_add_start":
                group._call(method, ray.put(arg))
            elif method == "basis_expand":
                group._call(method, *arg)
                self.op.count(arg[1])
            else:
                group._call(method, ray.put(arg[0]), arg[1])
