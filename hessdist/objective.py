"""How one batch enters the full-data loss: f(θ) = Σ_b samples(b)·loss_b(θ) / Σ_b samples(b).

Weighting each batch's MEAN loss by its sample count makes f the mean over every sample, however
the data are batched, micro-batched or sharded. Two contracts:

* **pairs** (a loss name or ``loss(outputs, targets)``): batches are ``(inputs, targets)``; the
  model is called as ``model(inputs)``, ``model(*inputs)`` for a tuple or ``model(**inputs)``
  for a dict (keyword models); a sample is a row of ``targets``. The GGN needs this split of
  outputs and loss.
* **any batch** (:class:`BatchLoss`): ``batch_loss(model, batch)`` returns the mean loss over
  the batch's samples for a batch of any shape (e.g. a dict of ``input_ids``,
  ``attention_mask``, ``labels``), and ``samples(batch)`` says how many samples that mean is
  over (default: the rows). For a token-level loss a sample is a token the loss averages over
  (``"predicted_tokens"`` for a causal language model), so f is the mean over every predicted
  token of the data set, as a language model's training loss is. Hessian only.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

import torch
from torch import nn
from torch.func import functional_call, vmap

from .data import rows
from .losses import BATCH_LOSSES, BATCH_SAMPLES, LossFn, get_loss, named

Call = Callable[..., Any]
#: what a sample is for a named loss when ``samples`` is not given (else: a row)
DEFAULT_SAMPLES = {"causal_lm": "predicted_tokens"}


def call_with(inputs: Any, call: Call) -> Any:
    """``call`` on a batch's inputs: positional for a tuple/list, keywords for a dict."""
    if isinstance(inputs, Mapping):
        return call(**inputs)
    if isinstance(inputs, (tuple, list)):
        return call(*inputs)
    return call(inputs)


class BoundModel:
    """The model at parameters ``state`` (functional: differentiable in them), callable like the
    module; other attributes (``config``, ...) are the module's."""

    def __init__(self, module: nn.Module, state: Mapping[str, torch.Tensor]):
        self._module, self._state = module, state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self._module, self._state, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


@dataclass(frozen=True)
class PairLoss:
    """The pairs contract: ``loss(model(inputs), targets)`` is the batch mean over rows of targets."""

    loss: LossFn
    pairs = True

    def outputs(self, model: Call, batch: Any) -> torch.Tensor:
        return call_with(batch[0], model)

    def output_loss_sum(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return self.loss(outputs, batch[1]) * len(batch[1])

    def loss_sum(self, model: Call, batch: Any) -> torch.Tensor:
        return self.output_loss_sum(self.outputs(model, batch), batch)

    def sample_losses(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """(rows,): each row's loss alone, ``loss(outputs[i:i+1], targets[i:i+1])`` — the per-sample
        terms whose gradients make the empirical Fisher (their mean is the batch loss only for a
        loss that is a mean over rows: checked on the first batch)."""
        return vmap(lambda o, t: self.loss(o.unsqueeze(0), t.unsqueeze(0)))(outputs, batch[1])

    def count(self, batch: Any) -> int:
        return len(batch[1])

    def check(self, batch: Any) -> None:
        """Nothing to check: a sample is a row of targets."""


@dataclass(frozen=True)
class BatchLoss:
    """The any-batch contract: ``loss(model, batch)`` → the MEAN loss over the batch's samples;
    ``samples(batch)`` → how many (default: the predicted tokens for ``"causal_lm"``, else
    rows). Each a callable, an import path ``"pkg.mod:fn"`` or a name (``loss``:
    ``"model_loss"``, ``"causal_lm"``; ``samples``: ``"rows"``, ``"predicted_tokens"``); names
    and paths keep it picklable for Ray workers."""

    loss: Union[str, Callable[[Any, Any], torch.Tensor]] = "model_loss"
    samples: Union[str, Callable[[Any], int], None] = None
    pairs = False

    def __post_init__(self) -> None:
        self._functions                     # unknown names fail here, not inside a data pass

    @functools.cached_property
    def _functions(self) -> tuple[Callable, Callable | None]:
        samples = self.samples
        if samples is None and isinstance(self.loss, str):
            samples = DEFAULT_SAMPLES.get(self.loss)
        return named(self.loss, BATCH_LOSSES, "batch loss"), named(samples, BATCH_SAMPLES, "sample count")

    def loss_sum(self, model: Call, batch: Any) -> torch.Tensor:
        return self._functions[0](model, batch) * self.count(batch)

    def count(self, batch: Any) -> int:
        counter = self._functions[1]
        return rows(batch) if counter is None else int(counter(batch))

    def check(self, batch: Any) -> None:
        """Warn when rows are counted for a loss that averages over tokens: the operator would
        then depend on how the data are batched (padded batches weigh their tokens differently)."""
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if self.samples is None and self.loss == "model_loss" and getattr(labels, "ndim", 0) >= 2:
            warnings.warn("BatchLoss('model_loss') on token-level labels counts rows as samples, but the model's "
                          "loss is a mean over tokens: pass samples='predicted_tokens' (CLI --batch-samples "
                          "predicted_tokens) for the token mean of the whole data set", UserWarning, stacklevel=3)


Objective = Union[PairLoss, BatchLoss]


def objective_of(loss: Union[str, LossFn, BatchLoss]) -> Objective:
    """The contract a ``loss`` argument names: a :class:`BatchLoss`, or a pairs loss."""
    return loss if isinstance(loss, BatchLoss) else PairLoss(get_loss(loss))
