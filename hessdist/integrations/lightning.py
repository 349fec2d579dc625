"""PyTorch Lightning: λ_max, λ_min (with certified intervals), products and FPE of the full-data
Hessian every N epochs, logged through the trainer's loggers without blocking training.

    from hessdist.integrations.lightning import HessianCallback
    cb = HessianCallback("cross_entropy", (x, y), module="net")      # in-process, background thread
    cb = HessianCallback(service="digits")                           # or: an eigen-service
    Trainer(callbacks=[cb], logger=CSVLogger("logs")).fit(module, loader)

Each result is logged with ``logger.log_metrics(metrics, step=<the global step it was requested
at>)`` on every logger in ``trainer.loggers`` once it arrives (at a later batch or epoch end, or
at the end of training); the metrics also carry ``hessian/step`` and ``hessian/epoch`` (the
epochs completed, fractional for a solve requested mid-epoch — as the Hugging Face callback
counts). Only global rank 0 requests solves.
"""
from __future__ import annotations

import math
from typing import Any

from .monitor import SpectrumMonitor, require
from .solves import Solve

require("lightning.pytorch", "lightning", "PyTorch Lightning")
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402


class HessianCallback(SpectrumMonitor, Callback):
    """A Lightning ``Callback`` that requests a Hessian solve after every ``every_n_epochs``-th
    training epoch (and/or every ``every_n_steps`` optimizer steps) and logs each result when it
    arrives. Arguments: see :class:`~hessdist.integrations.monitor.SpectrumMonitor` — in short
    ``HessianCallback(loss, data, ...)`` solves in a background thread of this process, on the
    LightningModule (or its submodule ``module=``); ``HessianCallback(service=name)`` submits to
    a running eigen-service. Results: ``cb.results`` (and ``cb.errors``)."""

    _trainer: "pl.Trainer | None" = None

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.target(pl_module)                   # a misspelt module= fails now, not an epoch later
        self._trainer = trainer

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.is_global_zero:              # epoch: epochs done, fractional (as Hugging Face counts)
            per_epoch = trainer.num_training_batches
            done = (batch_idx + 1) / per_epoch if math.isfinite(per_epoch) and per_epoch > 0 else 0.0
            self.after_step(pl_module, step=trainer.global_step, epoch=trainer.current_epoch + done)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.is_global_zero:
            self.after_epoch(pl_module, epochs_done=trainer.current_epoch + 1, step=trainer.global_step)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.is_global_zero:
            try:
                self.finish()
            finally:
                for logger in trainer.loggers:          # results logged now reach disk before teardown
                    logger.save()

    def _emit(self, solve: Solve) -> None:
        if self._trainer is None:
            return
        metrics = self.metrics(solve)
        for logger in self._trainer.loggers:
            logger.log_metrics(metrics, step=solve.step)
