"""The worker actor: one model replica and one data shard per GPU (or CPU slot), joined to the
others by a torch.distributed process group. Its partial products are summed by ONE flat
collective per product; it also holds a slice of the solver's Krylov basis."""
from __future__ import annotations

import dataclasses
import os
import socket
from datetime import timedelta
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

from ..data import is_ray_dataset, load_shard
from ..curvature import Agreement, CurvatureOperator
from ..errors import WorkerError
from ..imports import resolve
from ..losses import LossFn
from ..objective import BatchLoss
from .slice_basis import MissingBasis, SliceBasis
from .collectives import agree_across_ranks, all_reduce_sum

Factory = Union[str, Callable[..., Any]]


@dataclasses.dataclass(frozen=True)
class OperatorSpec:
    """How a worker builds its operator. Factories are callables or ``"pkg.mod:fn"`` paths; the
    data factory may take ``rank``/``world_size`` keywords to build only its own shard. ``data``
    may also be a ``ray.data`` dataset: the worker group splits it once, in order, into one shard
    per rank. ``placement``: keep the shard on the device, stream it on every product, or auto."""

    model: Factory
    data: Factory
    loss: Union[str, LossFn, BatchLoss] = "cross_entropy"
    curvature: str = "hessian"
    mode: str = "forward"
    batch_size: int = 256
    dtype: str = "float32"
    params: Sequence[str] | None = None
    eval_mode: bool = True
    compiled: bool = False
    channels_last: bool = False
    tf32: bool = False
    placement: str = "auto"
    loader_workers: int = 0
    data_columns: tuple[str, str] | None = None

    def build(self, rank: int, world_size: int, device: torch.device,
              reducer: Callable[[torch.Tensor], None] | None = None,
              agree: Agreement | None = None) -> CurvatureOperator:
        model_fn = resolve(self.model) if isinstance(self.model, str) else self.model
        if isinstance(self.data, RayShards):
            shard = self.data.shards[rank]
        else:
            shard = load_shard(resolve(self.data) if isinstance(self.data, str) else self.data, rank, world_size)
        return CurvatureOperator(model_fn(), self.loss, shard,
                                 curvature=self.curvature, mode=self.mode, batch_size=self.batch_size,
                                 dtype=getattr(torch, self.dtype), device=device, params=self.params,
                                 eval_mode=self.eval_mode, reducer=reducer, agree=agree, compiled=self.compiled,
                                 channels_last=self.channels_last, tf32=self.tf32, placement=self.placement,
                                 loader_workers=self.loader_workers, data_columns=self.data_columns)

    def split_for(self, workers: int) -> "OperatorSpec":
        """The spec each of ``workers`` ranks gets: a ray.data dataset split once, in order."""
        if not is_ray_dataset(self.data):
            return self
        return dataclasses.replace(self, data=RayShards(tuple(self.data.split(workers, equal=False))))


@dataclasses.dataclass(frozen=True)
class RayShards:
    """A ray.data dataset split into one shard per rank (rank r reads ``shards[r]``)."""

    shards: tuple[Any, ...]


def free_port() -> int:
    """A TCP port that is free on this host now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def assigned_device(gpu_ids: Sequence[str], visible: str | None, cuda_available: bool) -> torch.device:
    """The device Ray gave this worker: CPU when it was given no GPU (an actor with ``num_gpus=0``
    may still *see* every GPU of its node), else the assigned GPU's index among the visible ones
    (Ray narrows ``CUDA_VISIBLE_DEVICES`` to the assignment unless told not to). A worker given a
    GPU whose torch cannot start CUDA fails here, loudly: falling back to CPU/gloo would change
    the run the user asked for."""
    if not gpu_ids:
        return torch.device("cpu")
    if len(gpu_ids) > 1:
        raise WorkerError(f"this worker was given {len(gpu_ids)} GPUs ({', '.join(gpu_ids)}) but runs one rank on "
                          "one device: use --gpus-per-worker 1 and one worker per GPU")
    if not cuda_available:
        raise WorkerError(f"Ray assigned GPU {gpu_ids[0]} to this worker but torch cannot use CUDA here "
                          f"(torch {torch.__version__}, CUDA build {torch.version.cuda}): install a CUDA build of "
                          "torch on the GPU nodes, or run CPU workers with --gpus-per-worker 0")
    order = [v.strip() for v in (visible or "").split(",") if v.strip()]
    return torch.device("cuda", order.index(gpu_ids[0]) if gpu_ids[0] in order else int(gpu_ids[0]))


class CurvatureWorker:
    """A Ray actor (decorated by :mod:`hessdist.workers.group`). Rank 0 returns results; the other
    ranks return None so that nothing large crosses Ray twice. ``device``: where to run; by default
    the one Ray assigned (:func:`assigned_device`)."""

    def __init__(self, spec: OperatorSpec, device: torch.device | None = None):
        self.spec = spec
        if device is None:
            import ray
            device = assigned_device([str(g) for g in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES"),
                                     torch.cuda.is_available())
        self.device = device
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)          # before any other CUDA call
        self.op: CurvatureOperator | None = None
        self.basis: SliceBasis | None = None
        self.basis_id: str | None = None
        self.rank = -1

    # -- set-up -------------------------------------------------------------------------------
    def placement(self) -> tuple[str, str, list[str], int]:
        """(node IP, node id, GPU ids, process id): ranks are ordered by node, then GPU."""
        import ray
        return (ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id(),
                [str(g) for g in ray.get_gpu_ids()], os.getpid())

    def free_port(self) -> int:
        return free_port()

    def join(self, master: str, port: int, rank: int, world_size: int, timeout_s: float) -> tuple[int, int]:
        """Join the process group and build the operator on this rank's shard.
        Returns (n parameters, total samples over all ranks)."""
        cuda = self.device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{master}:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s),
                                **({"device_id": self.device} if cuda else {}))
        self.rank, self.world_size = rank, world_size
        return self.respec(self.spec)

    def respec(self, spec: OperatorSpec) -> tuple[int, int]:
        """Build this rank's operator from ``spec`` in the process group it joined. The old one, its
        views and basis slice go first (a device need not hold two models); a build that fails
        leaves none, and the group rebuilds. Returns (n parameters, total samples over all ranks)."""
        self.op, self.basis, self.basis_id = None, None, None
        self.views: dict[tuple[float, str], CurvatureOperator] = {}
        self.op = spec.build(self.rank, self.world_size, self.device, reducer=all_reduce_sum,
                             agree=agree_across_ranks(self.device))
        self.spec = spec
        return self.op.n, self.op.n_samples

    def _op(self, fraction: float = 1.0, curvature: str | None = None) -> CurvatureOperator:
        """The operator over a fraction of this shard, spread evenly over it, in the spec's or
        another ``curvature`` (built on first use; every rank gets the same call at the same time,
        so the sample-count all-reduce inside lines up)."""
        key = (fraction, curvature or self.op.curvature)
        if key not in self.views:
            op = self.op if key[1] == self.op.curvature else self.op.with_curvature(key[1])
            self.views[key] = op if fraction == 1.0 else op.subset(fraction)
        return self.views[key]

    def subset_samples(self, fraction: float, curvature: str | None = None) -> int:
        return self._op(fraction, curvature).n_samples

    def set_parameters(self, state: dict[str, np.ndarray]) -> None:
        self.op.set_parameters({k: torch.tensor(v) for k, v in state.items()})

    # -- products -----------------------------------------------------------------------------
    def _rank0(self, value):
        return value if self.rank == 0 else None

    def matmat(self, V: np.ndarray, fraction: float = 1.0, curvature: str | None = None) -> np.ndarray | None:
        return self._rank0(self._op(fraction, curvature).matmat(np.asarray(V)))

    def loss(self, theta: np.ndarray | None = None) -> float | None:
        return self._rank0(self.op.loss(None if theta is None else torch.tensor(theta)))

    def loss_and_gradient(self, theta: np.ndarray | None = None):
        loss, g = self.op.loss_and_gradient(None if theta is None else torch.tensor(theta))   # a copy: theta is read-only (object store)
        return self._rank0((loss, g.numpy()))

    def parameters(self) -> np.ndarray | None:
        return self._rank0(self.op.parameters.numpy())

    def check_determinism(self, seed: int = 0) -> None:
        self.op.check_determinism(seed)

    def describe(self) -> dict:
        return self.op.describe()

    def basis_bytes(self) -> int:
        return self.op.basis_bytes()

    # -- this rank's slice of a sharded Krylov basis (hessdist.workers.slice_basis) -----------------
    def _basis(self, basis_id: str) -> SliceBasis:
        if self.basis is None or self.basis_id != basis_id:
            raise MissingBasis(f"rank {self.rank} holds no basis {basis_id[:8]}")
        return self.basis

    def basis_reset(self, basis_id: str, capacity: int, dtype: str, fraction: float = 1.0,
                    curvature: str | None = None) -> None:
        self.basis = SliceBasis(self._op(fraction, curvature), capacity, getattr(torch, dtype))
        self.basis_id = basis_id

    def basis_add_start(self, basis_id: str, v: np.ndarray) -> float:
        return self._basis(basis_id).add_start(v)

    def basis_expand(self, basis_id: str, j: int, count: int = 1) -> list[np.ndarray]:
        return self._basis(basis_id).expand(j, count)

    def basis_compress(self, basis_id: str, Y: np.ndarray, expanded: int) -> None:
        self._basis(basis_id).compress(Y, expanded)

    def basis_combine(self, basis_id: str, Y: np.ndarray) -> np.ndarray:
        return self._basis(basis_id).combine(Y)

    def basis_peak(self, basis_id: str) -> int:
        return self._basis(basis_id).rows.peak_bytes

    def basis_seconds(self, basis_id: str) -> dict:
        return self._basis(basis_id).seconds
