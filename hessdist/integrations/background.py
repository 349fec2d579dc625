"""The in-process side of a monitor: one background thread that runs solves in order, the
solves still pending, and the host snapshot of a model's state that a later solve loads."""
from __future__ import annotations

import concurrent.futures
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


class SolverThread:
    """One daemon thread running queued jobs in order (a warm start needs the previous result).
    Daemon: a solve still running when the interpreter exits does not hold the exit up."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="hessdist-callback-solver", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((future, fn, args))
        return future

    def close(self) -> None:
        """Stop after the jobs already queued."""
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:     # handed to the training thread, which warns or raises
                future.set_exception(exc)


@dataclass
class Pending:
    step: int
    epoch: float | None
    future: Any                 # a concurrent.futures.Future (in-process) or a ray.ObjectRef (service)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A host copy of the full state (parameters and buffers), taken now: training goes on."""
    with torch.no_grad():
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
