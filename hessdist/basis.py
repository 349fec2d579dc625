"""An orthonormal Krylov basis held where the products are computed.

The solvers run on the driver and see only small float64 arrays: the projection coefficients
of each new product and, at the end, Ritz vectors. The basis itself (m vectors of length n)
stays with the operator — on the driver's device in-process; on a Ray cluster each worker holds
a contiguous slice of every vector (:mod:`hessdist.workers.slice_basis`) — so a step moves O(m)
numbers instead of O(n), and orthogonalisation runs next to the products.

Memory follows the cap: rows are allocated in chunks as the basis grows, never beyond its
``capacity`` (the solver's ``max_basis``), and a thick restart compresses the basis in place,
one block of columns at a time. A float32 basis halves the memory (its effect on eigenvalues
and residuals is measured in ``benchmarks/results/basis_precision.json``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Protocol

import numpy as np
import torch

from .data import free_memory
from .errors import OutOfMemory

CHUNK_ROWS = 16            # rows allocated at a time
COLUMN_BLOCK = 1 << 16     # columns per block when compressing in place
Reduce = Callable[[torch.Tensor], None]


class BasisLost(Exception):
    """The processes holding (part of) the basis are gone; a solver continues from what it
    checkpointed, on a rebuilt group."""


#: what a default basis may take of a process's host memory (CPU products)
HOST_BASIS_BYTES = 4 << 30


def basis_room(device: torch.device | str, share: float = 0.5) -> int:
    """Bytes a default basis may take on ``device``: ``share`` of what the GPU has free now (the
    rest is the products' activations; a fixed size would not fit a GPU that a training
    shares), or ``HOST_BASIS_BYTES`` on the host."""
    device = torch.device(device)
    return int(free_memory(device) * share) if device.type == "cuda" else HOST_BASIS_BYTES


def basis_out_of_memory(rows: "BasisRows", exc: BaseException) -> OutOfMemory:
    """What a device that cannot hold the basis tells the user: the two knobs that shrink it."""
    held = f"{rows.size} of at most {rows.capacity} vectors of {rows.width} {str(rows.dtype).removeprefix('torch.')}"
    return OutOfMemory(f"out of memory on {rows.device} holding the Krylov basis ({held}; "
                       f"{rows.allocated_bytes / 2**30:.2f} GiB allocated): pass a smaller --max-basis (max_basis=) or "
                       f"--basis-dtype float32 (basis_dtype=torch.float32) ({str(exc).splitlines()[0]})")


class Products(Protocol):
    """What a basis needs of its operator (:class:`hessdist.operator.Operator`, which builds
    its basis and so sits above this module): the size, and products with a block of vectors."""

    n: int

    def matmat(self, V: torch.Tensor) -> torch.Tensor: ...


class KrylovBasis(ABC):
    """Orthonormal vectors q_0 … q_{m-1}, grown by products with the operator ``op``."""

    n: int

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of basis vectors m."""

    @property
    @abstractmethod
    def capacity(self) -> int:
        """The most vectors the basis may hold."""

    @property
    @abstractmethod
    def peak_bytes(self) -> int:
        """The most memory the basis's rows have taken (per process holding a part of it)."""

    #: whether the basis lives in other processes that can be lost (the solver checkpoints)
    volatile: bool = False

    @abstractmethod
    def add_start(self, v: np.ndarray) -> float:
        """Orthogonalise ``v`` against the basis and append it normalised. Returns the fraction of
        ‖v‖ left after orthogonalisation (0 when v lies in the span; then nothing is appended)."""

    @abstractmethod
    def expand(self, j: int, count: int = 1) -> list[np.ndarray]:
        """Products w = A q_i for i = j … j+count−1, in ONE call of the operator (one data pass
        serves the block). Each w is fully re-orthogonalised (classical Gram–Schmidt, twice)
        against the basis in turn and appended as w/β unless β ≈ 0. Returns, per column, the
        coefficients [q_0ᵀAq_i, …, q_{m-1}ᵀAq_i, β] (length m + 1, m the size before that append)."""

    @abstractmethod
    def compress(self, Y: np.ndarray, expanded: int) -> None:
        """Thick restart: replace the first ``expanded`` vectors by Q[:, :expanded] @ Y (Y has
        orthonormal columns) and keep the vectors after them, which have not been expanded."""

    @abstractmethod
    def combine(self, Y: np.ndarray) -> np.ndarray:
        """Q[:, :len(Y)] @ Y for Y of shape (r, k): Ritz vectors as an (n, k) float64 array."""


class BasisRows:
    """The rows q_0 … q_{m-1} restricted to ``width`` columns of the vectors (all of them
    in-process; a worker's slice on a cluster), in chunks of ``CHUNK_ROWS`` rows allocated as
    the basis grows and never beyond ``capacity`` rows. Dot products over the slice are summed
    across the processes holding the other slices by ``reduce`` (an in-place all-reduce; none
    in-process), so every process gets the coefficients of the whole vectors."""

    def __init__(self, width: int, capacity: int, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu", reduce: Reduce | None = None):
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"a basis is float64 or float32, got {dtype}")
        self.width, self.capacity, self.dtype = width, capacity, dtype
        self.device = torch.device(device)
        self._reduce = reduce or (lambda t: None)
        self._chunks: list[torch.Tensor] = []
        self.size = 0
        self.peak_bytes = 0

    # -- storage ------------------------------------------------------------------------------
    def _used(self) -> list[torch.Tensor]:
        """The filled rows, chunk by chunk (views)."""
        out, left = [], self.size
        for chunk in self._chunks:
            if left <= 0:
                break
            out.append(chunk[:left])
            left -= len(chunk)
        return out

    def row(self, i: int) -> torch.Tensor:
        return self._chunks[i // CHUNK_ROWS][i % CHUNK_ROWS]

    def rows(self, j: int, count: int) -> torch.Tensor:
        """Rows j … j+count−1 as a (count, width) float64 tensor (a copy)."""
        return torch.stack([self.row(i) for i in range(j, j + count)]).to(torch.float64)

    def append(self, q: torch.Tensor) -> None:
        if self.size == self.capacity:
            raise RuntimeError(f"the basis is full ({self.capacity} rows); the solver must restart first")
        if self.size == len(self._chunks) * CHUNK_ROWS:
            rows = min(CHUNK_ROWS, self.capacity - self.size)
            self._chunks.append(torch.empty(rows, self.width, dtype=self.dtype, device=self.device))
            self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)
        self.row(self.size).copy_(q)
        self.size += 1

    @property
    def allocated_bytes(self) -> int:
        return sum(c.numel() for c in self._chunks) * self._chunks[0].element_size() if self._chunks else 0

    def truncate(self, size: int) -> None:
        """Keep the first ``size`` rows and free the chunks beyond them."""
        self.size = size
        del self._chunks[-(-size // CHUNK_ROWS):]

    # -- linear algebra over the whole vectors (dot products reduced across slices) -----------
    def dots(self, w: torch.Tensor) -> torch.Tensor:
        """[q_0ᵀw, …, q_{m-1}ᵀw] over the whole vectors, float64."""
        x = w.to(self.dtype)
        local = [(chunk @ x).to(torch.float64) for chunk in self._used()]
        h = torch.cat(local) if local else torch.zeros(0, dtype=torch.float64, device=self.device)
        self._reduce(h)
        return h

    def subtract(self, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """w − Qᵀh, in place (w is the caller's own working vector): one pass over the basis."""
        start = 0
        for chunk in self._used():
            part = h[start:start + len(chunk)]
            if chunk.dtype == w.dtype:
                w.addmv_(chunk.T, part, alpha=-1)
            else:
                w.sub_((chunk.T @ part.to(chunk.dtype)).to(w.dtype))
            start += len(chunk)
        return w

    def norm(self, w: torch.Tensor) -> float:
        sq = torch.dot(w, w).reshape(1).to(torch.float64)
        self._reduce(sq)
        return float(sq.sqrt())

    def orthogonalize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classical Gram–Schmidt, twice: (w ⊥ basis, the coefficients removed)."""
        h = self.dots(w)
        w = self.subtract(w, h)
        h2 = self.dots(w)
        return self.subtract(w, h2), h + h2

    def compress(self, Y: torch.Tensor, expanded: int) -> None:
        """Rows [0, c) ← Yᵀ rows [0, expanded), rows after ``expanded`` moved up behind them; in
        place, one block of columns at a time (a few MB of scratch, whatever the basis size)."""
        c, kept = Y.shape[1], self.size - expanded
        Y = Y.to(self.device, torch.float64)
        for start in range(0, self.width, COLUMN_BLOCK):
            cols = slice(start, min(start + COLUMN_BLOCK, self.width))
            block = torch.stack([self.row(i)[cols] for i in range(expanded)]).to(torch.float64)
            new = (Y.T @ block).to(self.dtype)
            for i in range(c):
                self.row(i)[cols].copy_(new[i])
        for i in range(kept):
            self.row(c + i).copy_(self.row(expanded + i))
        self.truncate(c + kept)

    def combine(self, Y: torch.Tensor) -> torch.Tensor:
        """(width, k) float64: this slice of Q[:, :r] @ Y."""
        Y = Y.to(self.device, torch.float64)
        out = torch.zeros(self.width, Y.shape[1], dtype=torch.float64, device=self.device)
        start = 0
        for chunk in self._used():
            if start >= len(Y):
                break
            rows = chunk[:len(Y) - start]
            out += (rows.T @ Y[start:start + len(rows)].to(self.dtype)).to(torch.float64)
            start += len(rows)
        return out

    def extend(self, W: torch.Tensor, limit: int) -> list[np.ndarray]:
        """Orthogonalise the rows of W (this slice of A q_j, …) in turn and append each as w/β
        unless β ≈ 0 or the basis already spans ``limit`` dimensions. Per row: the coefficients
        [h, β] (see :meth:`KrylovBasis.expand`)."""
        columns = []
        for w in W.to(torch.float64):
            scale = self.norm(w)
            w, h = self.orthogonalize(w)
            beta = self.norm(w)
            if beta > 1e-13 * max(scale, 1e-300) and self.size < limit:
                self.append(w.div_(beta))
            else:
                beta = 0.0
            columns.append(np.append(h.cpu().numpy(), beta))
        return columns

    def add_start(self, v: torch.Tensor, limit: int) -> float:
        norm0 = self.norm(v)
        if norm0 == 0.0 or self.size >= limit:
            return 0.0
        w, _ = self.orthogonalize(v)
        left = self.norm(w) / norm0
        if left > 1e-10:
            self.append(w / (left * norm0))
            return left
        return 0.0


class LocalKrylovBasis(KrylovBasis):
    """The basis on the operator's device, in this process."""

    def __init__(self, op: Products, capacity: int, dtype: torch.dtype = torch.float64):
        self.op, self.n = op, op.n
        self.device = getattr(op, "device", torch.device("cpu"))
        self.rows = BasisRows(self.n, min(capacity, self.n), dtype, self.device)

    @property
    def size(self) -> int:
        return self.rows.size

    @property
    def capacity(self) -> int:
        return self.rows.capacity

    @property
    def peak_bytes(self) -> int:
        return self.rows.peak_bytes

    def _translated(self, work):
        """``work()`` with the device running out of memory told as the basis's (see basis_out_of_memory)."""
        try:
            return work()
        except torch.OutOfMemoryError as exc:
            raise basis_out_of_memory(self.rows, exc) from exc

    def add_start(self, v: np.ndarray) -> float:
        return self._translated(lambda: self.rows.add_start(
            torch.tensor(v, dtype=torch.float64, device=self.device).reshape(self.n), self.n))

    def expand(self, j: int, count: int = 1) -> list[np.ndarray]:
        W = self.op.matmat(self._translated(lambda: self.rows.rows(j, count).T))
        return self._translated(lambda: self.rows.extend(W.T, self.n))

    def compress(self, Y: np.ndarray, expanded: int) -> None:
        self._translated(lambda: self.rows.compress(torch.as_tensor(Y), expanded))

    def combine(self, Y: np.ndarray) -> np.ndarray:
        return self._translated(lambda: self.rows.combine(torch.as_tensor(Y)).cpu().numpy())
