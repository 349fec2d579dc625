"""The flat parameter vector: which parameters, in which order, and how to (un)flatten them.

Order is ``model.named_parameters()`` order, restricted to parameters with
``requires_grad`` (and, when given, to the names selected). Every vector hessdist
accepts or returns has this layout.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import InputError


@dataclass(frozen=True)
class ParameterLayout:
    """Names and shapes of the parameters that span the vector space, in flattening order."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: nn.Module, select: Sequence[str] | None = None) -> "ParameterLayout":
        """Layout of ``model``'s trainable parameters, optionally only those matching ``select``
        (exact names or shell-style patterns such as ``"fc.*"``)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if select is not None:
            chosen = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, s) for s in select)]
            unmatched = [s for s in select if not any(fnmatch.fnmatchcase(n, s) for n, _ in named)]
            if unmatched:
                raise InputError(
                    f"parameter selection {unmatched} matches no trainable parameter; "
                    f"available names: {[n for n, _ in named]}")
            named = chosen
        if not named:
            raise InputError("the model has no trainable parameters to differentiate; "
                             "set requires_grad=True on at least one parameter")
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def sizes(self) -> list[int]:
        return [s.numel() for s in self.shapes]

    @property
    def n(self) -> int:
        return sum(self.sizes)

    def unflatten(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split ``flat`` of shape (n,) or (k, n) into views shaped like the parameters,
        keeping the leading column axis k."""
        lead = flat.shape[:-1]
        return tuple(c.reshape(*lead, *s) for c, s in zip(flat.split(self.sizes, dim=-1), self.shapes))

    def flatten(self, tensors: Iterable[torch.Tensor], lead: int = 0) -> torch.Tensor:
        """Concatenate parameter-shaped tensors (with ``lead`` leading batch axes) into (..., n)."""
        return torch.cat([t.reshape(*t.shape[:lead], -1) for t in tensors], dim=-1)

    def gather(self, model: nn.Module) -> tuple[torch.Tensor, ...]:
        """The model's current values of the layout's parameters, detached."""
        params = dict(model.named_parameters())
        return tuple(params[n].detach() for n in self.names)


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model`` strictly, turning key/shape mismatches into a clear error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' …' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:8]))
        raise InputError("checkpoint does not fit the model (" + "; ".join(parts) +
                         "); check that --model builds the architecture the checkpoint was saved from")
    with torch.no_grad():
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
