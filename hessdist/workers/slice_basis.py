"""A Krylov basis sharded by parameter slice across the worker group.

Rank r of W holds columns [r·s, (r+1)·s) (s = ⌈n/W⌉) of every basis vector. A step:

1. all-gather the slices of the vectors to expand (every rank needs whole vectors: its model
   replica is perturbed along all parameters), in the precision the product reads them in —
   float32 products get float32 vectors, so the all-gather moves half the bytes of a float64
   basis and the product sees the very same values;
2. each rank's partial product over its data shard; reduce-scatter the partial sums, so each
   rank receives its slice of the full-data product (the same traffic as one all-reduce);
3. Gram–Schmidt on the slices, the m+1 dot products all-reduced; append.

Basis memory and vector work per worker are 1/W of a replica's, so the default capacity grows
with the cluster. The driver gets the m+1 coefficients, identical on every rank by construction
(they come out of all-reduces); it checks that they are — a rank out of step with the others is
refused with a message — and that is the consistency check that replaces the old bit-for-bit
replica comparison. A lost worker takes its slices with it: calls about a basis the (rebuilt)
workers do not hold raise :class:`hessdist.basis.BasisLost`, and the solver continues from its
checkpointed Ritz vectors. The driver's side, :class:`~hessdist.workers.sharded_basis.ShardedKrylovBasis`,
sends each call to every rank.
"""
from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from ..basis import BasisRows, basis_out_of_memory
from ..errors import HessdistError
from .collectives import agree_across_ranks

if TYPE_CHECKING:
    from ..curvature import CurvatureOperator

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class MissingBasis(HessdistError):
    """Raised on a worker asked about a basis it does not hold (it was rebuilt since)."""


class SliceBasis:
    """One worker's slice of a sharded basis (see the module docstring).

    Every collective here is preceded by the ranks' agreement, and every call ends with one: a
    rank that runs out of memory between two collectives (a new chunk of rows, scratch for a
    restart) joins the agreement its peers are waiting in, so all ranks raise at once — an
    :class:`~hessdist.errors.OutOfMemory` naming the fix there, PeerFailed on the others —
    instead of the others waiting in the next collective until the watchdog fires."""

    def __init__(self, op: "CurvatureOperator", capacity: int, dtype: torch.dtype):
        self.op, self.n = op, op.n
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.step = -(-self.n // self.world)
        self.lo, self.hi = min(self.n, self.rank * self.step), min(self.n, (self.rank + 1) * self.step)
        self.agree = agree_across_ranks(op.device)
        self.rows = BasisRows(self.hi - self.lo, min(capacity, self.n), dtype, op.device, reduce=self._all_reduce)
        #: the narrower of the basis's and the product's precision: what the product casts to anyway
        self.gather_dtype = min(dtype, op.dtype, key=lambda d: torch.finfo(d).bits)
        #: seconds in expand: in all, in the partial products and in the collectives (the traffic of
        #: one all-reduce, which a replicated product pays too); the rest is the basis's own work.
        #: Also the bytes this rank received in the all-gathers and columns expanded.
        self.seconds = {"expand": 0.0, "product": 0.0, "collectives": 0.0, "columns": 0, "gathered_bytes": 0}

    def _guarded(self, work):
        """``work()`` with an out-of-memory anywhere on this rank agreed on (see the class)."""
        try:
            out = work()
        except torch.OutOfMemoryError as exc:
            self.agree(basis_out_of_memory(self.rows, exc))         # raises, here and on the peers
        self.agree(None)
        return out

    def _collective(self, fn, *tensors: torch.Tensor) -> None:
        self.agree(None)
        with self._timed("collectives"):
            fn(*tensors)

    def _all_reduce(self, t: torch.Tensor) -> None:
        if t.numel():                       # an empty basis has no dot products (the same on every rank)
            self._collective(lambda x: dist.all_reduce(x, op=dist.ReduceOp.SUM), t)

    def add_start(self, v: np.ndarray) -> float:
        return self._guarded(lambda: self.rows.add_start(
            torch.tensor(v[self.lo:self.hi], dtype=torch.float64, device=self.op.device), self.n))

    @contextlib.contextmanager
    def _timed(self, key: str):
        sync = torch.cuda.synchronize if self.op.device.type == "cuda" else (lambda device: None)
        sync(self.op.device)                # CUDA runs asynchronously: time the work, not its launch
        t = time.perf_counter()
        yield
        sync(self.op.device)
        self.seconds[key] += time.perf_counter() - t

    def _whole_vectors(self, mine: torch.Tensor) -> torch.Tensor:
        """(count, this slice) → (count, n): every rank's slice, all-gathered."""
        count = mine.shape[0]
        padded = torch.zeros(count, self.step, dtype=mine.dtype, device=mine.device)   # the last slice may be short
        padded[:, :mine.shape[1]] = mine
        gathered = torch.empty(self.world * padded.numel(), dtype=mine.dtype, device=mine.device)
        self._collective(_all_gather, gathered, padded.reshape(-1))            # flat: what gloo accepts
        self.seconds["gathered_bytes"] += gathered.numel() * gathered.element_size()
        return gathered.reshape(self.world, count, self.step).permute(1, 0, 2).reshape(count, -1)[:, :self.n]

    def _my_slice(self, partial: torch.Tensor) -> torch.Tensor:
        """(count, n) partial sums → (count, this slice) of their sum over the ranks (reduce-scatter)."""
        count = partial.shape[0]
        send = torch.zeros(self.world, count, self.step, dtype=torch.float64, device=partial.device)
        for r in range(self.world):                                             # rank r's slice, padded
            piece = partial[:, r * self.step:(r + 1) * self.step]
            send[r, :, :piece.shape[1]] = piece
        received = torch.empty(count * self.step, dtype=torch.float64, device=partial.device)
        self._collective(_reduce_scatter, received, send.reshape(-1))
        return received.reshape(count, self.step)[:, :self.hi - self.lo]

    def expand(self, j: int, count: int) -> list[np.ndarray]:
        with self._timed("expand"):
            columns = self._guarded(lambda: self._expand(j, count))
        self.seconds["columns"] += count
        return columns

    def _expand(self, j: int, count: int) -> list[np.ndarray]:
        rows = self.rows.rows(j, count)
        V = rows if self.world == 1 else self._whole_vectors(rows.to(self.gather_dtype))  # 1 worker: none
        with self._timed("product"):
            partial = self.op.local_sum(V.T).div_(self.op.n_samples)             # (count, n)
        return self.rows.extend(partial if self.world == 1 else self._my_slice(partial), self.n)

    def compress(self, Y: np.ndarray, expanded: int) -> None:
        self._guarded(lambda: self.rows.compress(torch.tensor(Y), expanded))

    def combine(self, Y: np.ndarray) -> np.ndarray:
        return self._guarded(lambda: self.rows.combine(torch.tensor(Y)).cpu().numpy())
