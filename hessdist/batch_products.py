"""One batch's curvature product, Σ_{i in batch} ∇²ℓ_i(θ) t for each row t of a block T (k, n),
in each of three ways (``mode``):

* ``"forward"`` — forward-over-reverse (``torch.func.jvp`` of ``grad``), vmapped over the k
  columns so one data pass serves the whole block. The default and the fastest.
* ``"double-backward"`` — reverse-over-reverse with ``torch.autograd``; one forward and one
  backward per batch, then one extra backward per column. For models whose operations lack
  forward-mode AD.
* ``"finite-difference"`` — central difference of gradients, (g(θ+hv) − g(θ−hv)) / 2h, for
  models whose operations lack any second-order AD. Hessian only; its relative error is
  O(h²) ≈ 1e-5 in float64 and ≈ 1e-3 in float32 on smooth models (measured in
  tests/test_curvature.py). On ReLU networks the float32 step crosses activation kinks and
  the error is O(1) (benchmarks/gpu_suite.py measures it): use float64 for finite differences.

The other curvatures have the two exact modes: the GGN G = JᵀH_ℓJ (J the outputs' Jacobian,
H_ℓ the loss's Hessian in the outputs), the empirical Fisher (1/N)Σᵢ ∇ℓᵢ∇ℓᵢᵀ (one JVP and one
VJP of the per-sample losses per batch) and the residual S = H − G. Also here: what a
mode's failure means, told as the fix (:func:`explained`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import grad, jvp, vjp, vmap

from .errors import InputError
from .objective import BoundModel, Objective
from .params import ParameterLayout

CURVATURES = ("hessian", "ggn", "empirical-fisher", "residual")
#: the curvatures built from the model's outputs and a loss of them (the pairs contract), exact modes only
OUTPUT_CURVATURES = CURVATURES[1:]
CURVATURE_NAMES = {"hessian": "Hessian", "ggn": "GGN", "empirical-fisher": "empirical Fisher",
                   "residual": "residual H − G"}
MODES = ("auto", "forward", "double-backward", "finite-difference")
BatchProduct = Callable[[Sequence[torch.Tensor], object, torch.Tensor], torch.Tensor]


def check_curvature(curvature: str, mode: str | None = None, pairs: bool = True) -> None:
    """Refuse a ``curvature`` that does not exist, or that ``mode`` (when known) or a loss
    without the pairs contract (``pairs=False``) cannot give."""
    if curvature not in CURVATURES:
        raise InputError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if curvature in OUTPUT_CURVATURES and mode == "finite-difference":
        raise InputError(f"finite differences of gradients give Hessian products only; "
                         f"use mode='forward' or 'double-backward' for the {CURVATURE_NAMES[curvature]}")
    if curvature in OUTPUT_CURVATURES and not pairs:
        raise InputError(f"the {CURVATURE_NAMES[curvature]} needs the model's outputs and a loss of them: "
                         "use a loss(outputs, targets) on (inputs, targets) batches (inputs may be a dict "
                         "for a keyword model), or curvature='hessian' with a BatchLoss")


def missing_derivative(exc: BaseException) -> bool:
    """Whether autograd failed because an operation lacks the derivative a mode needs."""
    text = str(exc)
    return isinstance(exc, NotImplementedError) or (
        isinstance(exc, RuntimeError) and "derivative for" in text and "not implemented" in text)


def explained(exc: BaseException, mode: str) -> BaseException:
    """``exc``, or an InputError naming the fix where autograd's own message does not."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if missing_derivative(exc):
        return InputError(f"an operation in the model has no {'forward-mode' if mode == 'forward' else 'second'}"
                          f"-order derivative in PyTorch ({first}). Use mode='double-backward' (CLI --mode "
                          "double-backward) or mode='finite-difference' (first derivatives only); for a Hugging "
                          "Face model, load it with attn_implementation='eager'")
    if isinstance(exc, RuntimeError) and "mutate a captured Tensor" in first:
        return InputError("a module writes to its own buffers in the forward pass (BatchNorm in train mode "
                          "updates its running statistics), which the functional products cannot do and "
                          "which would change the operator from product to product: keep eval_mode=True "
                          f"(the default) ({first[:120]})")
    return exc


def no_exact_mode(failure: BaseException | None) -> InputError:
    """Neither exact mode runs (``failure``: this process's last error; None: another rank's)."""
    return InputError("an operation in the model has neither a forward-mode nor a second-order derivative "
                      f"in PyTorch ({str(failure).splitlines()[0] if failure else 'on another rank'}), so "
                      "no exact product exists: for a Hugging Face model load it with "
                      "attn_implementation='eager'; for an RNN on CUDA set torch.backends.cudnn.enabled = "
                      "False; else use mode='finite-difference' (CLI --mode finite-difference; Hessian "
                      "only, first derivatives)")


class BatchProducts:
    """The model's loss, outputs and curvature products on one batch at parameters ``p`` (the
    selected tensors of ``layout``, the rest of the model's state held fixed)."""

    def __init__(self, model: nn.Module, objective: Objective, layout: ParameterLayout, dtype: torch.dtype):
        self.model, self.objective, self.layout, self.dtype = model, objective, layout, dtype

    def function(self, curvature: str, mode: str) -> BatchProduct:
        """``fn(p, batch, T)`` → (k, n): the batch's summed product with each row of T."""
        return {("hessian", "forward"): self.hessian_forward,
                ("hessian", "double-backward"): self.hessian_double_backward,
                ("hessian", "finite-difference"): self.hessian_finite_difference,
                ("ggn", "forward"): self.ggn_forward,
                ("ggn", "double-backward"): self.ggn_double_backward,
                ("empirical-fisher", "forward"): self.empirical_fisher_forward,
                ("empirical-fisher", "double-backward"): self.empirical_fisher_double_backward,
                ("residual", "forward"): self.residual_forward,
                ("residual", "double-backward"): self.residual_double_backward}[(curvature, mode)]

    def _bound(self, p: Sequence[torch.Tensor]) -> BoundModel:
        # each tensor once (a tied weight under its first name; functional_call ties the others)
        state = {k: v.detach() for k, v in [*self.model.named_parameters(), *self.model.named_buffers()]}
        state.update(zip(self.layout.names, p))
        return BoundModel(self.model, state)

    def outputs(self, p: Sequence[torch.Tensor], batch) -> torch.Tensor:
        return self.objective.outputs(self._bound(p), batch)

    def loss_sum(self, p: Sequence[torch.Tensor], batch) -> torch.Tensor:
        """The batch's mean loss times its sample count (so sums over batches weight samples equally)."""
        return self.objective.loss_sum(self._bound(p), batch)

    @staticmethod
    def leaves(p: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [t.detach().requires_grad_(True) for t in p]

    def hessian_forward(self, p, b, T):
        g = grad(self.loss_sum)

        def column(t):
            return jvp(lambda q: g(q, b), (p,), (t,))[1]

        return self.layout.flatten(vmap(column, randomness="different")(self.layout.unflatten(T)), lead=1)

    def hessian_double_backward(self, p, b, T):
        q = self.leaves(p)
        g = torch.autograd.grad(self.loss_sum(q, b), q, create_graph=True)
        rows = [torch.autograd.grad(g, q, grad_outputs=self.layout.unflatten(t), retain_graph=True)
                for t in T]
        return torch.stack([self.layout.flatten(r) for r in rows])

    def _sandwich_forward(self, f, middle, p, T):
        """Σ Jᵀ M(f(p)) J t for each row t of T, J the Jacobian of ``f`` at p: one VJP, and one
        vmapped JVP over the block (``middle(out, Jt)`` → M Jt)."""
        out, pullback = vjp(f, p)

        def column(t):
            return pullback(middle(out, jvp(f, (p,), (t,))[1]))[0]

        return self.layout.flatten(vmap(column, randomness="different")(self.layout.unflatten(T)), lead=1)

    def _sandwich_double_backward(self, f, middle, p, T):
        """As :meth:`_sandwich_forward` by reverse mode only: J t is the derivative of Jᵀu in u
        (``middle(out)`` → the map Jt ↦ M Jt)."""
        q = self.leaves(p)
        out = f(q)
        u = torch.zeros_like(out, requires_grad=True)
        jt_u = torch.autograd.grad(out, q, grad_outputs=u, create_graph=True)   # Jᵀu, linear in u
        m = middle(out)
        rows = []
        for t in T:
            jv = torch.autograd.grad(jt_u, u, grad_outputs=self.layout.unflatten(t), retain_graph=True)[0]
            rows.append(self.layout.flatten(torch.autograd.grad(out, q, grad_outputs=m(jv), retain_graph=True)))
        return torch.stack(rows)

    def ggn_forward(self, p, b, T):
        loss_grad = grad(lambda o: self.objective.output_loss_sum(o, b))
        return self._sandwich_forward(lambda q: self.outputs(q, b),
                                      lambda out, jv: jvp(loss_grad, (out,), (jv,))[1], p, T)

    def ggn_double_backward(self, p, b, T):
        def loss_hessian(out):
            out_leaf = out.detach().requires_grad_(True)
            loss_grad = torch.autograd.grad(self.objective.output_loss_sum(out_leaf, b), out_leaf,
                                            create_graph=True)[0]
            return lambda jv: torch.autograd.grad(loss_grad, out_leaf, grad_outputs=jv, retain_graph=True)[0]

        return self._sandwich_double_backward(lambda q: self.outputs(q, b), loss_hessian, p, T)

    def sample_losses(self, p: Sequence[torch.Tensor], batch) -> torch.Tensor:
        return self.objective.sample_losses(self.outputs(p, batch), batch)

    def empirical_fisher_forward(self, p, b, T):
        """Σᵢ ∇ℓᵢ (∇ℓᵢᵀ t): J the Jacobian of the per-sample losses, M = I (never a per-sample gradient)."""
        return self._sandwich_forward(lambda q: self.sample_losses(q, b), lambda out, jv: jv, p, T)

    def empirical_fisher_double_backward(self, p, b, T):
        return self._sandwich_double_backward(lambda q: self.sample_losses(q, b), lambda out: (lambda jv: jv), p, T)

    def residual_forward(self, p, b, T):
        """S = H − G: the Hessian's part from the model's own curvature (Σ ∂ℓ/∂o · ∇²o)."""
        return self.hessian_forward(p, b, T) - self.ggn_forward(p, b, T)

    def residual_double_backward(self, p, b, T):
        return self.hessian_double_backward(p, b, T) - self.ggn_double_backward(p, b, T)

    def hessian_finite_difference(self, p, b, T):
        g = grad(self.loss_sum)
        theta = self.layout.flatten(p)
        scale = max(1.0, float(theta.norm()))
        rows = []
        for t in T:
            h = torch.finfo(self.dtype).eps ** 0.5 * scale / max(float(t.norm()), 1e-300)
            plus = self.layout.flatten(g(self.layout.unflatten(theta + h * t), b))
            minus = self.layout.flatten(g(self.layout.unflatten(theta - h * t), b))
            rows.append((plus.to(torch.float64) - minus.to(torch.float64)) / (2 * h))
        return torch.stack(rows)
