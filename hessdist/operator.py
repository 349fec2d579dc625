"""The symmetric linear-operator interface every curvature operator offers, in-process or
distributed: ``A @ v``, ``A.matmat(V)``, ``A.to_scipy()``, and a Krylov basis for the solvers."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Union

import numpy as np
import torch

from .basis import HOST_BASIS_BYTES, KrylovBasis, LocalKrylovBasis
from .errors import InputError

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator

Array = Union[np.ndarray, torch.Tensor]


class Operator(ABC):
    """A symmetric n×n operator. Subclasses implement ``_matmat`` on float64 (n, k) tensors.

    Vectors are float64 at the interface whatever precision the products run in, so the
    solvers' recurrences and projected problems are float64 throughout."""

    n: int
    #: products computed so far, one per column of a block
    hvps: int = 0
    #: full-data product equivalents so far: each product weighted by ``data_fraction``
    fpe: float = 0.0
    #: the fraction of the full data set each product touches (a subset operator: < 1)
    data_fraction: float = 1.0
    #: products exact to float64 rounding, so residuals read off a Krylov projection are true;
    #: False for float32/TF32/bfloat16 or finite-difference products (solvers then confirm
    #: their answers with real products)
    exact: bool = True
    #: the inexact-Krylov residual gap the last confirmation measured, per basis precision:
    #: {dtype: (gap / max|θ|, max|θ|)} (:mod:`hessdist.solvers.rounding`; None before any)
    rounding_gaps: dict[str, tuple[float, float]] | None = None
    #: samples the products average over (operators without data: 0)
    n_samples: int = 0
    #: processes that each hold a slice of a Krylov basis over this operator
    basis_shards: int = 1

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    @abstractmethod
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Product with the columns of a float64 tensor V of shape (n, k), on V's device."""

    def matmat(self, V: Array) -> Array:
        """A @ V for V of shape (n, k); returns the same array type (and device) as V, in float64."""
        as_numpy = isinstance(V, np.ndarray)
        T = torch.from_numpy(np.array(V, dtype=np.float64)) if as_numpy else V
        if T.ndim != 2 or T.shape[0] != self.n:
            raise InputError(f"expected a block of shape ({self.n}, k), got {tuple(T.shape)}; vectors must "
                             f"have one entry per selected parameter (n = {self.n})")
        out = self._matmat(T.to(torch.float64))
        self.count(T.shape[1])
        return out.cpu().numpy() if as_numpy else out.to(T.device)

    def basis_bytes(self) -> int:
        """Bytes a default Krylov basis may take in each process holding a part of it."""
        return HOST_BASIS_BYTES

    def count(self, columns: int) -> None:
        """Book ``columns`` products (in ``hvps``, and weighted by the data fraction in ``fpe``)."""
        self.hvps += columns
        self.fpe += columns * self.data_fraction

    def matvec(self, v: Array) -> Array:
        """A @ v for a vector of length n."""
        if v.ndim != 1 or v.shape[0] != self.n:
            raise InputError(f"expected a vector of length n = {self.n}, got shape {tuple(v.shape)}")
        return self.matmat(v[:, None])[:, 0]

    def __matmul__(self, V: Array) -> Array:
        return self.matvec(V) if V.ndim == 1 else self.matmat(V)

    def to_scipy(self) -> "LinearOperator":
        """A ``scipy.sparse.linalg.LinearOperator`` (float64, symmetric) over the same products."""
        from scipy.sparse.linalg import LinearOperator

        def mv(v):
            return self.matvec(np.asarray(v, dtype=np.float64).reshape(-1))

        def mm(V):
            return self.matmat(np.asarray(V, dtype=np.float64))

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, dtype=np.float64)

    def describe(self) -> dict:
        """How the products are computed (mode, micro-batch, peak memory); empty when unknown."""
        return {}

    def subset(self, fraction: float) -> "Operator":
        """The same curvature over a fixed leading ``fraction`` of the data (for a cheap search
        that is then certified on the full data). Operators that own no data cannot."""
        raise InputError(f"{type(self).__name__} has no data to take a subset of")

    def with_curvature(self, curvature: str) -> "Operator":
        """Another curvature (``ggn``, ``empirical-fisher``, ``residual``, ``hessian``) of the same
        model and data. Operators that own no model cannot."""
        raise InputError(f"{type(self).__name__} has no model to take another curvature of")

    def krylov_basis(self, capacity: int, dtype: torch.dtype = torch.float64) -> KrylovBasis:
        """A fresh Krylov basis of at most ``capacity`` vectors over this operator, held where the
        products are computed."""
        return LocalKrylovBasis(self, capacity, dtype)
