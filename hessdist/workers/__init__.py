"""Distributed products: worker actors, their process group, the sharded Krylov basis and the
distributed operator.

The names below are loaded on first use, so that the process-group pieces that need no Ray
(``collectives``, ``slice_basis``, ``worker``) import where Ray is not installed — the device
suite drives them that way on a GPU machine without Ray."""
import importlib

_WHERE = {"ShardedKrylovBasis": ".sharded_basis", "OperatorSpec": ".group", "WorkerGroup": ".group",
          "connect": ".group", "worker_layout": ".group", "DistributedOperator": ".operator"}

__all__ = ["OperatorSpec", "WorkerGroup", "connect", "worker_layout", "DistributedOperator", "ShardedKrylovBasis"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
