"""The driver's handle on a Krylov basis sharded across a worker group: each call goes to every
rank's :class:`~hessdist.workers.slice_basis.SliceBasis` (see that module for the algorithm), and
the coefficients that come back must be the same on every rank."""
from __future__ import annotations

import uuid
from typing import Any, Protocol

import numpy as np
import ray
import torch

from ..basis import BasisLost, KrylovBasis
from ..errors import HessdistError
from .group import WorkerGroup
from .slice_basis import MissingBasis


class GroupProducts(Protocol):
    """What the handle needs of its operator (:class:`~hessdist.workers.operator.DistributedOperator`,
    which builds it): the group, the size, the data fraction and curvature, and the count of products."""

    group: WorkerGroup
    n: int
    fraction: float
    curvature: str

    def count(self, columns: int) -> None: ...


class ShardedKrylovBasis(KrylovBasis):
    """The driver's handle on a basis sharded across a worker group."""

    volatile = True

    def __init__(self, op: GroupProducts, capacity: int, dtype: torch.dtype):
        self.op, self.group, self.n = op, op.group, op.n
        self.id, self._capacity, self._size = uuid.uuid4().hex, min(capacity, op.n), 0
        self.dtype_name = str(dtype).removeprefix("torch.")
        self._peak = 0
        self._call("basis_reset", capacity, self.dtype_name, op.fraction, op.curvature)

    def _call(self, method: str, *args: Any) -> list[Any]:
        """``method`` on every rank (with this basis's id); a rank that no longer holds the
        basis — the group was rebuilt — means it is lost."""
        try:
            return self.group.run(method, self.id, *args)
        except MissingBasis as exc:
            raise BasisLost(f"the workers holding basis slices were replaced ({exc})") from None

    @property
    def size(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def peak_bytes(self) -> int:
        try:
            self._peak = max([self._peak, *self.group.run("basis_peak", self.id)])
        except HessdistError:                   # MissingBasis included: the peak seen so far stands
            pass
        return self._peak

    def _same_on_every_rank(self, results: list[Any], what: str) -> Any:
        first = results[0]
        if any(not np.array_equal(first, r) for r in results[1:]):
            raise HessdistError(f"the ranks disagree on {what}: their collectives are out of step; restart the "
                                "worker group (every rank must receive every call, in the same order)")
        return first

    def add_start(self, v: np.ndarray) -> float:
        left = self._same_on_every_rank(self._call("basis_add_start", ray.put(np.asarray(v, dtype=np.float64))),
                                        "a start vector")
        self._size += int(left > 0)
        return left

    def expand(self, j: int, count: int = 1) -> list[np.ndarray]:
        results = self._call("basis_expand", j, count)
        cols = [self._same_on_every_rank([r[i] for r in results], f"step {j + i}") for i in range(count)]
        self.op.count(count)
        self._size += sum(int(col[-1] > 0) for col in cols)      # ints: counts end up in JSON
        return cols

    def compress(self, Y: np.ndarray, expanded: int) -> None:
        Y = np.asarray(Y, dtype=np.float64)
        self._call("basis_compress", ray.put(Y), expanded)
        self._size = Y.shape[1] + self._size - expanded

    def combine(self, Y: np.ndarray) -> np.ndarray:
        return np.concatenate(self._call("basis_combine", np.asarray(Y, dtype=np.float64)), axis=0)
