"""An orthonormal Krylov basis held where the products are computed.

The solvers run on the driver and see only small float64 arrays: the projection coefficients
of each new product and, at the end, Ritz vectors. The basis itself (m vectors of length n)
stays with the operator — on the driver's device in-process, replicated on every worker in a
Ray cluster — so a step moves O(m) numbers instead of O(n), and orthogonalisation runs next to
the products.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ..operator import Operator


class KrylovBasis(ABC):
    """Orthonormal vectors q_0 … q_{m-1}, grown by products with the operator."""

    n: int

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of basis vectors m."""

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


class LocalKrylovBasis(KrylovBasis):
    """The basis as a float64 tensor on the operator's device, grown in place."""

    def __init__(self, op: "Operator", capacity: int = 32):
        self.op, self.n = op, op.n
        self.device = getattr(op, "device", torch.device("cpu"))
        self._Q = torch.empty(min(capacity, self.n), self.n, dtype=torch.float64, device=self.device)
        self._m = 0

    @property
    def size(self) -> int:
        return self._m

    @property
    def vectors(self) -> torch.Tensor:
        """The basis as rows, (m, n) — a view, do not modify."""
        return self._Q[: self._m]

    def _orthogonalize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        Q = self.vectors
        h = Q @ w
        w = w - Q.T @ h
        h2 = Q @ w
        return w - Q.T @ h2, h + h2

    def _append(self, q: torch.Tensor) -> None:
        if self._m == self._Q.shape[0]:
            grown = torch.empty(min(max(2 * self._m, 1), self.n), self.n, dtype=torch.float64, device=self.device)
            grown[: self._m] = self._Q
            self._Q = grown
        self._Q[self._m] = q
        self._m += 1

    def add_start(self, v: np.ndarray) -> float:
        v = torch.tensor(v, dtype=torch.float64, device=self.device).reshape(self.n)
        norm0 = float(v.norm())
        if norm0 == 0.0 or self._m == self.n:
            return 0.0
        w, _ = self._orthogonalize(v)
        left = float(w.norm()) / norm0
        if left > 1e-10:
            self._append(w / w.norm())
            return left
        return 0.0

    def expand(self, j: int, count: int = 1) -> list[np.ndarray]:
        W = self.op.matmat(self._Q[j:j + count].T).to(torch.float64)
        columns = []
        for w in W.T:
            scale = float(w.norm())
            w, h = self._orthogonalize(w)
            beta = float(w.norm())
            if beta > 1e-13 * max(scale, 1e-300) and self._m < self.n:
                self._append(w / beta)
            else:
                beta = 0.0
            columns.append(np.append(h.cpu().numpy(), beta))
        return columns

    def compress(self, Y: np.ndarray, expanded: int) -> None:
        Y = torch.tensor(Y, dtype=torch.float64, device=self.device)
        kept = Y.T @ self._Q[:expanded]
        self._Q = torch.cat([kept, self._Q[expanded:self._m]])
        self._m = self._Q.shape[0]

    def combine(self, Y: np.ndarray) -> np.ndarray:
        Y = torch.tensor(Y, dtype=torch.float64, device=self.device)
        return (self._Q[: Y.shape[0]].T @ Y).cpu().numpy()

    # state transfer, used to rebuild a worker group without losing the basis
    def export(self, size: int) -> np.ndarray:
        return self._Q[:size].cpu().numpy()

    def load(self, rows: np.ndarray) -> None:
        self._Q = torch.tensor(rows, dtype=torch.float64, device=self.device)
        self._m = self._Q.shape[0]
        if self._m == 0:
            self._Q = torch.empty(1, self.n, dtype=torch.float64, device=self.device)
