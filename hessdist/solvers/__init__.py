"""Solvers run on the driver over any :class:`hessdist.Operator`."""
from .lanczos import lanczos
from .results import EigenPairs, EigenResult

__all__ = ["lanczos", "EigenPairs", "EigenResult"]
