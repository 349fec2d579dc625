"""What the Lightning and Hugging Face callbacks share: when to solve, where (an eigen-service or a
background thread), collecting finished solves without blocking training, and the flat metrics.

A framework callback subclasses :class:`SpectrumMonitor` and its framework's callback class,
calls :meth:`SpectrumMonitor.after_epoch` / :meth:`~SpectrumMonitor.after_step` /
:meth:`~SpectrumMonitor.finish` from its hooks and implements :meth:`~SpectrumMonitor._emit`
(how one finished solve reaches the framework's loggers). The monitor also works on its own in a
plain training loop::

    monitor = SpectrumMonitor("cross_entropy", (x, y))
    for epoch in range(epochs):
        train_one_epoch(model)
        monitor.after_epoch(model, epochs_done=epoch + 1, step=epoch)   # returns at once
    solves = monitor.finish()                                          # waits for the rest

Everything a monitor logs happens on the thread that calls it (the training thread): loggers are
not thread-safe, so the background solver thread only computes.
"""
from __future__ import annotations

import concurrent.futures
import importlib
import inspect
import math
import time
import warnings
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..errors import HessdistError, InputError, Superseded
from ..solvers.ritz import Accuracy, parse_which
from .background import Pending, SolverThread, snapshot
from .solves import DEFAULT_RTOL, DEFAULT_WHICH, HessianSolveWarning, Solve, solve_metrics


def _solve_options(service: bool) -> set[str]:
    """The ``solve_options`` a monitor may pass: the service's submit options, or those of the
    in-process default path (:func:`~hessdist.solvers.certify.solve` and the Lanczos it runs)."""
    from ..service import SOLVE_OPTIONS
    from ..solvers.lanczos import lanczos
    if service:
        return SOLVE_OPTIONS - {"which", "k", "tol", "rtol", "seed"}
    own = {"op", "which", "k", "tol", "rtol", "seed", "v0", "return_vectors", "callback"}
    return ({*inspect.signature(lanczos).parameters} - own) | {"subset"}


def require(module: str, extra: str, framework: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that names the extra which installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"hessdist.integrations.{extra} needs {framework} ({exc}); install it with "
                          f"pip install 'hessdist[{extra}]'") from exc


def monitor_defaults(device: torch.device) -> dict[str, Any]:
    """Operator options an in-process monitor adds unless given: on a GPU it shares with the
    training, data streamed from the host (not half the free memory held resident) and a basis
    of a tenth of the free memory (not half)."""
    return {"placement": "stream", "basis_share": 0.1} if device.type == "cuda" else {}


class SpectrumMonitor:
    """Extreme Hessian eigenvalues of a training model every ``every_n_epochs`` epochs (and/or
    every ``every_n_steps`` optimizer steps), without blocking training.

    Where: with ``service`` (a running eigen-service's name, or a handle from
    :func:`hessdist.connect`), the state dict is submitted to it (its own model factory, loss and
    data, see ``hessdist serve``; the state dict must fit its model). Without, the solve runs in
    this process on a background thread, on ``data`` with ``loss`` (as for
    :class:`~hessdist.curvature.CurvatureOperator`); ``operator_options`` go to that operator
    unchanged (default ``dtype``: float64 for a float64 model, else float32; default ``device``:
    the model's; on a GPU, data streamed from the host and a basis of at most a tenth of the free
    memory, so the training keeps its memory: :func:`monitor_defaults`), except ``tf32``, which
    is refused: PyTorch's TF32 switch is process-wide, so it would reach the training too (a
    service's workers are processes of their own). The operator is built, copying the model, at
    the first solve, on the calling
    thread; later solves load a copy of the state dict taken when they were requested. Each
    in-process solve is warm-started from the previous one's eigenvectors (as the service does).

    What: ``which``/``k``/``tol``/``rtol``/``seed`` and ``solve_options`` (``max_hvps``,
    ``max_fpe``, ``budget_s``, ``subset``, ... of :func:`hessdist.solvers.certify.solve`).
    ``module`` names a submodule (``"net"``, ``"model.encoder"``) to analyse instead of the whole
    model handed to the hooks — e.g. a LightningModule's network, whose state-dict keys then
    match a service built from that network's factory.

    Results are collected at later hooks (at most every ``poll_interval_s`` seconds from the
    per-step hooks; every epoch end) and at the end of training, which waits up to
    ``wait_timeout_s`` for solves still running, and are passed to :meth:`_emit` with the step
    and epoch they belong to; the successful ones are also kept in :attr:`results` (in step
    order). A failed solve is reported with a :class:`HessianSolveWarning` naming its step and
    cause when it is collected and kept in :attr:`errors`; training goes on. ``raise_on_error=True`` raises a
    :class:`~hessdist.errors.HessdistError` at the end of training when any failed. The default is
    False: a diagnostic should not take from a finished run the steps that follow ``fit``/``train``
    (saving the model, say), and each failure was already warned about when it happened."""

    def __init__(self, loss: Union[str, Callable, None] = None, data: Any = None, *,
                 service: Union[str, Any, None] = None, address: str | None = "auto",
                 every_n_epochs: int | None = 1, every_n_steps: int | None = None,
                 which: Union[str, Sequence[str]] = DEFAULT_WHICH, k: int = 1,
                 tol: float | None = None, rtol: Union[float, Mapping[str, float], None] = DEFAULT_RTOL,
                 seed: int | None = None, solve_options: Mapping[str, Any] | None = None,
                 operator_options: Mapping[str, Any] | None = None, module: str | None = None,
                 prefix: str = "hessian", poll_interval_s: float = 1.0, wait_timeout_s: float | None = 600.0,
                 raise_on_error: bool = False):
        for name, n in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if n is not None and (not isinstance(n, int) or n < 1):
                raise InputError(f"{name} must be a positive integer or None, got {n!r}")
        if every_n_epochs is None and every_n_steps is None:
            raise InputError("give every_n_epochs or every_n_steps (or both): otherwise nothing is ever solved")
        if service is None and (loss is None or data is None):
            raise InputError("an in-process solve needs loss= and data= (e.g. 'cross_entropy', (x, y)); "
                             "or name a running eigen-service with service=")
        if service is not None and (loss is not None or data is not None or operator_options):
            raise InputError("an eigen-service builds its own operator (model, loss, data: hessdist serve); "
                             "drop loss=, data= and operator_options= when service= is given")
        if (operator_options or {}).get("tf32"):
            raise InputError("tf32 flips PyTorch's process-wide TF32 switch for each product, so in this process "
                             "it would change the training's own matmuls while a solve runs; use an eigen-service "
                             "(hessdist serve --tf32: its workers are processes of their own) or drop tf32")
        clash = {"which", "k", "tol", "rtol", "seed", "previous"} & set(solve_options or {})
        if clash:
            raise InputError(f"solve_options {sorted(clash)} are arguments of their own: pass them directly "
                             "(previous: each solve is warm-started from the previous one by itself)")
        allowed = _solve_options(service is not None)
        unknown = set(solve_options or {}) - allowed
        if unknown:
            where = "an eigen-service" if service is not None else "an in-process solve"
            raise InputError(f"unknown solve_options {sorted(unknown)} for {where}; use {sorted(allowed)}")
        ends = parse_which(which)
        if rtol is DEFAULT_RTOL:            # the default names both ends; keep those asked for
            rtol = {w: v for w, v in DEFAULT_RTOL.items() if w in ends} or None
        Accuracy.of(tol, rtol, ends)        # bad accuracy options fail here, not epochs later
        self.loss, self.data = loss, data
        self.service, self.address = service, address
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.which, self.k, self.tol, self.rtol, self.seed = ",".join(ends), k, tol, rtol, seed
        self.solve_options = dict(solve_options or {})
        self.operator_options = dict(operator_options or {})
        self.module, self.prefix = module, prefix
        self.poll_interval_s, self.wait_timeout_s, self.raise_on_error = poll_interval_s, wait_timeout_s, raise_on_error
        #: the solves that finished successfully, in step order
        self.results: list[Solve] = []
        #: the failed solves, in the order they were collected
        self.errors: list[Solve] = []
        #: steps an eigen-service started with ``when_full="coalesce"`` dropped for newer ones
        self.superseded: list[int] = []
        self._pending: list[Pending] = []
        self._handle: Any = None
        self._op: Any = None
        self._thread: SolverThread | None = None
        self._previous: dict[str, np.ndarray] | None = None
        self._last_step: int | None = None
        self._last_poll = -math.inf
        self._raised = 0

    # -- when ---------------------------------------------------------------------------------
    def due_after_epoch(self, epochs_done: int) -> bool:
        """Whether a solve is due once ``epochs_done`` epochs have been completed."""
        return self.every_n_epochs is not None and epochs_done > 0 and epochs_done % self.every_n_epochs == 0

    def due_after_step(self, step: int) -> bool:
        """Whether a solve is due after optimizer step ``step`` (the global step count)."""
        return self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0

    # -- the hooks' entry points ----------------------------------------------------------------
    def after_epoch(self, model: nn.Module, *, epochs_done: int, step: int, epoch: float | None = None) -> None:
        """At the end of an epoch: request a solve if one is due, then collect finished ones."""
        if self.due_after_epoch(epochs_done):
            self.request(model, step=step, epoch=epochs_done if epoch is None else epoch)
        self.poll()

    def after_step(self, model: nn.Module, *, step: int, epoch: float | None = None) -> None:
        """After an optimizer step: request a solve if one is due; collect finished ones at most
        every ``poll_interval_s`` seconds (this runs every step)."""
        if self.due_after_step(step):
            self.request(model, step=step, epoch=epoch)
        if time.monotonic() - self._last_poll >= self.poll_interval_s:
            self.poll()

    def request(self, model: nn.Module, *, step: int, epoch: float | None = None) -> None:
        """Request a solve at the model's current parameters; returns at once. A second request
        for the same step (an epoch end that is also a due step) is ignored. A failure to submit
        (a bad option, the service gone, the operator refusing model or data) is reported like a
        failed solve."""
        if step == self._last_step:
            return
        self._last_step = step
        target = self.target(model)
        try:
            if self.service is not None:
                future = self._connect().submit(target.state_dict(), step=step, **self._solve_kwargs())
            else:
                future = self._submit_local(target, step)
        except Exception as exc:
            self._collected(Solve(step, epoch, error=exc))
            return
        self._pending.append(Pending(step, epoch, future))

    def target(self, model: nn.Module) -> nn.Module:
        """The module analysed: ``model``, or its submodule ``module`` (the framework callbacks
        call this when training starts, so a misspelt name fails then, not an epoch later)."""
        if not self.module:
            return model
        try:
            return model.get_submodule(self.module)
        except AttributeError:
            names = [n for n, _ in model.named_children()]
            raise InputError(f"the model has no submodule {self.module!r} (module=); its children are "
                             f"{names}") from None

    def poll(self, timeout_s: float | None = 0.0) -> list[Solve]:
        """Collect the solves that have finished (waiting at most ``timeout_s`` for all pending
        ones), pass each to :meth:`_emit` in request order and return them."""
        self._last_poll = time.monotonic()
        if not self._pending:
            return []
        done = self._finished(timeout_s)
        ready = [p for p in self._pending if id(p.future) in done]
        self._pending = [p for p in self._pending if id(p.future) not in done]
        collected = [self._collected(self._outcome(p)) for p in ready]
        return [s for s in collected if s is not None]

    def finish(self, timeout_s: float | None = None) -> list[Solve]:
        """At the end of training: wait for the pending solves (at most ``timeout_s`` seconds,
        default ``wait_timeout_s``, where None waits as long as they take), emit them, warn about
        any still running (in-process ones not yet started are cancelled), and raise if
        ``raise_on_error`` and a solve failed. Returns the solves collected."""
        timeout_s = self.wait_timeout_s if timeout_s is None else timeout_s
        deadline = math.inf if timeout_s is None else time.monotonic() + timeout_s
        got: list[Solve] = []
        while self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            got += self.poll(None if math.isinf(left) else left)
        if self._pending:
            where = ("they stay queued in the service and land in its history" if self.service is not None
                     else "their results are dropped")
            warnings.warn(HessianSolveWarning(
                f"hessdist: {len(self._pending)} Hessian solve(s) (steps {[p.step for p in self._pending]}) still "
                f"running {timeout_s} s after training ended; {where}. Raise wait_timeout_s to wait for them"),
                stacklevel=2)
            for p in self._pending:
                if isinstance(p.future, concurrent.futures.Future):
                    p.future.cancel()       # only those not started yet
            self._pending = []
            self._op = None                 # still in use by a running solve: a later fit builds its own
        if self._thread is not None:
            self._thread.close()            # exits after any job still running
            self._thread = None
        new_errors, self._raised = self.errors[self._raised:], len(self.errors)
        if self.raise_on_error and new_errors:
            first = new_errors[0]
            raise HessdistError(f"{len(new_errors)} Hessian solve(s) failed, the first at step {first.step}: "
                                f"{type(first.error).__name__}: {first.error}") from first.error
        return got

    @property
    def pending(self) -> list[tuple[int, float | None]]:
        """(step, epoch) of the solves requested and not yet collected."""
        return [(p.step, p.epoch) for p in self._pending]

    def metrics(self, solve: Solve) -> dict[str, float]:
        """The flat metrics of a finished solve (see :func:`solve_metrics`)."""
        return solve_metrics(solve, self.prefix)

    def _emit(self, solve: Solve) -> None:
        """Hand a successfully finished solve to the framework's loggers (the framework callbacks
        override this; called on the training thread)."""

    # -- internals ------------------------------------------------------------------------------
    def _solve_kwargs(self) -> dict[str, Any]:
        return dict(which=self.which, k=self.k, tol=self.tol, rtol=self.rtol, seed=self.seed, **self.solve_options)

    def _connect(self) -> Any:
        if self._handle is None:
            if isinstance(self.service, str):
                from ..service import connect
                self._handle = connect(self.service, self.address)
            else:
                self._handle = self.service
        return self._handle

    def _operator_kwargs(self, model: nn.Module) -> dict[str, Any]:
        opts = dict(self.operator_options)
        first = next((p for p in model.parameters() if p.is_floating_point()), None)
        if first is not None:
            opts.setdefault("dtype", torch.float64 if first.dtype == torch.float64 else torch.float32)
            opts.setdefault("device", first.device)
        return {**monitor_defaults(torch.device(opts.get("device", "cpu"))), **opts}

    def _submit_local(self, model: nn.Module, step: int) -> concurrent.futures.Future:
        if self._op is None:            # copies the model: this solve's parameters are today's
            from ..curvature import CurvatureOperator
            self._op = CurvatureOperator(model, self.loss, self.data, **self._operator_kwargs(model))
            state = None
        else:
            state = snapshot(model)
        if self._thread is None:
            self._thread = SolverThread()
        return self._thread.submit(self._solve_local, self._op, state, step)

    def _solve_local(self, op: Any, state: dict[str, torch.Tensor] | None, step: int) -> dict:
        """On the solver thread: the service's solve (same defaults, same entry keys), in process."""
        from ..solvers.certify import solve_step
        if state is not None:
            op.set_parameters(state)
        t0 = time.time()
        answer, entry = solve_step(op, self._previous, **self._solve_kwargs())
        vectors = {w: p.vectors for w, p in answer.result.pairs.items()}
        if all(v is not None for v in vectors.values()):
            self._previous = vectors
        return {"step": step, **entry, "wall_seconds": time.time() - t0}

    def _finished(self, timeout_s: float | None) -> set[int]:
        """ids of the pending futures that are done, waiting at most ``timeout_s`` for all."""
        futures = [p.future for p in self._pending]
        if isinstance(futures[0], concurrent.futures.Future):
            done, _ = concurrent.futures.wait(futures, timeout=timeout_s)
            return {id(f) for f in done}
        import ray
        ready, _ = ray.wait(futures, num_returns=len(futures), timeout=timeout_s, fetch_local=True)
        ready_ids = {r.hex() for r in ready}
        return {id(f) for f in futures if f.hex() in ready_ids}

    def _outcome(self, p: Pending) -> Solve:
        try:
            if isinstance(p.future, concurrent.futures.Future):
                entry = p.future.result()
            else:
                entry = self._connect().result(p.future)
        except Exception as exc:
            return Solve(p.step, p.epoch, error=exc)
        return Solve(p.step, p.epoch, entry=entry)

    def _collected(self, solve: Solve) -> Solve | None:
        """Emit and keep a finished solve, warn about a failed one; a superseded step is listed
        in :attr:`superseded` (the service dropped it, as asked) and returns None."""
        if isinstance(solve.error, Superseded):
            self.superseded.append(solve.step)
            return None
        if solve.ok:
            self.results.append(solve)
            self.results.sort(key=lambda s: s.step)
            self._emit(solve)
        else:
            self.errors.append(solve)
            warnings.warn(HessianSolveWarning(
                f"hessdist: the Hessian solve for step {solve.step} (epoch {solve.epoch}) failed: "
                f"{type(solve.error).__name__}: {solve.error}; training goes on"), stacklevel=3)
        return solve
