"""Data: a fixed, ordered list of batches with exact sample counts, and sharding for workers.

A curvature product must be a fixed linear map, so the data are materialised once (in order,
no shuffling, no re-drawn augmentation) and kept on the compute device.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import InputError

DataLike = Union[Dataset, DataLoader, tuple, list]


def spread_indices(n: int, fraction: float) -> torch.Tensor:
    """The ⌈fraction · n⌉ of n samples a subset keeps: ⌊j·n/m⌋ for j < m, evenly spread."""
    m = min(n, math.ceil(fraction * n))
    return torch.arange(m) * n // m


@dataclass(frozen=True)
class Batches:
    """Ordered (inputs, targets) batches on one device; ``n_samples`` counts every sample once."""

    batches: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def n_samples(self) -> int:
        return sum(len(y) for _, y in self.batches)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def spread(self, fraction: float) -> "Batches":
        """⌈fraction · n⌉ samples spread evenly over the data (sample ⌊j·n/m⌋ for j < m), in
        batches as large as these: a fixed subset that sorted data cannot bias towards its start."""
        n = self.n_samples
        picked = spread_indices(n, fraction)
        xs, ys, start = [], [], 0
        for x, y in self.batches:
            local = picked[(picked >= start) & (picked < start + len(y))] - start
            if len(local):
                xs.append(x[local.to(x.device)])
                ys.append(y[local.to(y.device)])
            start += len(y)
        size = max(len(y) for _, y in self.batches)
        x, y = torch.cat(xs), torch.cat(ys)
        return Batches(tuple(zip(x.split(size), y.split(size))))


def _is_tensor_pair(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data)


def _cast(x: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)


def make_batches(data: DataLike, batch_size: int = 256, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Batches:
    """Materialise ``data`` (a Dataset of (input, target) pairs, a DataLoader, or an
    ``(inputs, targets)`` pair of tensors) as fixed batches of at most ``batch_size`` samples."""
    if batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size}")
    device = torch.device(device)
    if _is_tensor_pair(data):
        inputs, targets = data
        if len(inputs) != len(targets):
            raise InputError(f"inputs and targets differ in length ({len(inputs)} vs {len(targets)}); "
                             "pass one target per input")
        pairs = zip(inputs.split(batch_size), targets.split(batch_size))
    elif isinstance(data, DataLoader):
        pairs = iter(data)
    elif isinstance(data, Dataset):
        pairs = iter(DataLoader(data, batch_size=batch_size, shuffle=False))
    else:
        raise InputError(f"data must be a Dataset, a DataLoader or an (inputs, targets) pair of tensors, "
                         f"got {type(data).__name__}")
    out = []
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise InputError("each sample/batch must be an (input, target) pair; wrap your dataset so "
                             "__getitem__ returns (x, y)")
        x, y = pair
        if len(x) != len(y):
            raise InputError(f"a batch has {len(x)} inputs but {len(y)} targets")
        if len(y):
            out.append((_cast(x, dtype, device), _cast(y, dtype, device)))
    if not out:
        raise InputError("the data are empty: the dataset (or this worker's shard) has no samples; "
                         "check the data factory, or use fewer workers than samples")
    return Batches(tuple(out))


def strided_shard(data: DataLike, rank: int, world_size: int) -> DataLike:
    """Samples rank, rank+world_size, …: the deterministic split used when the data factory
    cannot build its own shard. Shards differ in size by at most one sample."""
    if _is_tensor_pair(data):
        return data[0][rank::world_size], data[1][rank::world_size]
    if isinstance(data, DataLoader):
        data = data.dataset
    return Subset(data, range(rank, len(data), world_size))


def load_shard(factory: Callable[..., Any], rank: int, world_size: int) -> DataLike:
    """Call the user's data factory for one shard: with ``rank``/``world_size`` keywords when it
    accepts them (it builds its own shard), else build everything and take a strided shard."""
    params = inspect.signature(factory).parameters
    takes = {"rank", "world_size"} <= set(params) or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if takes:
        return factory(rank=rank, world_size=world_size)
    data = factory()
    return data if world_size == 1 else strided_shard(data, rank, world_size)

