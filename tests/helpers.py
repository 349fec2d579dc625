"""Small real models and dense float64 references built independently of hessdist's operator:
the full-dataset loss in ONE batch, differentiated by ``torch.func.hessian``; the GGN from the
closed-form softmax Hessian and ``jacrev`` Jacobians."""
from __future__ import annotations

import copy
import fcntl
import functools
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from hessdist.examples import digits, train_full_batch
from hessdist.models import ResNet
from hessdist.operator import Operator


def digits_subset(n: int = 120):
    x, y = digits()
    return x[:n].double(), y[:n]


def mlp(seed: int = 0, hidden: int = 12, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(64, hidden), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(hidden, 10)]
    return nn.Sequential(*layers).double()


def cnn_bn(seed: int = 0) -> nn.Module:
    """Conv+BN+ReLU ×2 with running statistics set by a few train-mode passes, then eval."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(64, 10)).double()
    return _with_running_stats(model)


class Slow(nn.Module):
    """``inner`` with a pause in every forward pass while the file ``while_exists`` does (every
    pass when None): products slow enough to be interrupted, and only those a test slows."""

    def __init__(self, inner: nn.Module, seconds: float, while_exists: str | None = None):
        super().__init__()
        self.inner, self.seconds, self.while_exists = inner, seconds, while_exists

    def forward(self, x):
        if self.while_exists is None or os.path.exists(self.while_exists):
            time.sleep(self.seconds)
        return self.inner(x)


def slow_cnn_bn(seconds: float = 0.2, while_exists: str | None = None) -> nn.Module:
    return Slow(cnn_bn(), seconds, while_exists)


def resnet_small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), ResNet(blocks=(1, 1), width=3, in_channels=1)).double()
    return _with_running_stats(model)


def _with_running_stats(model: nn.Module) -> nn.Module:
    x, _ = digits()
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(x[i * 300:(i + 1) * 300].double())
    return model.eval()


def trained_digits_mlp(hidden: int = 16) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A trained digits MLP: its Hessian has λ_max ≫ |λ_min| with λ_min a tiny negative number."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    x, y = digits()
    data = (x.double(), y)
    train_full_batch(model.double(), data, steps=300)
    return model, data


def _flat_loss_fn(model: nn.Module, loss, x, y):
    model = copy.deepcopy(model).double().eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(t):
        return {n: c.reshape(s) for n, c, s in zip(names, t.split([s.numel() for s in shapes]), shapes)}

    def outputs(t):
        return functional_call(model, {**buffers, **unflat(t)}, (x,))

    return theta, outputs, (lambda t: loss(outputs(t), y))


def dense_hessian(model: nn.Module, x, y, loss=F.cross_entropy, chunk: int = 64) -> np.ndarray:
    """Row blocks e_iᵀH of the whole-data loss by double backward through one graph (measured
    2026-12-08: 25–75% faster than jacrev∘jacrev on the test models, equal to 1e-16)."""
    theta, _, f = _flat_loss_fn(model, loss, x, y)
    theta = theta.requires_grad_(True)
    g, = torch.autograd.grad(f(theta), theta, create_graph=True)
    eye = torch.eye(len(theta), dtype=theta.dtype)
    return torch.cat([torch.autograd.grad(g, theta, eye[i:i + chunk], retain_graph=True, is_grads_batched=True)[0]
                      for i in range(0, len(theta), chunk)]).detach().numpy()


def dense_ggn_cross_entropy(model: nn.Module, x, y) -> np.ndarray:
    """(1/N) Σ_i J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i with the softmax Hessian in closed form."""
    theta, outputs, _ = _flat_loss_fn(model, F.cross_entropy, x, y)
    J = jacrev(outputs)(theta)                       # (N, C, n)
    p = torch.softmax(outputs(theta), dim=1).detach()
    H_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return (torch.einsum("icn,icd,idm->nm", J, H_out, J) / len(x)).numpy()


def dense_empirical_fisher(model: nn.Module, x, y) -> np.ndarray:
    """(1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ from the per-sample gradients stacked densely (N, n)."""
    theta, outputs, _ = _flat_loss_fn(model, F.cross_entropy, x, y)
    G = jacrev(lambda t: F.cross_entropy(outputs(t), y, reduction="none"))(theta)
    return (G.T @ G / len(x)).numpy()


MODELS = {"mlp": mlp, "cnn_bn": cnn_bn, "resnet": resnet_small}


def shared(name: str, compute) -> tuple[np.ndarray, ...]:
    """``compute()`` (a tuple of arrays) once per test session: the pytest processes share it
    through a file in the session's folder (``HESSDIST_TEST_SHARED``, made by conftest), the
    first to need it computing it under a lock while the other waits."""
    folder = os.environ.get("HESSDIST_TEST_SHARED")
    if not folder:
        return tuple(compute())
    path = os.path.join(folder, f"{name}.npz")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(path):
            np.savez(path + ".part.npz", *compute())
            os.replace(path + ".part.npz", path)
        with np.load(path) as stored:
            return tuple(stored[f"arr_{i}"] for i in range(len(stored.files)))


@functools.lru_cache(maxsize=None)
def reference(name: str):
    """(model, dense Hessian, dense GGN) on ``digits_subset()``, computed once per test session."""
    model = MODELS[name]()

    def dense():
        data = digits_subset()
        return dense_hessian(model, *data), dense_ggn_cross_entropy(model, *data)

    return (model, *shared(f"reference-{name}", dense))


class DenseOperator(Operator):
    """A dense float64 matrix (a real model's Hessian from dense_hessian) behind the Operator
    interface: the solvers' statistics are checked over hundreds of seeds at matrix speed."""

    def __init__(self, H: np.ndarray):
        self.H, self.n = torch.from_numpy(np.ascontiguousarray(H)), H.shape[0]

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.H @ V


@functools.lru_cache(maxsize=None)
def trained_mlp_hessian() -> np.ndarray:
    """Dense Hessian of the trained digits MLP (λ_max/|λ_min| in the hundreds, a dense bulk at 0)."""
    def dense():
        model, data = trained_digits_mlp()
        return (dense_hessian(model, *data),)

    return shared("trained-mlp-hessian", dense)[0]


GPT2_PARAMS = ("transformer.h.1.attn.c_proj.bias", "transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.weight",
               "transformer.ln_f.bias")              # in the model's order, as hessdist's vector has them


def tiny_gpt2() -> nn.Module:
    """A 2-layer GPT-2 built from a config (no weights downloaded), float64, eager attention
    (PyTorch's fused CPU attention has no second derivative)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    return GPT2LMHeadModel(config).double().eval()


def gpt2_tokens(rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    """A fixed token set: 48 sequences of 3–10 real tokens, right-padded to 10 (labels -100 on
    padding), so batches hold different numbers of predicted tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (48, 10), generator=g)
    mask = (torch.arange(10) < (3 + torch.arange(48) % 8)[:, None]).long()
    data = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return {k: v[rank::world_size] for k, v in data.items()}


def token_mean_loss(model: nn.Module, state: dict, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy averaged over every predicted token of ``data`` at once, written
    out (log-softmax, gather, mask) in the logits' precision."""
    logits = functional_call(model, state, (), {"input_ids": data["input_ids"],
                                                "attention_mask": data["attention_mask"]}).logits[:, :-1]
    targets = data["labels"][:, 1:]
    keep = targets != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return -(logp * keep).sum() / keep.sum()


def dense_gpt2_hessian(model: nn.Module, data: dict[str, torch.Tensor], names=GPT2_PARAMS,
                       own_loss: bool = False) -> torch.Tensor:
    """The float64 Hessian, in the selected parameters, of the mean loss over ALL the predicted
    tokens in one call (:func:`token_mean_loss`, or with ``own_loss`` the model's own loss, which
    Hugging Face computes in float32), by torch.autograd.functional.hessian."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss(flat):
        state = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return functional_call(model, state, (), data).loss if own_loss else token_mean_loss(model, state, data)

    return torch.autograd.functional.hessian(loss, theta)
