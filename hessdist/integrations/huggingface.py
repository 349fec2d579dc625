"""Hugging Face ``transformers.Trainer``: λ_max, λ_min (with certified intervals), products and
FPE of the full-data Hessian every N epochs or steps, logged through ``trainer.log`` (so they land
in ``trainer.state.log_history`` and every ``report_to`` integration) without blocking training.

    from hessdist.integrations.huggingface import HessianCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    HessianCallback(loss, (x, y)).attach(trainer)       # in-process, background thread
    HessianCallback(service="digits").attach(trainer)   # or: an eigen-service
    trainer.train()

A ``TrainerCallback``'s hooks are not given the trainer, and logging through it is what reaches
the reporting integrations, so the callback must be bound to its trainer: ``cb.attach(trainer)``
adds it and binds it; with ``Trainer(callbacks=[cb])``, call ``cb.bind(trainer)`` before
``train()``. An unbound callback refuses to start training.

``trainer.log`` stamps an entry with the trainer's *current* ``epoch`` and ``step``; a result
arrives later than the step it belongs to, so the entry also carries ``hessian/step`` and
``hessian/epoch`` (``state.epoch`` when it was requested: completed epochs at an epoch end).
Only the world's process zero requests solves.
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..errors import InputError
from .monitor import SpectrumMonitor, require
from .solves import Solve

require("transformers", "huggingface", "Hugging Face transformers")
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments  # noqa: E402


class HessianCallback(SpectrumMonitor, TrainerCallback):
    """A ``TrainerCallback`` that requests a Hessian solve after every ``every_n_epochs``-th epoch
    (``on_epoch_end``) and/or every ``every_n_steps`` optimizer steps (``on_step_end``) and logs
    each result through ``trainer.log`` when it arrives. Arguments: see
    :class:`~hessdist.integrations.monitor.SpectrumMonitor` — ``HessianCallback(loss, data, ...)``
    solves in a background thread of this process (a model whose forward returns a dict or
    ``ModelOutput`` needs a ``loss`` that picks its logits, e.g.
    ``lambda out, y: F.cross_entropy(out["logits"], y)``); ``HessianCallback(service=name)``
    submits to a running eigen-service. Results: ``cb.results`` (and ``cb.errors``)."""

    _trainer: Any = None

    def bind(self, trainer: Any) -> "HessianCallback":
        """Log through ``trainer`` (the one this callback was given to)."""
        self._trainer = trainer
        return self

    def attach(self, trainer: Any) -> "HessianCallback":
        """Add this callback to ``trainer`` and bind it to it."""
        trainer.add_callback(self)
        return self.bind(trainer)

    def _model(self, kwargs: dict) -> nn.Module:
        return self._trainer.model if self._trainer is not None else kwargs["model"]

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if self._trainer is None:
            raise InputError("HessianCallback is not bound to its Trainer, so it cannot log: add it with "
                             "HessianCallback(...).attach(trainer), or call cb.bind(trainer) before train()")
        self.target(self._model(kwargs))         # a misspelt module= fails now, not an epoch later

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.after_step(self._model(kwargs), step=state.global_step, epoch=state.epoch)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        epoch = state.epoch or 0.0
        whole = round(epoch) if math.isclose(epoch, round(epoch), abs_tol=1e-6) else 0   # max_steps mid-epoch: no
        self.after_epoch(self._model(kwargs), epochs_done=whole, step=state.global_step, epoch=epoch)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.finish()

    def _emit(self, solve: Solve) -> None:
        if self._trainer is not None:
            self._trainer.log(self.metrics(solve))
