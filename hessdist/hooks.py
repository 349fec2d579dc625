"""A minimal hook for plain PyTorch training loops: submit after every epoch, collect later.

    hook = SpectrumHook(hessdist.connect("resnet"), which="LA,SA", tol=1e-4)
    for epoch in range(epochs):
        train_one_epoch(model)
        hook.after_epoch(model, epoch)      # returns at once
    results = hook.results()                # in epoch order
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .errors import Superseded


class SpectrumHook:
    """Submits ``model.state_dict()`` to an eigen-service after each epoch without waiting."""

    def __init__(self, service: Any, **options: Any):
        self.service, self.options = service, options
        self.futures: list[tuple[int, Any]] = []
        self.superseded: list[int] = []

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        self.futures.append((epoch, self.service.submit(model.state_dict(), step=epoch, **self.options)))

    def results(self, timeout_s: float | None = None) -> list[dict]:
        """Every submitted solve's result, in submission order (waits for those still running);
        steps a service started with ``when_full="coalesce"`` dropped for newer ones are left
        out and listed in ``superseded``."""
        out, self.superseded = [], []
        for step, future in self.futures:
            try:
                out.append(self.service.result(future, timeout_s))
            except Superseded:
                self.superseded.append(step)
        return out
