"""Data: a fixed, ordered sequence of batches, and sharding for workers.

A curvature product must be a fixed linear map, so every pass reads the same samples in the
same order (no shuffling, no re-drawn augmentation): kept on the compute device when they fit
(:class:`Batches`), else read again from host memory or disk on every pass
(:class:`StreamedBatches`). A batch is an ``(inputs, targets)`` pair or, for a
:class:`~hessdist.objective.BatchLoss`, any tuple/list/dict of tensors (nested), every tensor
with one row per sequence or image: batches are sliced, sharded and subset by rows.
"""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import InputError

DataLike = Union[Dataset, DataLoader, tuple, list, dict, Any]     # Any: a ray.data dataset
Batch = Any           # a tensor, or a tuple/list/dict of them (nested), one row per sample


def tree_map(fn: Callable[[torch.Tensor], Any], batch: Batch) -> Batch:
    """``fn`` applied to every tensor of a batch, its structure kept (other leaves as they are)."""
    if torch.is_tensor(batch):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: tree_map(fn, v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):         # a namedtuple
        return type(batch)(*(tree_map(fn, v) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(tree_map(fn, v) for v in batch)
    return batch


def tensors(batch: Batch) -> list[torch.Tensor]:
    """Every tensor in a batch, in order."""
    found: list[torch.Tensor] = []
    tree_map(found.append, batch)
    return found


def rows(batch: Batch) -> int:
    """The rows of a batch (its tensors' common first dimension), checked."""
    sizes = {len(t) if t.ndim else None for t in tensors(batch)}
    if len(sizes) != 1 or None in sizes:
        raise InputError(f"every tensor in a batch needs the same first dimension (one row per sample); got "
                         f"{describe(batch)}")
    return sizes.pop()


def describe(batch: Batch) -> str:
    """A batch's structure and shapes, for messages."""
    if torch.is_tensor(batch):
        return str(tuple(batch.shape))
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in batch) + ")"
    return type(batch).__name__


def take(batch: Batch, index: Union[slice, torch.Tensor]) -> Batch:
    """The rows ``index`` of every tensor in a batch."""
    return tree_map(lambda t: t[index.to(t.device) if torch.is_tensor(index) else index], batch)


def concat(parts: list[Batch]) -> Batch:
    """Batches of one structure joined row-wise."""
    first = parts[0]
    if torch.is_tensor(first):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {k: concat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        joined = [concat(list(column)) for column in zip(*parts)]
        return type(first)(*joined) if hasattr(first, "_fields") else type(first)(joined)
    return first


def split(batch: Batch, size: int) -> list[Batch]:
    """A batch cut into consecutive batches of at most ``size`` rows."""
    return [take(batch, slice(start, start + size)) for start in range(0, rows(batch), size)]


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


def _in_memory(data: Any) -> bool:
    """Tensors in a tuple/list/dict (one row per sample), rather than a dataset or loader."""
    return isinstance(data, (tuple, list, Mapping)) and bool(data) and all(
        isinstance(v, (torch.Tensor, tuple, list, Mapping)) for v in (data.values() if isinstance(data, Mapping) else data))


def _per_sample_list(data: Any, pairs: bool) -> bool:
    """A Python list of samples (dicts, or (input, target) pairs for a pairs loss) rather than
    the columns of one batch: it would be read as a batch whose rows are the samples' parts."""
    if not isinstance(data, list) or not data:
        return False
    kinds = (Mapping, tuple, list) if pairs else (Mapping,)
    return all(isinstance(v, kinds) for v in data)


def is_ray_dataset(data: Any) -> bool:
    return type(data).__module__.startswith("ray.data")


def _as_batch(batch: Any, columns: tuple[str, str] | None, pairs: bool) -> Batch:
    """A DataLoader or ray.data batch (a dict of columns) as the contract wants it: an
    (inputs, targets) pair for a pairs loss, else as given, its rows checked."""
    if not pairs:
        batch = dict(batch) if isinstance(batch, Mapping) else batch     # a BatchEncoding, a UserDict
        rows(batch)
        return batch
    if isinstance(batch, Mapping):
        names = columns or tuple(batch)
        if len(names) != 2:
            raise InputError(f"dict batches with columns {list(batch)} need data_columns=(inputs, targets) for "
                             "a loss(outputs, targets), or a BatchLoss (e.g. BatchLoss('model_loss')) that "
                             "takes the whole dict")
        return torch.as_tensor(batch[names[0]]), torch.as_tensor(batch[names[1]])
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise InputError("each sample/batch must be an (input, target) pair for a loss(outputs, targets); "
                         "wrap your dataset so __getitem__ returns (x, y), or use a BatchLoss for other batches")
    x, y = batch
    if rows(x) != len(y):
        raise InputError(f"a batch has {rows(x)} inputs but {len(y)} targets")
    return x, torch.as_tensor(y)


def _cast(batch: Batch, dtype: torch.dtype, device: torch.device, channels_last: bool = False,
          non_blocking: bool = False) -> Batch:
    """Every tensor on ``device``; floating ones in ``dtype`` (4-D ones channels-last if asked)."""
    def cast(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype, non_blocking=non_blocking)
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x

    return tree_map(cast, batch)


class HostData:
    """The samples as the user gave them (tensors, a Dataset, a DataLoader or a ray.data dataset),
    read in one fixed order as host batches of at most ``batch_size`` rows; ``keep`` restricts
    them to the given row indices (a subset). ``pairs``: batches are (inputs, targets)."""

    def __init__(self, data: DataLike, batch_size: int = 256, *, loader_workers: int = 0, pin: bool = False,
                 columns: tuple[str, str] | None = None, keep: torch.Tensor | None = None, pairs: bool = True):
        if batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size}")
        if _per_sample_list(data, pairs):
            raise InputError(f"data is a list of {len(data)} samples ({describe(data[0])} each); hessdist reads "
                             "in-memory data as one batch with one row per sample: stack the samples into "
                             "tensors (a dict of tensors, or an (inputs, targets) pair), or wrap the list in a "
                             "torch.utils.data.Dataset (with a DataLoader and collate_fn for ragged sequences)")
        if not (_in_memory(data) or isinstance(data, (Dataset, DataLoader)) or is_ray_dataset(data)):
            raise InputError(f"data must be a Dataset, a DataLoader, a ray.data dataset or an (inputs, targets) "
                             f"pair of tensors (any tuple/dict of tensors for a BatchLoss), got {type(data).__name__}")
        if _in_memory(data):
            if pairs and not (isinstance(data, (tuple, list)) and len(data) == 2):
                raise InputError("in-memory data for a loss(outputs, targets) must be an (inputs, targets) pair; "
                                 "use a BatchLoss for other batch shapes")
            if pairs and rows(data[0]) != len(data[1]):
                raise InputError(f"inputs and targets differ in length ({rows(data[0])} vs {len(data[1])}); "
                                 "pass one target per input")
            rows(data)
        self.data, self.batch_size, self.loader_workers, self.pin = data, batch_size, loader_workers, pin
        self.columns, self.keep, self.pairs = columns, keep, pairs

    def _batches(self) -> Iterator[Batch]:
        data = self.data
        if _in_memory(data):
            yield from split(data if self.keep is None else take(data, self.keep), self.batch_size)
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
            yield from (_as_batch(b, self.columns, self.pairs) for b in batches)
            return
        start = 0                              # a DataLoader / ray.data stream: keep rows on the fly
        for b in batches:
            b = _as_batch(b, self.columns, self.pairs)
            size = rows(b)
            local = _within(self.keep, start, size)
            start += size
            if len(local):
                yield take(b, local)

    def _loader(self, dataset: Dataset) -> DataLoader:
        """One DataLoader per dataset, kept: its worker processes persist from pass to pass."""
        if getattr(self, "_cached", (None,))[0] is not dataset:
            workers = self.loader_workers
            self._cached = dataset, DataLoader(dataset, batch_size=self.batch_size, shuffle=False, pin_memory=self.pin,
                                               num_workers=workers, persistent_workers=workers > 0,
                                               prefetch_factor=2 if workers else None)
        return self._cached[1]

    def __iter__(self) -> Iterator[Batch]:
        empty = True
        for b in self._batches():
            if rows(b):
                empty = False
                yield b
        if empty:
            raise InputError("the data are empty: the dataset (or this worker's shard) has no samples; "
                             "check the data factory, or use fewer workers than samples")

    def count(self) -> int:
        """The number of rows, without reading them where the source knows its length."""
        if self.keep is not None:
            return len(self.keep)
        if _in_memory(self.data):
            return rows(self.data)
        if isinstance(self.data, Dataset) and hasattr(self.data, "__len__"):
            return len(self.data)
        if is_ray_dataset(self.data):
            return self.data.count()
        return sum(rows(b) for b in self)

    def spread(self, fraction: float) -> "HostData":
        """The samples :func:`spread_indices` picks, read the same way."""
        base = self.keep if self.keep is not None else torch.arange(self.count())
        picked = base[spread_indices(len(base), fraction)]
        return HostData(self.data, self.batch_size, loader_workers=self.loader_workers, pin=self.pin,
                        columns=self.columns, keep=picked, pairs=self.pairs)

    def resident_bytes(self, dtype: torch.dtype) -> int:
        """Bytes all the rows take on the device in ``dtype`` (from the first batch)."""
        size = torch.finfo(dtype).bits // 8
        per_row = sum(t[:1].numel() * (size if t.is_floating_point() else t.element_size())
                      for t in tensors(next(iter(self))))
        return per_row * self.count()


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Batches:
    """Ordered batches resident on one device; ``n_rows`` counts every row once."""

    batches: tuple[Batch, ...]
    placement = "device"

    @classmethod
    def load(cls, host: HostData, dtype: torch.dtype, device: torch.device, channels_last: bool = False) -> "Batches":
        return cls(tuple(_cast(b, dtype, device, channels_last) for b in host))

    @property
    def n_rows(self) -> int:
        return sum(rows(b) for b in self.batches)

    def first(self) -> Batch:
        return self.batches[0]

    def __iter__(self):
        return iter(self.batches)

    def spread(self, fraction: float) -> "Batches":
        """⌈fraction · n⌉ samples spread evenly over the data (sample ⌊j·n/m⌋ for j < m), in
        batches as large as these: a fixed subset that sorted data cannot bias towards its start."""
        picked = spread_indices(self.n_rows, fraction)
        parts, start = [], 0
        for b in self.batches:
            size = rows(b)
            local = _within(picked, start, size)
            if len(local):
                parts.append(take(b, local))
            start += size
        return Batches(tuple(split(concat(parts), max(rows(b) for b in self.batches))))


class StreamedBatches:
    """The same batches, read from the host data on every pass in the same order (a shard that
    does not fit on the device). On a GPU the DataLoader pins them and each is copied on a side
    stream one batch ahead, so the copy of batch i+1 overlaps the product on batch i."""

    placement = "stream"

    def __init__(self, host: HostData, dtype: torch.dtype, device: torch.device, channels_last: bool = False):
        self.host, self.dtype, self.device, self.channels_last = host, dtype, device, channels_last
        self.n_rows = host.count()

    def _to_device(self, batch: Batch) -> Batch:
        if self.device.type != "cuda":
            return _cast(batch, self.dtype, self.device, self.channels_last)
        # a copy from pageable memory is synchronous whatever non_blocking says: pin first (the
        # DataLoader's batches already are; PyTorch's host allocator reuses the pinned blocks)
        pinned = tree_map(lambda t: t if t.is_pinned() else t.pin_memory(), batch)
        return _cast(pinned, self.dtype, self.device, self.channels_last, non_blocking=True)

    def __iter__(self) -> Iterator[Batch]:
        if self.device.type != "cuda":
            yield from (self._to_device(b) for b in self.host)
            return
        copier, staged = torch.cuda.Stream(self.device), None
        for b in self.host:
            with torch.cuda.stream(copier):
                batch, ready = self._to_device(b), torch.cuda.Event()
                ready.record(copier)
            if staged is not None:
                yield self._handed_over(*staged)
            staged = batch, ready
        if staged is not None:
            yield self._handed_over(*staged)

    def _handed_over(self, batch: Batch, ready: Any) -> Batch:
        """``batch`` for this device's compute stream: wait for its copy, keep its memory until
        compute is done."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ready)
        for t in tensors(batch):
            t.record_stream(current)
        return batch

    def first(self) -> Batch:
        return self._to_device(next(iter(self.host)))

    def spread(self, fraction: float) -> "StreamedBatches":
        return StreamedBatches(self.host.spread(fraction), self.dtype, self.device, self.channels_last)


def load_batches(data: DataLike, batch_size: int = 256, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", placement: str = "auto", loader_workers: int = 0,
                 channels_last: bool = False, columns: tuple[str, str] | None = None,
                 pairs: bool = True) -> Batches | StreamedBatches:
    """``data`` as fixed batches of at most ``batch_size`` rows: resident on ``device``
    (``placement="device"``), read again on every pass (``"stream"``), or ``"auto"``: resident
    when they take at most half the free device (or host) memory. Either way the same batches
    in the same order, so the products agree."""
    if placement not in PLACEMENTS:
        raise InputError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    device = torch.device(device)
    host = HostData(data, batch_size, loader_workers=loader_workers, pin=device.type == "cuda", columns=columns,
                    pairs=pairs)
    if placement == "auto":
        placement = "device" if host.resident_bytes(dtype) <= RESIDENT_SHARE * free_memory(device) else "stream"
    if placement == "device":
        return Batches.load(host, dtype, device, channels_last)
    return StreamedBatches(host, dtype, device, channels_last)


def strided_shard(data: DataLike, rank: int, world_size: int) -> DataLike:
    """Samples rank, rank+world_size, …: the deterministic split used when the data factory
    cannot build its own shard. Shards differ in size by at most one sample."""
    if _in_memory(data):
        return take(data, slice(rank, None, world_size))
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

