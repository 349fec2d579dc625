"""Loss functions by name. Pairs contract: ``loss(outputs, targets)`` is the MEAN over the
batch's samples; hessdist multiplies by the batch size so the full-dataset mean weights every
sample equally, however the data are batched or sharded. Any-batch contract (see
:mod:`hessdist.objective`): ``batch_loss(model, batch)`` and the sample count it averages over."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import torch
import torch.nn.functional as F

from .errors import InputError
from .imports import resolve

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error; integer class targets are one-hot encoded to the output width."""
    if not targets.is_floating_point():
        targets = F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
    # written out rather than F.mse_loss, whose forward-over-reverse derivative hits a
    # "ZeroTensors are immutable" error in torch.func
    return ((outputs - targets.reshape(outputs.shape)) ** 2).mean()


LOSSES: dict[str, LossFn] = {"cross_entropy": F.cross_entropy, "mse": mse}


def named(spec: Any, names: Mapping[str, Any], what: str) -> Any:
    """``spec`` itself when callable (or None), else the entry of ``names`` it names, else the
    object its import path ``pkg.mod:fn`` names."""
    if callable(spec) or spec is None:
        return spec
    if spec in names:
        return names[spec]
    if isinstance(spec, str) and ":" in spec:
        return resolve(spec)
    raise InputError(f"unknown {what} {spec!r}; use one of {sorted(names)}, an import path 'pkg.mod:fn' or a callable")


def get_loss(spec: Union[str, LossFn]) -> LossFn:
    """A loss by name (``cross_entropy``, ``mse``), import path (``pkg.mod:fn``) or callable."""
    return named(spec, LOSSES, "loss")


def model_loss(model: Callable[..., Any], batch: Mapping[str, Any]) -> torch.Tensor:
    """The loss the model computes itself from a dict batch: ``model(**batch).loss`` (Hugging
    Face models given ``labels``; the mean over the tokens they predict)."""
    if not isinstance(batch, Mapping):
        raise InputError(f"model_loss calls model(**batch) and needs dict batches, got {type(batch).__name__}")
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise InputError("model(**batch) returned no loss; give the batch its 'labels' (or write a batch_loss "
                         "that computes the mean loss from the outputs)")
    return loss


def causal_lm(model: Callable[..., Any], batch: Mapping[str, Any]) -> torch.Tensor:
    """Next-token cross-entropy of a causal language model, in the logits' own precision (a
    Hugging Face model's own loss casts logits to float32, which limits a float64 Hessian to
    float32 accuracy): the mean over the predicted tokens (``labels[..., 1:]`` other than -100);
    every other key of the batch is passed to the model."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"})
    logits = logits["logits"] if isinstance(logits, Mapping) else getattr(logits, "logits", logits)
    targets = batch["labels"][..., 1:]
    return F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def predicted_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """A causal language model's samples: the tokens whose next token it predicts and scores,
    i.e. ``labels[..., 1:]`` that are not the ignore index -100 (what its mean loss averages over)."""
    return int((batch["labels"][..., 1:] != -100).sum())


BATCH_LOSSES: dict[str, Callable[[Any, Any], torch.Tensor]] = {"model_loss": model_loss, "causal_lm": causal_lm}
BATCH_SAMPLES: dict[str, Callable[[Any], int] | None] = {"rows": None, "predicted_tokens": predicted_tokens}
