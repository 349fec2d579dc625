"""What the worker tests share: a small real problem (the BatchNorm CNN on 121 digits, strided
into shards), its operator spec and its in-process operator. Worker processes import these
functions by reference (the tests' Ray clusters ship this folder)."""
import contextlib

import torch

from hessdist.curvature import CurvatureOperator
from hessdist.workers import OperatorSpec

from . import helpers

N = 121          # strided shards: 121 = 61+60 = 41+40+40 samples


def data_factory():
    return helpers.digits_subset(N)


def lopsided_data(rank: int, world_size: int):
    """Very unequal shards: rank 0 gets 100 samples (4 batches of 32), the rest share 21."""
    x, y = helpers.digits_subset(N)
    if rank == 0:
        return x[:100], y[:100]
    return x[100 + rank - 1::world_size - 1], y[100 + rank - 1::world_size - 1]


def spec(curvature="hessian", data=data_factory, model=helpers.cnn_bn, dtype="float64", **kw):
    return OperatorSpec(model=model, data=data, curvature=curvature, batch_size=32, dtype=dtype, **kw)


def in_process(curvature="hessian"):
    return CurvatureOperator(helpers.cnn_bn(), "cross_entropy", data_factory(), curvature=curvature,
                             batch_size=32, dtype=torch.float64)


@contextlib.contextmanager
def respecced(group, other: OperatorSpec):
    """``group``'s workers rebuilt for ``other`` (no new processes), then back to :func:`spec`."""
    group.respec(other)
    try:
        yield group
    finally:
        group.respec(spec())
