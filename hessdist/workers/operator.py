"""The distributed operator: the in-process interface over a :class:`WorkerGroup`.

Each product is one call per worker and one flat all-reduce among them; the driver sends the
block once through the object store (every worker reads the same copy) and gets rank 0's
result back. Solvers get a :class:`ShardedKrylovBasis`, whose vectors stay on the workers, a
slice on each.
"""
from __future__ import annotations

from typing import Mapping

import ray
import torch

from ..errors import InputError
from ..batch_products import check_curvature
from ..curvature import products_exact
from ..operator import Operator
from .sharded_basis import ShardedKrylovBasis
from .group import WorkerGroup


class DistributedOperator(Operator):
    """Full-dataset curvature products computed by a worker group."""

    def __init__(self, group: WorkerGroup, fraction: float = 1.0, curvature: str | None = None):
        self.group, self.fraction = group, fraction
        #: the spec's curvature, or another the workers compute from the same model and data
        self.curvature = curvature or group.spec.curvature
        self.n = group.n
        self.n_samples = group.n_samples if fraction == 1.0 else group.run("subset_samples", fraction,
                                                                           self.curvature)[0]
        self.data_fraction = self.n_samples / group.n_samples
        self.basis_shards = group.size
        spec = group.spec
        self.exact = products_exact(getattr(torch, spec.dtype), spec.tf32, spec.mode)

    def subset(self, fraction: float) -> "DistributedOperator":
        """The same workers, each using ``fraction`` of its shard, spread evenly over it."""
        if not 0 < fraction <= 1:
            raise InputError(f"fraction must lie in (0, 1], got {fraction}")
        return DistributedOperator(self.group, float(fraction), self.curvature)

    def with_curvature(self, curvature: str) -> "DistributedOperator":
        """The same workers computing another ``curvature`` (see :meth:`CurvatureOperator.with_curvature`)."""
        check_curvature(curvature, self.group.spec.mode)      # the loss's contract: checked on the workers
        op = DistributedOperator(self.group, self.fraction, curvature)
        op.group.run("subset_samples", self.fraction, curvature)     # built (and checked) on every worker now
        return op

    def set_parameters(self, state: Mapping[str, torch.Tensor]) -> None:
        """Send a ``state_dict`` once; every later product uses it."""
        self.group.set_parameters(state)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        ref = ray.put(V.cpu().numpy())
        return torch.tensor(self.group.run("matmat", ref, self.fraction, self.curvature)[0]).to(V.device)

    @property
    def parameters(self) -> torch.Tensor:
        """The workers' current flat parameter vector θ (float64)."""
        return torch.tensor(self.group.run("parameters")[0])

    def loss(self, theta: torch.Tensor | None = None) -> float:
        return self.group.run("loss", self._theta(theta))[0]

    def loss_and_gradient(self, theta: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        loss, g = self.group.run("loss_and_gradient", self._theta(theta))[0]
        return loss, torch.tensor(g)

    @staticmethod
    def _theta(theta: torch.Tensor | None):
        """θ for the workers: once through the object store (None: their current parameters)."""
        return None if theta is None else ray.put(torch.as_tensor(theta, dtype=torch.float64).numpy())

    def describe(self) -> dict:
        """Rank 0's product settings; the smallest micro-batch and the largest peak memory over
        the workers."""
        ranks = self.group.run("describe")
        out = dict(ranks[0], workers=len(ranks), micro_batch=min(r["micro_batch"] for r in ranks))
        for key in ("peak_device_bytes", "peak_host_rss_bytes"):
            values = [r[key] for r in ranks if r[key] is not None]
            out[key] = max(values) if values else None
        return out

    def basis_bytes(self) -> int:
        """The least room any worker has: every worker holds an equal slice."""
        return min(self.group.run("basis_bytes"))

    def check_determinism(self, seed: int = 0) -> None:
        self.group.run("check_determinism", seed)
        self.count(3)

    def krylov_basis(self, capacity: int, dtype: torch.dtype = torch.float64) -> ShardedKrylovBasis:
        """A basis sharded by parameter slice across the workers (1/W of it on each)."""
        return ShardedKrylovBasis(self, capacity, dtype)
