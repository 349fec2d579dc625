"""The eigen-service: a named, detached Ray actor that owns a worker group, so a trainer can ask
for the spectrum after every epoch without waiting for it.

    handle = hessdist.connect("resnet-hessian")            # from any driver on the cluster
    future = handle.submit(model.state_dict(), step=epoch)  # returns at once; training goes on
    ...
    result = handle.result(future)                          # dict: values, residuals, bounds, ...

Solves are serialised inside the service (overlapping collectives would deadlock); ``status``
is answered while a solve runs. Each solve warm-starts from the previous solve's eigenvectors.
Results are appended to ``<out_dir>/history.jsonl`` and eigenvectors saved to
``<out_dir>/vectors/step-<step>.pt`` (the newest ``keep_vectors`` steps' files, or all); a
restarted service reloads both and keeps warm-starting. The out-dir is made absolute by the
client: on a cluster of several nodes it must be on storage every node sees.

Each queued request holds a full copy of the parameters in the object store, so the queue is
bounded (``max_queued``): a submit that finds it full is refused (``when_full="reject"``,
:class:`QueueFull`) or pushes out the oldest queued steps (``"coalesce"``: their futures raise
:class:`Superseded`, and their parameter copies are released at once).
"""
from __future__ import annotations

import collections
import json
import numbers
import os
import threading
import time
from typing import Any, Mapping

import numpy as np
import ray
import torch

from .errors import HessdistError, InputError, QueueFull, Superseded, WorkerError
from .history import History, filesystem, parameters_digest, plain
from .solvers.certify import solve_step
from .solvers.starts import draw_seed
from .solvers.ritz import Accuracy, Rtol, parse_which
from .workers import DistributedOperator, OperatorSpec, WorkerGroup

NAMESPACE = "hessdist"
SOLVE_OPTIONS = {"which", "k", "tol", "rtol", "max_hvps", "max_fpe", "budget_s", "subset", "compare_cold", "seed",
                 "block", "max_basis", "confidence"}


#: queued requests (not counting the running one) a service holds by default: enough to ride out
#: a burst (a slow cold first solve, a restart) while a trainer that submits faster than the
#: service solves, and so falls further behind with every step, hears of it at submit time
DEFAULT_MAX_QUEUED = 8
WHEN_FULL = ("reject", "coalesce")


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def check_queue_options(max_queued: int | None, when_full: str, keep_vectors: int | None) -> None:
    """Refuse bad service options at the client, with a message naming the fix."""
    if max_queued is not None and not _whole(max_queued, 1):
        raise InputError(f"max_queued must be a whole number >= 1, or None for no limit; got {max_queued!r}")
    if when_full not in WHEN_FULL:
        raise InputError(f"when_full must be one of {list(WHEN_FULL)}; got {when_full!r}")
    if keep_vectors is not None and not _whole(keep_vectors, 1):
        raise InputError(f"keep_vectors must be a whole number >= 1 (the newest step's vectors are always kept: "
                         f"the next solve and a restarted service warm-start from them), or None to keep every "
                         f"step's; got {keep_vectors!r}")


#: floating dtypes NumPy holds; any other (bfloat16, float8) is sent as float32, which holds
#: each of its values exactly
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def host_array(key: str, value: Any) -> np.ndarray:
    """A state_dict entry as a NumPy array of its own (a copy: the trainer goes on updating the
    tensor), with its exact values: bfloat16/float8 become float32, which represents them exactly."""
    if isinstance(value, np.ndarray):
        return np.array(value)
    if not torch.is_tensor(value):
        raise InputError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
    t = value.detach()
    dtype = torch.float32 if t.is_floating_point() and t.dtype not in _NUMPY_FLOATS else t.dtype
    try:
        return t.to(device="cpu", dtype=dtype, copy=True).numpy()
    except TypeError as exc:                      # a dtype NumPy has no counterpart for (complex32, ...)
        raise InputError(f"state_dict entry {key!r} has dtype {t.dtype}, which cannot be sent: {exc}") from None


class EigenService:
    """The actor class (see :func:`start`). All public methods are remote calls."""

    def __init__(self, spec: OperatorSpec, workers: int, out_dir: str, gpus_per_worker: float = 0,
                 group_options: dict | None = None, *, max_queued: int | None = DEFAULT_MAX_QUEUED,
                 when_full: str = "reject", keep_vectors: int | None = None):
        check_queue_options(max_queued, when_full, keep_vectors)
        self.spec, self.out_dir = spec, os.path.abspath(out_dir)
        self.max_queued, self.when_full, self.keep_vectors = max_queued, when_full, keep_vectors
        self.rejected = self.superseded = 0
        self.group_options = dict(group_options or {}, gpus_per_worker=gpus_per_worker)
        self.group = WorkerGroup(spec, workers, **self.group_options)
        self.op = DistributedOperator(self.group)
        self._lock = threading.Lock()            # the worker group: one solve or scale at a time
        self._cv = threading.Condition()         # the request queue and finished results
        self._queue: collections.deque = collections.deque()
        self._results: dict[int, tuple[bool, Any]] = {}
        self._next_id = 0
        self.running, self.last_error = None, None
        self.history = History(self.out_dir, keep_vectors)
        self.vectors = self.history.latest_vectors()
        threading.Thread(target=self._serve_queue, daemon=True, name="hessdist-solver").start()

    # -- solves: a FIFO queue served by one thread, in the order requests arrived ----------------
    def enqueue(self, state: dict[str, np.ndarray], step: int, options: dict) -> int:
        """Queue a solve; returns its request id at once (collect it with ``wait``). With
        ``max_queued`` requests already waiting: refuse it (``QueueFull``), or drop the oldest
        queued ones (their ``wait`` raises ``Superseded``) and release their parameters."""
        with self._cv:
            full = self.max_queued is not None and len(self._queue) >= self.max_queued
            if full and self.when_full == "reject":
                self.rejected += 1
                del state                   # not kept alive by the traceback of the error below
                raise QueueFull(
                    f"the service's queue is full (steps {self._queued_steps()} wait behind the running solve; "
                    f"max_queued={self.max_queued}, when_full='reject'): step {step} was not queued. Collect "
                    "results before submitting more, or start the service with a larger max_queued (hessdist "
                    "serve --max-queued N; 0 = no limit, each queued step holds a copy of the parameters) or "
                    "with when_full='coalesce' (--when-full coalesce) to keep only the newest steps")
            while self.max_queued is not None and len(self._queue) >= self.max_queued:
                old_rid, _, old_step, _ = self._queue.popleft()     # its parameter copy goes with it
                self.superseded += 1
                self._results[old_rid] = (False, Superseded(
                    f"step {old_step} was superseded by step {step} before it ran: the service keeps the newest "
                    f"{self.max_queued} queued step(s) (when_full='coalesce') and released its parameters. "
                    "Submit it again if it must be solved, or start the service with a larger max_queued or "
                    "when_full='reject'", step=old_step, by=step))
            rid, self._next_id = self._next_id, self._next_id + 1
            self._queue.append((rid, state, step, options))
            self._cv.notify_all()
        return rid

    def _queued_steps(self) -> list:
        return [request[2] for request in list(self._queue)]

    @ray.method(concurrency_group="wait")
    def wait(self, rid: int) -> dict:
        """The result of request ``rid`` (blocks until it is done; raises what the solve raised)."""
        with self._cv:
            while rid not in self._results:
                self._cv.wait()
            ok, value = self._results.pop(rid)
        if not ok:
            raise value
        return value

    def _serve_queue(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                rid, state, step, options = self._queue.popleft()
                self.running = {"step": step, "since": time.time()}
            try:
                with self._lock:
                    outcome = (True, self._solve(state, step, **options))
            except Exception as exc:            # reported to the waiter and in status, never lost
                self.last_error = {"step": step, "error": f"{type(exc).__name__}: {exc}"}
                outcome = (False, exc)
            del state                           # the request's parameter copy, not held while idle
            with self._cv:
                self._results[rid] = outcome
                self.running = None
                self._cv.notify_all()

    def _solve(self, state: dict[str, np.ndarray], step: int, which: str = "LA,SA", k: int = 1,
               tol: float | None = None, rtol: Rtol = None, subset: float | str | None = None,
               compare_cold: bool = False, seed: int | None = None, **solver_options: Any) -> dict:
        which = parse_which(which)
        digest = parameters_digest(state)
        for done in self.history.entries:
            if done["step"] == step:
                if done.get("parameters_sha256") == digest:     # e.g. resubmitted after the service died
                    return {**done, "from_history": True}
                solved_at = "other parameters" if "parameters_sha256" in done else "parameters it did not record"
                raise InputError(f"step {step} is already in the history, solved at {solved_at}; "
                                 "submit each step once (a step submitted again with the same parameters "
                                 "returns its recorded answer)")
        t0, replaced = time.time(), len(self.group.replacements)
        self.op.set_parameters({key: torch.tensor(v) for key, v in state.items()})
        opts = dict(which=which, k=k, tol=tol, rtol=rtol, seed=draw_seed(seed), subset=subset, **solver_options)
        answer, solved = solve_step(self.op, self.vectors, **opts)
        res = answer.result
        entry = {"step": step, "parameters_sha256": digest, **solved, "workers": self.group.size,
                 "workers_replaced": len(self.group.replacements) - replaced}
        if compare_cold and self.vectors:
            cold = solve_step(self.op, None, return_vectors=False, **opts)[0].result
            entry.update(cold_hvps=cold.hvps, cold_fpe=cold.fpe, hvps_saved=cold.hvps - res.hvps,
                         fpe_saved=cold.fpe - res.fpe)
        entry.update(wall_seconds=time.time() - t0, products=self.op.describe())
        entry = json.loads(json.dumps(entry, default=plain))      # what the history holds, returned alike
        vectors = {w: p.vectors for w, p in res.pairs.items()}
        self.history.record(entry, vectors)
        self.vectors = vectors
        return entry

    # -- management ---------------------------------------------------------------------------
    def status(self) -> dict:
        latest = self.history.entries[-1] if self.history.entries else None
        files, size = self.history.vector_files()
        return {"workers": self.group.size, "gpus_per_worker": self.group.gpus, "pid": os.getpid(),
                "n_params": self.op.n, "n_samples": self.op.n_samples,
                "queued": self._queued_steps(), "max_queued": self.max_queued, "when_full": self.when_full,
                "rejected": self.rejected, "superseded": self.superseded,
                "running": self.running, "solves": len(self.history.entries), "last_error": self.last_error,
                "workers_replaced": len(self.group.replacements), "out_dir": self.out_dir,
                "out_dir_filesystem": filesystem(self.out_dir), "node": ray.util.get_node_ip_address(),
                "keep_vectors": self.keep_vectors, "vector_files": files, "vector_bytes": size,
                "worker_pids": [p["pid"] for p in self.group.placements],
                "devices": [f"{p['node']} gpus={p['gpus'] or 'none'}" for p in self.group.placements],
                "latest": None if latest is None else {key: latest[key] for key in (
                    "step", "largest", "smallest", "converged", "hvps", "fpe", "seconds") if key in latest}}

    def history_entries(self) -> list[dict]:
        return list(self.history.entries)

    def scale(self, workers: int) -> dict:
        """Replace the worker group by one of ``workers`` workers (data re-sharded), between solves."""
        with self._lock:
            self.group.shutdown()
            self.group = WorkerGroup(self.spec, workers, **self.group_options)
            self.op = DistributedOperator(self.group)
        return self.status()

    def shutdown(self) -> None:
        self.group.shutdown()


#: a service that dies (its node lost, its process killed) is restarted by Ray up to this many
#: times; it reloads history and eigenvectors from its out-dir and builds a new worker group
SERVICE_RESTARTS = 3
#: how long a call on the service waits for it to come back from a restart
RESTART_WAIT_S = 300
RemoteService = ray.remote(num_cpus=0, max_concurrency=8, max_restarts=SERVICE_RESTARTS,
                           concurrency_groups={"wait": 256})(EigenService)


def start(name: str, spec: OperatorSpec, workers: int, out_dir: str, gpus_per_worker: float = 0,
          group_options: dict | None = None, timeout_s: float = 300, *,
          max_queued: int | None = DEFAULT_MAX_QUEUED, when_full: str = "reject",
          keep_vectors: int | None = None) -> "ServiceHandle":
    """Create the named, detached service on the connected cluster and wait until its workers
    are up. Raises if a service of that name already runs.

    ``out_dir`` is made absolute here, at the client (``status()["out_dir"]``): the service
    writes it on whichever node it runs on, and after losing its node restarts elsewhere and
    reads it back, so on a cluster of several nodes it must be on storage every node sees.
    ``max_queued``: steps that may wait behind the running one (each holds a copy of the
    parameters; None: no limit); ``when_full``: ``"reject"`` (``submit`` raises
    :class:`QueueFull`) or ``"coalesce"`` (the oldest queued steps make way; their futures raise
    :class:`Superseded`). ``keep_vectors``: keep the vector files of the newest N solves (None:
    every step's); history.jsonl keeps every entry."""
    check_queue_options(max_queued, when_full, keep_vectors)
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    try:
        ray.get_actor(name, namespace=NAMESPACE)
        raise InputError(f"a hessdist service named {name!r} already runs; stop it first "
                         f"(hessdist stop --name {name}) or pick another --name")
    except ValueError:
        pass
    actor = RemoteService.options(name=name, namespace=NAMESPACE, lifetime="detached").remote(
        spec, workers, out_dir, gpus_per_worker, group_options, max_queued=max_queued, when_full=when_full,
        keep_vectors=keep_vectors)
    handle = ServiceHandle(name, actor)
    try:
        ray.get(actor.status.remote(), timeout=timeout_s)
    except ray.exceptions.RayActorError as exc:
        cause = exc.cause if hasattr(exc, "cause") and exc.cause else exc
        raise WorkerError(f"the service {name!r} failed to start: {cause}") from None
    return handle


def connect(name: str, address: str | None = "auto") -> "ServiceHandle":
    """A handle on the running service ``name``, from any driver on the cluster."""
    if not ray.is_initialized():
        from .workers import connect as connect_cluster
        connect_cluster(address)
    try:
        return ServiceHandle(name, ray.get_actor(name, namespace=NAMESPACE))
    except ValueError:
        raise InputError(f"no hessdist service named {name!r} on this cluster; start one with "
                         f"`hessdist serve --name {name} ...`") from None


def _local(exc: HessdistError) -> HessdistError:
    """The service's error raised afresh here (its type, message and fields; no Ray wrapper)."""
    err = type(exc)(str(exc))
    err.__dict__.update(vars(exc))
    return err


class ServiceHandle:
    """What a trainer holds: submit without waiting, collect results, read history and status."""

    def __init__(self, name: str, actor: Any):
        self.name, self.actor = name, actor

    def submit(self, state_dict: Mapping[str, torch.Tensor], step: int, **options: Any) -> "ray.ObjectRef":
        """Queue a solve at these parameters (copied now: the trainer may keep updating its
        model) and return a future at once. Solves run in the order they were submitted.
        Options: which, k, tol, rtol, max_hvps, max_fpe, budget_s, subset, compare_cold, seed,
        block, max_basis, confidence (as for :func:`hessdist.solvers.certify.solve`).

        bfloat16 (and float8) tensors are sent as float32, which holds their values exactly.
        Raises :class:`QueueFull` when the service's queue is full and it rejects; with
        ``when_full="coalesce"`` the future of a step pushed out by newer ones raises
        :class:`Superseded` from :meth:`result`. A step already in the history returns its
        recorded answer (``from_history``: True) if the parameters are the same — so a step is
        safely submitted again after the service died — and is refused if they differ."""
        unknown = set(options) - SOLVE_OPTIONS
        if unknown:
            raise InputError(f"unknown submit options {sorted(unknown)}; use {sorted(SOLVE_OPTIONS)}")
        Accuracy.of(options.get("tol"), options.get("rtol"), parse_which(options.get("which", "LA,SA")))
        state = {k: host_array(k, v) for k, v in state_dict.items()}
        rid = self._ask("enqueue", ray.put(state), step, options)
        return self.actor.wait.remote(rid)

    def result(self, future: "ray.ObjectRef", timeout_s: float | None = None) -> dict:
        try:
            return ray.get(future, timeout=timeout_s)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, HessdistError):
                raise _local(cause) from None
            raise
        except ray.exceptions.RayActorError as exc:
            raise WorkerError(f"the service {self.name!r} died while this request was queued or running "
                              f"({type(exc).__name__}); it restarts by itself (up to {SERVICE_RESTARTS} times) and "
                              "reloads its history from its out-dir: submit this step again") from None

    def history(self) -> list[dict]:
        return self._ask("history_entries")

    def status(self, timeout_s: float | None = 60) -> dict:
        return self._ask("status", timeout_s=timeout_s)

    def scale(self, workers: int) -> dict:
        return self._ask("scale", workers)

    def _ask(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        """A call on the service that waits out a restart (the service comes back by itself when
        its process or node is lost), for at most RESTART_WAIT_S seconds."""
        deadline = time.monotonic() + RESTART_WAIT_S
        while True:
            try:
                return ray.get(getattr(self.actor, method).remote(*args), timeout=timeout_s)
            except ray.exceptions.RayActorError as exc:
                # a call that met the old process of a restarting service (ActorDiedError) or
                # one sent while it restarts (ActorUnavailableError): wait for the new one
                if not self._registered():
                    raise WorkerError(f"the service {self.name!r} is gone: it was stopped or used up its "
                                      f"{SERVICE_RESTARTS} restarts ({exc.__class__.__name__}). Start it again with "
                                      "`hessdist serve` (the same --out-dir keeps its history)") from None
                if time.monotonic() > deadline:
                    raise WorkerError(f"the service {self.name!r} has been restarting for over {RESTART_WAIT_S} s; "
                                      "check `ray status` and the service's log") from None
                time.sleep(0.5)
            except ray.exceptions.RayTaskError as exc:      # the service refused the call (QueueFull, ...)
                cause = getattr(exc, "cause", None)
                if isinstance(cause, HessdistError):
                    raise _local(cause) from None
                raise

    def _registered(self) -> bool:
        """Whether Ray still holds the service's name: it does while the service restarts, and
        drops it once the service is stopped or out of restarts."""
        try:
            ray.get_actor(self.name, namespace=NAMESPACE)
            return True
        except ValueError:
            return False

    def stop(self, timeout_s: float = 60) -> None:
        """Stop the workers and remove the service; returns once Ray has dropped its name (a kill
        takes effect later: until then the old process could still answer, and the name could
        not be served again)."""
        try:
            ray.get(self.actor.shutdown.remote(), timeout=timeout_s)
        finally:
            ray.kill(self.actor)
            deadline = time.monotonic() + timeout_s
            while self._registered():
                if time.monotonic() > deadline:
                    raise WorkerError(f"the service {self.name!r} was killed but Ray still holds its name after "
                                      f"{timeout_s:.0f} s; check `ray status`")
                time.sleep(0.05)
