"""What PyTorch's own model sharding (FSDP2, ``fully_shard`` over a device mesh) gives a curvature
product, before hessdist builds on it (issue 26): on real gloo process groups of 2 and 4 ranks
(CPU, float64, real digits), each rank holding only its dim-0 shard of every parameter, as
``fully_shard`` lays them out, and a vector in the same layout.

* ``exact``: the shards all-gathered by a differentiable redistribute (DTensor Shard(0) →
  Replicate, its backward a reduce-scatter), the model run as plain tensors on the rank's own
  samples (``torch.func.functional_call`` on an unsharded skeleton), double backward: the
  result arrives reduce-scattered, in shard layout. Needs every parameter gathered for the
  product's lifetime (its graph holds them).
* ``finite_difference``: (∇f(θ + hv) − ∇f(θ − hv)) / 2h from FSDP2's own forward/backward
  (one layer's parameters gathered at a time, gradients reduce-scattered), h = s·‖θ‖/‖v‖ for
  several s, with the estimate a second step (2h) gives (|D_h − D_2h| / 3, Richardson).

Both against the replicated in-process float64 product (``CurvatureOperator``, itself tested
against the dense Hessian), and timed against it (CPU, ratio). Parameter bytes per rank: what
each rank holds between products. Writes ``results/fsdp_probe.json``.
"""
from __future__ import annotations

import argparse
import copy
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from hessdist.curvature import CurvatureOperator
from hessdist.examples import digits
from hessdist.models import digits_cnn, digits_mlp

from .common import best_of, write

def tanh_cnn() -> torch.nn.Module:
    """The BatchNorm CNN with its ReLUs replaced by tanh: the same layers without kinks."""
    model = digits_cnn().double().eval()
    for i, layer in enumerate(model):
        if isinstance(layer, torch.nn.ReLU):
            model[i] = torch.nn.Tanh()
    return model


MODELS = {"digits MLP": lambda: digits_mlp().double(), "digits CNN+BN": lambda: digits_cnn().double().eval(),
          "digits CNN+BN, tanh": tanh_cnn}
STEPS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def _rank(rank: int, world_size: int, port: int, name: str, v_full: np.ndarray, out: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Partial, Replicate
    from torch.func import functional_call

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,))
    x, y = digits(rank, world_size)
    x, n_total = x.double(), len(digits()[0])
    model = MODELS[name]()
    skeleton = copy.deepcopy(model)
    fully_shard(model, mesh=mesh)
    model.set_gradient_divide_factor(1.0)                 # a sum over ranks: each rank's loss is its share
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())

    def shards(flat: np.ndarray) -> list[torch.Tensor]:
        """This rank's dim-0 shard of every parameter of a full flat vector."""
        out, at = [], 0
        for p in params:
            full = torch.from_numpy(flat[at:at + p.numel()]).reshape(p.shape)
            at += p.numel()
            local = p.to_local()
            rows = -(-p.shape[0] // world_size)
            out.append(full[rank * rows: rank * rows + local.shape[0]].clone())
        return out

    v = shards(v_full)

    def exact() -> list[torch.Tensor]:
        leaves = [p.detach().requires_grad_() for p in params]
        full = [p.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()]) for p in leaves]
        loss = F.cross_entropy(functional_call(skeleton, dict(zip(names, full)), (x,)), y, reduction="sum") / n_total
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        dot = sum((g.to_local() * vi).sum() for g, vi in zip(grads, v))
        return [t.to_local().detach() for t in torch.autograd.grad(dot, leaves)]

    def gradient() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        (F.cross_entropy(model(x), y, reduction="sum") / n_total).backward()
        return [p.grad.to_local().clone() for p in params]

    def shift(h: float) -> None:
        with torch.no_grad():
            for p, vi in zip(params, v):
                p.to_local().add_(vi, alpha=h)

    def difference(h: float) -> list[torch.Tensor]:
        shift(h)
        plus = gradient()
        shift(-2 * h)
        minus = gradient()
        shift(h)
        return [(a - b) / (2 * h) for a, b in zip(plus, minus)]

    theta_sq = sum(float((p.to_local().detach() ** 2).sum()) for p in params)
    v_sq = sum(float((vi ** 2).sum()) for vi in v)
    sums = torch.tensor([theta_sq, v_sq], dtype=torch.float64)
    dist.all_reduce(sums)
    scale = float(sums[0].sqrt() / sums[1].sqrt())
    arrays = lambda parts: [t.numpy() for t in parts]
    out[rank] = {"exact": arrays(exact()), "exact_s": best_of(exact, 3),
                 "fd": {s: (arrays(difference(s * scale)), arrays(difference(2 * s * scale))) for s in STEPS},
                 "fd_s": best_of(lambda: difference(1e-4 * scale), 3),
                 "param_bytes": sum(p.to_local().numel() * p.to_local().element_size() for p in params)}
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(name: str, world_size: int) -> dict:
    """One model on ``world_size`` ranks against the replicated float64 product."""
    x, y = digits()
    model = MODELS[name]()
    local = CurvatureOperator(model, "cross_entropy", (x, y), dtype=torch.float64, batch_size=len(x))
    v = np.random.default_rng(0).standard_normal(local.n)
    ref = np.asarray(local.matvec(v))
    replicated_s = best_of(lambda: local.matvec(v), 3)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(world_size, _free_port(), name, v, out), nprocs=world_size)
        ranks = [out[r] for r in range(world_size)]

    def full(per_rank: list[list[np.ndarray]]) -> np.ndarray:
        """Every parameter's dim-0 shards stacked back in rank order, flattened in model order."""
        return np.concatenate([np.concatenate([shards[i] for shards in per_rank]).reshape(-1)
                               for i in range(len(per_rank[0]))])

    norm = np.abs(ref).max()
    fd = {}
    for s in STEPS:
        d_h, d_2h = full([r["fd"][s][0] for r in ranks]), full([r["fd"][s][1] for r in ranks])
        fd[str(s)] = {"relative_error": float(np.abs(d_h - ref).max() / norm),
                      "richardson_estimate": float(np.abs(d_h - d_2h).max() / 3 / norm)}
    return {"model": name, "ranks": world_size, "n": local.n,
            "exact_relative_error": float(np.abs(full([r["exact"] for r in ranks]) - ref).max() / norm),
            "finite_difference": fd,
            "param_bytes_per_rank": [r["param_bytes"] for r in ranks],
            "param_bytes_replicated": local.n * 8,
            "seconds_exact_over_replicated": max(r["exact_s"] for r in ranks) / replicated_s,
            "seconds_fd_over_replicated": max(r["fd_s"] for r in ranks) / replicated_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="2,4")
    args = ap.parse_args(argv)
    rows = [probe(name, int(w)) for name in MODELS for w in args.ranks.split(",")]
    for r in rows:
        best = min(r["finite_difference"].items(), key=lambda kv: kv[1]["relative_error"])
        print(f"{r['model']:>14} W={r['ranks']}: exact {r['exact_relative_error']:.1e}, finite difference best "
              f"{best[1]['relative_error']:.1e} at s={best[0]}; params/rank {max(r['param_bytes_per_rank'])} of "
              f"{r['param_bytes_replicated']} B; time exact/replicated {r['seconds_exact_over_replicated']:.2f}, "
              f"fd/replicated {r['seconds_fd_over_replicated']:.2f}")
    write("fsdp_probe", {"backend": "gloo (CPU), float64, digits (1,797 samples)",
                         "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
