"""A group of worker actors in a placement group, joined by a torch.distributed process group.

Set-up follows the recipe Ray Train uses: bundles reserved first, ranks ordered by node then
GPU, rank 0's node IP and a free port as the rendezvous, every rank's ``init_process_group``
started concurrently with an explicit timeout. Workers keep ``max_restarts=0``: when one dies
the whole group is torn down and rebuilt (new actors, new port, new process group), the
parameters are re-sent and the interrupted call is retried. State that lived on the lost
workers (a sharded Krylov basis) is gone: calls about it then fail, and the solver continues
from its own checkpoint.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Mapping, Sequence

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..errors import HessdistError, WorkerError
from .collectives import PeerFailed
from .worker import CurvatureWorker, OperatorSpec

log = logging.getLogger(__name__)
RemoteWorker = ray.remote(max_restarts=0)(CurvatureWorker)


class WorkerLost(Exception):
    """A worker died, or a call or collective timed out: the group must be rebuilt."""


def connect(address: str | None = None, num_cpus: int | None = None, runtime_env: dict | None = None) -> bool:
    """Join the Ray cluster at ``address`` (``"auto"`` or ``HOST:PORT``), or start a local one when
    None. Returns True when this call started a local cluster (the caller shuts it down)."""
    if ray.is_initialized():
        return False
    kwargs = dict(runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=True)
    if address is None:             # "local": a cluster of our own, even when RAY_ADDRESS or a running one is found
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
        return True
    hint = ("Start one with `ray start --head` (see cluster/README.md), check host and port, or omit "
            "--address to run on a local cluster")
    if address not in ("auto", "local") and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        try:                       # ray.init retries an unreachable address for minutes: probe first
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            raise WorkerError(f"no Ray cluster reachable at --address {address!r} ({exc}). {hint}") from None
        _present_token(address)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise WorkerError(f"no Ray cluster reachable at --address {address!r} ({exc}). {hint}") from exc
    return False


TOKEN_HINT = ("Supply the cluster's token (`ray get-auth-token` on the head prints it) as RAY_AUTH_TOKEN, as a file "
              "named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token; see cluster/README.md")


def _present_token(address: str) -> None:
    """Token authentication, on for ``ray start --head`` when a token exists (Ray 2.59+). Ray
    presents a token by itself only to a cluster it found (``auto``). For an explicit address,
    ask the cluster's GCS once as configured; if it demands a token and RAY_AUTH_MODE is unset,
    turn token mode on when a token is available the ways Ray documents (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) and ask again. A cluster without token auth is left
    alone (token mode towards it breaks its workers). A missing or wrong token fails here in
    milliseconds, where ray.init retries the handshake for ~20 s and then blames the address.
    (Ray 2.60 internals, pinned in pyproject.toml.)"""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    if _gcs_accepts(address) or (maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
                                 and _gcs_accepts(address)):
        return
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    found = "the token this driver presented was rejected" if mode == "token" else "this driver found no token"
    raise WorkerError(f"the Ray cluster at --address {address!r} requires token authentication and {found} "
                      f"(RAY_AUTH_MODE={mode}). {TOKEN_HINT}")


def _gcs_accepts(address: str) -> bool:
    """Whether the GCS at ``address`` accepts this driver's credentials (False: it wants a token)."""
    from ray._raylet import GcsClient
    try:
        GcsClient(address=address)
        return True
    except ray.exceptions.AuthenticationError:
        return False
    except Exception as exc:              # not a GCS at all: ray.init would fail the same way, slower
        raise WorkerError(f"no Ray cluster answered at --address {address!r} ({exc}). Check host and port "
                          "(the head's GCS port, 6379 unless `ray start --port` said otherwise)") from None


class WorkerGroup:
    """``workers`` actors, each with ``gpus_per_worker`` GPUs (0: CPU, gloo) and a data shard.

    Starting waits up to ``start_timeout_s`` for the cluster to free the resources, but only
    ``grow_timeout_s`` (default: the same) once its live nodes cannot hold the group at all:
    then only a new node helps (an autoscaler, a lost node coming back). On a fixed cluster
    ``grow_timeout_s=0`` shrinks (``min_workers``) or fails at once."""

    def __init__(self, spec: OperatorSpec, workers: int = 2, *, gpus_per_worker: float = 0,
                 cpus_per_worker: float = 1, min_workers: int | None = None, max_restarts: int = 3,
                 restart_window_s: float = 600, start_timeout_s: float = 120,
                 grow_timeout_s: float | None = None, call_timeout_s: float = 1800, collective_timeout_s: float = 600,
                 runtime_env: dict | None = None):
        if workers < 1:
            raise WorkerError(f"a worker group needs at least one worker, got {workers}")
        if not ray.is_initialized():
            raise WorkerError("Ray is not initialised: call hessdist.workers.connect() first")
        if min_workers is not None and not 1 <= min_workers <= workers:
            raise WorkerError(f"min_workers must lie between 1 and workers = {workers}, got {min_workers}")
        self.spec, self.size = spec, workers
        self.min_workers = workers if min_workers is None else min_workers
        self._worker_spec = spec.split_for(workers)     # a ray.data dataset: split once, kept for rebuilds
        self.gpus, self.cpus = gpus_per_worker, cpus_per_worker
        self.max_restarts, self.restart_window_s, self.start_timeout_s = max_restarts, restart_window_s, start_timeout_s
        self.grow_timeout_s = start_timeout_s if grow_timeout_s is None else grow_timeout_s
        self.call_timeout_s, self.collective_timeout_s = call_timeout_s, collective_timeout_s
        self.runtime_env = runtime_env
        self.replacements: list[str] = []        # one entry per rebuild, saying why
        self._rebuilt_at: list[float] = []       # when (monotonic): the restart budget is per time window
        self._state_ref = None
        self.actors: list[Any] = []
        self._pg = None
        shrunk = self._start()
        if shrunk:
            log.warning("started %s", shrunk)

    # -- life cycle ---------------------------------------------------------------------------
    def _start_group(self) -> None:
        """Reserve ``size`` bundles, start one actor in each, order them by node and GPU, join
        them into one process group and send them the parameters (if any were set)."""
        bundle = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        self._reserve(bundle)
        actors = [RemoteWorker.options(
            num_cpus=self.cpus, num_gpus=self.gpus, runtime_env=self.runtime_env,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i),
        ).remote(self._worker_spec) for i in range(self.size)]
        try:
            places = ray.get([a.placement.remote() for a in actors], timeout=self.start_timeout_s)
            order = sorted(range(self.size), key=lambda i: places[i][:3])
            self.actors = [actors[i] for i in order]
            self.placements = [{"rank": r, "node": places[i][0], "node_id": places[i][1], "gpus": places[i][2],
                                "pid": places[i][3]}
                               for r, i in enumerate(order)]
            master = places[order[0]][0]
            port = ray.get(self.actors[0].free_port.remote(), timeout=self.start_timeout_s)
            # joining waits for every rank (up to the collective timeout) and builds the operator
            joined = ray.get([a.join.remote(master, port, r, self.size, self.collective_timeout_s)
                              for r, a in enumerate(self.actors)],
                             timeout=max(self.start_timeout_s, self.collective_timeout_s))
        except ray.exceptions.RayTaskError as exc:
            self._teardown(actors)
            self.actors = []
            cause = _cause(exc)
            if isinstance(cause, HessdistError):
                raise type(cause)(f"on a worker: {cause}") from None
            raise WorkerError(f"a worker failed to start: {exc}. If it could not import your module, "
                              "run from the directory that holds it or install it on every node") from exc
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            self._teardown(actors)
            self.actors = []
            if "creation task" in str(exc):                 # the worker's __init__ raised
                raise WorkerError(f"a worker failed to start: {exc}") from exc
            raise WorkerError(f"workers did not start within {self.start_timeout_s:.0f} s: {exc}") from exc
        self.n, self.n_samples = joined[0]
        if self._state_ref is not None:
            self._call("set_parameters", self._state_ref)

    def _reserve(self, bundle: dict) -> None:
        """Reserve ``size`` bundles: wait while the cluster could free them (``start_timeout_s``),
        and only ``grow_timeout_s`` from the moment its live nodes cannot hold them all."""
        self._pg = placement_group([bundle] * self.size, strategy="PACK")
        ready, t0, short_since = self._pg.ready(), time.monotonic(), None
        while not ray.wait([ready], timeout=0.5)[0]:
            now = time.monotonic()
            if short_since is None and self._workers_that_fit() < self.size:
                short_since = now
            waited = now - t0
            if waited >= self.start_timeout_s or (short_since is not None and now - short_since >= self.grow_timeout_s):
                remove_placement_group(self._pg)
                self._pg = None
                why = (f"its live nodes hold {self._workers_that_fit()}" if short_since is not None
                       else f"they were not freed within {self.start_timeout_s:.0f} s")
                raise WorkerError(
                    f"the Ray cluster cannot provide {self.size} workers of {bundle}: {why} (waited {waited:.0f} s; "
                    f"free now: {_free()}, in all: {_free(ray.cluster_resources())}). Use fewer --workers, fewer "
                    "--gpus-per-worker, or add nodes")

    def _teardown(self, actors: Sequence[Any] | None = None) -> None:
        for a in actors if actors is not None else self.actors:
            ray.kill(a, no_restart=True)
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    def shutdown(self) -> None:
        """Kill the workers and release their resources."""
        self._teardown()
        self.actors = []

    def rebuild(self, reason: str) -> None:
        """Replace the whole group (new actors, port and process group) and re-send the parameters.
        When the cluster can no longer hold every worker (a node was lost), shrink to the workers
        its live nodes hold, down to ``min_workers``; the data are re-sharded over them. A rebuild
        that fails leaves no actors; the next call tries again."""
        log.warning("rebuilding the worker group: %s", reason)
        self._teardown(self.actors)
        self.actors = []
        self.replacements.append(reason)
        try:
            shrunk = self._start()
            if shrunk:
                self.replacements[-1] += f"; {shrunk}"
        finally:
            self._rebuilt_at.append(time.monotonic())

    def respec(self, spec: OperatorSpec) -> None:
        """Rebuild every rank's operator from ``spec`` in the running workers: another model, data,
        curvature or precision without starting new ones (a worker's start — imports, CUDA
        context, process group — costs seconds; building an operator, little). The parameters
        sent before and any sharded basis are dropped; operators made on this group before
        describe the old spec. When a rank fails to build it, the group is rebuilt on the old
        spec (a rank that did build may wait in a collective for the one that failed) and the
        error is raised."""
        old = self.spec, self._worker_spec, self._state_ref
        self.spec, self._worker_spec, self._state_ref = spec, spec.split_for(self.size), None
        try:
            self.n, self.n_samples = self.run("respec", self._worker_spec)[0]
        except Exception as exc:
            self.spec, self._worker_spec, self._state_ref = old
            self.rebuild(f"respec failed: {exc}")
            raise

    def _start(self) -> str | None:
        """Start ``size`` workers, or, when the cluster cannot hold them, as many as its live nodes
        hold down to ``min_workers`` (the data re-sharded over them). Returns what was shrunk."""
        try:
            self._start_group()
            return None
        except WorkerError as exc:
            fits = self._workers_that_fit()
            if not self.min_workers <= fits < self.size:
                raise
            log.warning("shrinking the worker group from %d to %d workers: %s", self.size, fits, exc)
            shrunk = f"shrunk from {self.size} to {fits} workers (the cluster holds no more)"
            self.size, self._worker_spec = fits, self.spec.split_for(fits)
            self._start_group()
            return shrunk

    def _workers_that_fit(self) -> int:
        """Workers of this shape the cluster's live nodes can hold, all their resources counted."""
        total = 0
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            have = node.get("Resources", {})
            fits = int(have.get("CPU", 0) // self.cpus) if self.cpus else self.size
            if self.gpus:
                fits = min(fits, int(have.get("GPU", 0) // self.gpus))
            total += fits
        return total

    # -- calls --------------------------------------------------------------------------------
    def _call(self, method: str, *args: Any) -> list[Any]:
        """Call ``method`` on every rank at once; results in rank order, or WorkerLost."""
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        deadline = time.monotonic() + self.call_timeout_s
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                raise WorkerLost(f"{method} did not finish within {self.call_timeout_s:.0f} s")
            try:
                ray.get(done[0])
            except ray.exceptions.RayActorError as exc:
                raise WorkerLost(f"a worker died during {method}: {exc.__class__.__name__}") from exc
            except ray.exceptions.RayTaskError as exc:
                cause = _cause(exc)
                if isinstance(cause, PeerFailed):       # the failing rank's own error follows
                    continue
                if isinstance(cause, HessdistError):
                    raise type(cause)(f"on rank {refs.index(done[0])}: {cause}") from None
                if isinstance(cause, (RuntimeError, torch.distributed.DistError)) and _is_collective(cause):
                    raise WorkerLost(f"a collective failed during {method}: {cause}") from exc
                raise
        return ray.get(refs)

    def run(self, method: str, *args: Any) -> list[Any]:
        """``_call`` with recovery: on a lost worker (or no workers, after a rebuild that failed),
        rebuild and retry — at most ``max_restarts`` rebuilds within any ``restart_window_s``
        seconds, so a long-lived service is not worn out by failures days apart — then raise
        WorkerError."""
        while True:
            try:
                if not self.actors:
                    raise WorkerLost("the last rebuild of the worker group failed")
                return self._call(method, *args)
            except WorkerLost as exc:
                now = time.monotonic()
                recent = sum(1 for t in self._rebuilt_at if now - t < self.restart_window_s)
                if recent >= self.max_restarts:
                    raise WorkerError(f"{exc}; the worker group was already rebuilt {recent} times in the last "
                                      f"{self.restart_window_s:.0f} s (max_restarts). Check the workers' logs for "
                                      "out-of-memory kills or lost nodes") from exc
                self.rebuild(str(exc))

    def set_parameters(self, state: Mapping[str, torch.Tensor]) -> None:
        """Send a ``state_dict`` once (one object-store copy shared by every worker)."""
        arrays = {k: v.detach().cpu().numpy() for k, v in state.items()}
        self._state_ref = ray.put(arrays)
        self.run("set_parameters", self._state_ref)


def _cause(exc: "ray.exceptions.RayTaskError") -> BaseException:
    """The exception raised inside the worker (without Ray's traceback wrapper)."""
    return getattr(exc, "cause", None) or exc


def _free(resources: dict | None = None) -> dict:
    resources = ray.available_resources() if resources is None else resources
    return {k: resources.get(k, 0) for k in ("CPU", "GPU")}


def _is_collective(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "broken pipe"))


def worker_layout(workers: int | None = None, gpus_per_worker: float | None = None) -> tuple[int, int, str]:
    """Workers and GPUs per worker, defaults taken from the connected *cluster*, not from this
    driver (a CPU head of a GPU cluster sees no CUDA): with GPUs in the cluster, one GPU per
    worker and one worker per GPU; else two CPU workers. Returns (workers, gpus, what was chosen).
    A fraction of a GPU is refused (NCCL cannot run two ranks of one group on one device), and so
    is more than one (a rank uses one device)."""
    total = int(ray.cluster_resources().get("GPU", 0))
    asked = workers is not None and gpus_per_worker is not None
    gpus = gpus_per_worker if gpus_per_worker is not None else (1 if total else 0)
    if gpus < 0 or gpus != int(gpus):
        raise WorkerError(f"--gpus-per-worker {gpus_per_worker} is not a whole number of GPUs: NCCL cannot run two "
                          "ranks of one process group on one GPU. Use 1 (one rank per GPU) or 0 (CPU workers)")
    gpus = int(gpus)
    if gpus > 1:
        raise WorkerError(f"--gpus-per-worker {gpus}: a worker runs one rank on one GPU, so the other GPU(s) would sit "
                          f"idle. Use --gpus-per-worker 1 with one worker per GPU (--workers {max(1, total)})")
    if workers is None:
        workers = max(1, total // gpus) if gpus else 2
    if workers < 1:
        raise WorkerError(f"a worker group needs at least one worker, got {workers}")
    chosen = f"{workers} worker(s) with {gpus} GPU each" if gpus else f"{workers} CPU worker(s)"
    return workers, gpus, chosen + ("" if asked else f" (defaults for a cluster with {total} GPU(s))")


__all__ = ["WorkerGroup", "connect", "worker_layout", "OperatorSpec", "WorkerLost"]
