"""Distributed products: worker actors, their process group, the distributed operator."""
from .group import OperatorSpec, WorkerGroup, connect, default_workers
from .operator import DistributedOperator, RemoteKrylovBasis

__all__ = ["OperatorSpec", "WorkerGroup", "connect", "default_workers", "DistributedOperator",
           "RemoteKrylovBasis"]
