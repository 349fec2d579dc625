"""What a curvature operator refuses: a first batch its model and loss cannot run or whose
loss is not finite, parameters the loss does not use, an empirical Fisher of a loss that is not a
per-sample mean, and products that are not a fixed symmetric linear map. Each refusal names the
fix."""
from __future__ import annotations

import math

import torch

from .data import Batch, describe, rows, take
from .errors import InputError, NonDeterministicError, NonFiniteError


class OperatorChecks:
    """Mixed into :class:`~hessdist.curvature.CurvatureOperator`, whose model, data, products and
    micro-batching these checks read."""

    @staticmethod
    def _check_finite(t: torch.Tensor, batch: int, what: str) -> None:
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(
                f"the {what} is NaN or infinite on batch {batch}; check the data for NaN/inf, the "
                "model's parameters (a diverged checkpoint?), and the loss for log(0) or overflow "
                "(try --dtype float64)")

    def _check_first_batch(self) -> None:
        """One gradient on the first batch: the loss is finite and every parameter is used."""
        batch = self.batches.first()

        def head() -> Batch:                      # the first micro-batch (whose size may halve)
            return take(batch, slice(0, self.micro_batch))

        self.objective.check(batch)
        if not self.objective.pairs and self.objective.count(head()) == 0:
            raise InputError(f"the first {rows(head())} rows hold no sample the loss counts (e.g. every label "
                             "is -100), so their mean loss is 0/0; put counted samples first or check the labels")
        q = self.products.leaves(self.layout.gather(self.model))
        try:
            loss = self._retry_on_oom(lambda: self.products.loss_sum(q, head()))
        except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as exc:
            form = "(inputs, targets)" if self.objective.pairs else "batch"
            raise InputError(f"the model and loss failed on the first batch ({form} {describe(batch)}): "
                             f"{type(exc).__name__}: {exc}. Check that the data fit the model's inputs and "
                             "that the loss fits its outputs") from exc
        if loss.ndim != 0:
            raise InputError(f"the loss must return a scalar (the batch mean), got shape {tuple(loss.shape)}")
        self._check_finite(loss, 0, "loss")
        grads = torch.autograd.grad(loss, q, allow_unused=True)
        unused = [n for n, g in zip(self.layout.names, grads) if g is None]
        if unused:
            raise InputError(f"parameters {unused} do not affect the loss; their Hessian rows are zero "
                             "and undefined for autograd. Exclude them with params=[...] (CLI: "
                             "--params) or set requires_grad=False on them")

    def _check_sample_mean(self) -> None:
        """Refuse an empirical Fisher of a loss that is not the mean of its rows' own losses (a
        sum, a weighted or ignore-index mean): its per-sample gradients would not be the loss's."""
        if not self.eval_mode:
            raise InputError("the empirical Fisher needs each sample's own gradient, which a train-mode model "
                             "(batch statistics mix the rows) does not have: keep eval_mode=True")
        batch = take(self.batches.first(), slice(0, self.micro_batch))
        p = self.layout.gather(self.model)
        with torch.no_grad():
            try:
                per_row = self.products.sample_losses(p, batch).to(torch.float64)
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                raise InputError("the empirical Fisher needs the loss of each row alone, loss(outputs[i:i+1], "
                                 f"targets[i:i+1]), which failed: {type(exc).__name__}: {exc}") from exc
            whole = float(self.products.loss_sum(p, batch)) / rows(batch)
        mean = float(per_row.mean()) if per_row.shape == (rows(batch),) else math.nan
        if not abs(mean - whole) <= 1e3 * torch.finfo(self.dtype).eps * (abs(whole) + float(per_row.abs().mean())):
            raise InputError(f"the empirical Fisher (1/N)Σᵢ ∇ℓᵢ∇ℓᵢᵀ needs a loss that is the mean of per-sample "
                             f"losses, but on the first batch the rows' own losses average {mean:.6g} against a "
                             f"batch loss of {whole:.6g} (a sum, a weighted or an ignore-index mean?): use such a "
                             "loss (cross_entropy, mse), or the curvature 'hessian' or 'ggn'")

    def check_determinism(self, seed: int = 0, rtol: float | None = None) -> None:
        """Refuse an operator that is not a fixed symmetric linear map: repeat a product of the
        same vector and compare uᵀAv with vᵀAu. Costs three products (counted in ``hvps``), one
        column each: passes of different widths may run different kernels (cuDNN picks its
        algorithms by shape), whose rounding differs without the map being at fault."""
        rtol = rtol if rtol is not None else min(1e4 * torch.finfo(self.dtype).eps, 0.05)
        gen = torch.Generator().manual_seed(seed)
        u, v = torch.randn(2, self.n, generator=gen, dtype=torch.float64)
        Au, Av, Av_again = (self.matvec(x) for x in (u, v, v))
        repeat = float((Av - Av_again).norm() / max(float(Av.norm()), 1e-300))
        asym = abs(float(u @ Av - v @ Au)) / max(float(u.norm() * Av.norm() + v.norm() * Au.norm()), 1e-300)
        if repeat > rtol or asym > rtol:
            raise NonDeterministicError(
                f"curvature products are not a fixed symmetric linear map (repeat differs by "
                f"{repeat:.2e}, uᵀAv vs vᵀAu by {asym:.2e}; tolerance {rtol:.1e}). Put the model in eval "
                "mode (no dropout, BatchNorm on running statistics), remove random augmentation from "
                "the data, and make the data order fixed")
