"""hessdist: extreme eigenpairs (and more) of a neural network's full-dataset loss Hessian,
in-process or on a Ray cluster of GPU workers.

    op = hessdist.CurvatureOperator(model, "cross_entropy", (x, y))
    res = hessdist.lanczos(op, which="LA,SA", k=1)
    res.largest.values, res.smallest.values
"""
from .errors import (HessdistError, InputError, NonDeterministicError, NonFiniteError, QueueFull, Superseded,
                     WorkerError)
from .curvature import CurvatureOperator
from .objective import BatchLoss
from .operator import Operator
from .params import ParameterLayout
from .solvers.lanczos import lanczos
from .solvers.results import EigenPairs, EigenResult

__version__ = "0.1.0"


def connect(name: str, address: str | None = "auto"):
    """A handle on the running eigen-service ``name`` (see :mod:`hessdist.service`)."""
    from .service import connect as _connect
    return _connect(name, address)

__all__ = ["connect", "BatchLoss", "CurvatureOperator", "Operator", "ParameterLayout", "lanczos", "EigenPairs", "EigenResult",
           "HessdistError", "InputError", "NonDeterministicError", "NonFiniteError", "QueueFull", "Superseded",
           "WorkerError"]
