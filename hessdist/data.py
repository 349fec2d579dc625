"""Data: a fixed, ordered sequence of batches with exact sample counts, and sharding for workers.

A curvature product must be a fixed linear map, so every pass reads the same samples in the
same order (no shuffling, no re-drawn augmentation): kept on the compute device when they fit
(:class:`Batches`), else read again from host memory or disk on every pass
(:class:`StreamedBatches`).
"""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import InputError

DataLike = Union[Dataset, DataLoader, tuple, list, Any]     # Any: a ray.data dataset


def spread_indices(n: int, fraction: float) -> torch.Tensor:
    """The ⌈fraction · n⌉ of n samples a subset keeps: ⌊j·n/m⌋ for j < m, evenly spread."""
    m = min(n, math.ceil(fraction * n))
    return torch.arange(m) * n // m


def _within(picked: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """The sample indices in ``picked`` that fall in the batch [start, start + size), batch-local."""
    return picked[(picked >= start) & (picked < start + size)] - start


PLACEMENTS = ("auto", "device", "stream")
#: ``auto`` keeps the data resident when they take at most this share of the free memory
RESIDENT_SHARE = 0.5


def _is_tensor_pair(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data)


def is_ray_dataset(data: Any) -> bool:
    return type(data).__module__.startswith("ray.data")


def _pair(batch: Any, columns: tuple[str, str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) from a DataLoader batch or a ray.data batch (a dict of columns)."""
    if isinstance(batch, dict):
        names = columns or tuple(batch)
        if len(names) != 2:
            raise InputError(f"a ray.data dataset needs two columns (inputs, targets) or data_columns=(x, y); "
                             f"it has {list(batch)}")
        return torch.as_tensor(batch[names[0]]), torch.as_tensor(batch[names[1]])
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise InputError("each sample/batch must be an (input, target) pair; wrap your dataset so "
                         "__getitem__ returns (x, y)")
    x, y = batch
    if len(x) != len(y):
        raise InputError(f"a batch has {len(x)} inputs but {len(y)} targets")
    return torch.as_tensor(x), torch.as_tensor(y)


def _cast(x: torch.Tensor, dtype: torch.dtype, device: torch.device, channels_last: bool = False,
          non_blocking: bool = False) -> torch.Tensor:
    x = torch.as_tensor(x)
    x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype, non_blocking=non_blocking)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


class HostData:
    """The samples as the user gave them (tensors, a Dataset, a DataLoader or a ray.data dataset),
    read in one fixed order as host batches of at most ``batch_size`` samples; ``keep`` restricts
    them to the given sample indices (a subset)."""

    def __init__(self, data: DataLike, batch_size: int = 256, *, loader_workers: int = 0, pin: bool = False,
                 columns: tuple[str, str] | None = None, keep: torch.Tensor | None = None):
        if batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size}")
        if _is_tensor_pair(data) and len(data[0]) != len(data[1]):
            raise InputError(f"inputs and targets differ in length ({len(data[0])} vs {len(data[1])}); "
                             "pass one target per input")
        if not (_is_tensor_pair(data) or isinstance(data, (Dataset, DataLoader)) or is_ray_dataset(data)):
            raise InputError(f"data must be a Dataset, a DataLoader, a ray.data dataset or an (inputs, targets) "
                             f"pair of tensors, got {type(data).__name__}")
        self.data, self.batch_size, self.loader_workers, self.pin = data, batch_size, loader_workers, pin
        self.columns, self.keep = columns, keep

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data = self.data
        if _is_tensor_pair(data):
            x, y = data
            if self.keep is not None:
                x, y = x[self.keep], y[self.keep]
            yield from zip(x.split(self.batch_size), y.split(self.batch_size))
            return
        if isinstance(data, Dataset) and self.keep is not None:      # map-style: read only the subset
            data = Subset(data, self.keep.tolist())
        if isinstance(data, DataLoader):
            batches = iter(data)
        elif isinstance(data, Dataset):
            batches = iter(self._loader(data))
        else:
            batches = data.iter_torch_batches(batch_size=self.batch_size, drop_last=False)
        if self.keep is None or isinstance(data, Subset):
            yield from (_pair(b, self.columns) for b in batches)
            return
        start = 0                              # a DataLoader / ray.data stream: keep rows on the fly
        for b in batches:
            x, y = _pair(b, self.columns)
            local = _within(self.keep, start, len(y))
            start += len(y)
            if len(local):
                yield x[local], y[local]

    def _loader(self, dataset: Dataset) -> DataLoader:
        """One DataLoader per dataset, kept: its worker processes persist from pass to pass."""
        if getattr(self, "_cached", (None,))[0] is not dataset:
            workers = self.loader_workers
            self._cached = dataset, DataLoader(dataset, batch_size=self.batch_size, shuffle=False, pin_memory=self.pin,
                                               num_workers=workers, persistent_workers=workers > 0,
                                               prefetch_factor=2 if workers else None)
        return self._cached[1]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        empty = True
        for x, y in self._batches():
            if len(y):
                empty = False
                yield x, y
        if empty:
            raise InputError("the data are empty: the dataset (or this worker's shard) has no samples; "
                             "check the data factory, or use fewer workers than samples")

    def count(self) -> int:
        """The number of samples, without reading them where the source knows its length."""
        if self.keep is not None:
            return len(self.keep)
        if _is_tensor_pair(self.data):
            return len(self.data[1])
        if isinstance(self.data, Dataset) and hasattr(self.data, "__len__"):
            return len(self.data)
        if is_ray_dataset(self.data):
            return self.data.count()
        return sum(len(y) for _, y in self)

    def spread(self, fraction: float) -> "HostData":
        """The samples :func:`spread_indices` picks, read the same way."""
        base = self.keep if self.keep is not None else torch.arange(self.count())
        picked = base[spread_indices(len(base), fraction)]
        return HostData(self.data, self.batch_size, loader_workers=self.loader_workers, pin=self.pin,
                        columns=self.columns, keep=picked)

    def resident_bytes(self, dtype: torch.dtype) -> int:
        """Bytes all the samples take on the device in ``dtype`` (from the first batch)."""
        x, y = next(iter(self))
        size = torch.finfo(dtype).bits // 8
        per_sample = sum(t[:1].numel() * (size if t.is_floating_point() else t.element_size()) for t in (x, y))
        return per_sample * self.count()


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Batches:
    """Ordered (inputs, targets) batches resident on one device; ``n_samples`` counts every sample once."""

    batches: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    placement = "device"

    @classmethod
    def load(cls, host: HostData, dtype: torch.dtype, device: torch.device, channels_last: bool = False) -> "Batches":
        return cls(tuple((_cast(x, dtype, device, channels_last), _cast(y, dtype, device)) for x, y in host))

    @property
    def n_samples(self) -> int:
        return sum(len(y) for _, y in self.batches)

    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[0]

    def __iter__(self):
        return iter(self.batches)

    def spread(self, fraction: float) -> "Batches":
        """⌈fraction · n⌉ samples spread evenly over the data (sample ⌊j·n/m⌋ for j < m), in
        batches as large as these: a fixed subset that sorted data cannot bias towards its start."""
        picked = spread_indices(self.n_samples, fraction)
        xs, ys, start = [], [], 0
        for x, y in self.batches:
            local = _within(picked, start, len(y))
            if len(local):
                xs.append(x[local.to(x.device)])
                ys.append(y[local.to(y.device)])
            start += len(y)
        size = max(len(y) for _, y in self.batches)
        x, y = torch.cat(xs), torch.cat(ys)
        return Batches(tuple(zip(x.split(size), y.split(size))))


class StreamedBatches:
    """The same batches, read from the host data on every pass in the same order (a shard that
    does not fit on the device). On a GPU the DataLoader pins them and each is copied on a side
    stream one batch ahead, so the copy of batch i+1 overlaps the product on batch i."""

    placement = "stream"

    def __init__(self, host: HostData, dtype: torch.dtype, device: torch.device, channels_last: bool = False):
        self.host, self.dtype, self.device, self.channels_last = host, dtype, device, channels_last
        self.n_samples = host.count()

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cuda = self.device.type == "cuda"
        return (_cast(x, self.dtype, self.device, self.channels_last, non_blocking=cuda),
                _cast(y, self.dtype, self.device, non_blocking=cuda))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.device.type != "cuda":
            yield from (self._to_device(x, y) for x, y in self.host)
            return
        copier, staged = torch.cuda.Stream(self.device), None
        for x, y in self.host:
            with torch.cuda.stream(copier):
                batch, ready = self._to_device(x, y), torch.cuda.Event()
                ready.record(copier)
            if staged is not None:
                yield self._handed_over(*staged)
            staged = batch, ready
        if staged is not None:
            yield self._handed_over(*staged)

    @staticmethod
    def _handed_over(batch: tuple[torch.Tensor, torch.Tensor], ready: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` for the compute stream: wait for its copy, keep its memory until compute is done."""
        current = torch.cuda.current_stream()
        current.wait_event(ready)
        for t in batch:
            t.record_stream(current)
        return batch

    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._to_device(*next(iter(self.host)))

    def spread(self, fraction: float) -> "StreamedBatches":
        return StreamedBatches(self.host.spread(fraction), self.dtype, self.device, self.channels_last)


def load_batches(data: DataLike, batch_size: int = 256, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", placement: str = "auto", loader_workers: int = 0,
                 channels_last: bool = False, columns: tuple[str, str] | None = None) -> Batches | StreamedBatches:
    """``data`` as fixed batches of at most ``batch_size`` samples: resident on ``device``
    (``placement="device"``), read again on every pass (``"stream"``), or ``"auto"``: resident
    when they take at most half the free device (or host) memory. Either way the same batches
    in the same order, so the products agree."""
    if placement not in PLACEMENTS:
        raise InputError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    device = torch.device(device)
    host = HostData(data, batch_size, loader_workers=loader_workers, pin=device.type == "cuda", columns=columns)
    if placement == "auto":
        placement = "device" if host.resident_bytes(dtype) <= RESIDENT_SHARE * free_memory(device) else "stream"
    if placement == "device":
        return Batches.load(host, dtype, device, channels_last)
    return StreamedBatches(host, dtype, device, channels_last)


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
    if is_ray_dataset(data) and world_size > 1:
        raise InputError("a data factory returned a ray.data dataset on a worker; pass the dataset itself as "
                         "the data (OperatorSpec(data=ds)) so the driver splits it once, in order")
    return data if world_size == 1 else strided_shard(data, rank, world_size)

