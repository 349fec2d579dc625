"""Distributed products: worker actors, their process group, the sharded Krylov basis and the
distributed operator."""
from .sharded_basis import ShardedKrylovBasis
from .group import OperatorSpec, WorkerGroup, connect, worker_layout
from .operator import DistributedOperator

__all__ = ["OperatorSpec", "WorkerGroup", "connect", "worker_layout", "DistributedOperator", "ShardedKrylovBasis"]
