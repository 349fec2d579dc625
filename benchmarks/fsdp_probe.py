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
  (gradients reduce-scattered; with each layer its own ``fully_shard`` unit, as in the memory
  rows, one layer's parameters gathered at a time), h = s·‖θ‖/‖v‖ for several s, with the
  estimate a second step (2h) gives (|D_h − D_2h| / 3, Richardson).
* ``exact_regathered`` (memory rows only): ``exact`` with each layer gathering its parameters
  when it runs, and saved-tensor hooks that store a token for a gathered parameter and gather it
  again on unpack; checked equal to ``exact``.

Both against the replicated in-process float64 product (``CurvatureOperator``, itself tested
against the dense Hessian), and timed against it (CPU, ratio). Parameter bytes per rank: what
each rank holds between products. Writes ``results/fsdp_probe.json``.
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from hessdist.curvature import CurvatureOperator
from hessdist.examples import digits
from hessdist.models import digits_cnn, digits_mlp
from hessdist.workers.worker import free_port

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


def _sharded(rank: int, world_size: int, port: int, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
             n_total: int, per_layer: bool = False):
    """Join the gloo group, shard ``model`` with fully_shard (each parameterised child its own
    unit when ``per_layer``: FSDP2 then gathers one layer at a time), and return (params,
    exact, difference): the sharded parameters, the exact product of a vector in shard layout,
    and the central difference of FSDP2's gradients at a step h."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Partial, Replicate
    from torch.func import functional_call

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,))
    skeleton = copy.deepcopy(model)
    if per_layer:
        for child in model:
            if any(True for _ in child.parameters()):
                fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for unit in model.modules():
        if hasattr(unit, "set_gradient_divide_factor"):
            unit.set_gradient_divide_factor(1.0)          # a sum over ranks: each rank's loss is its share
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())

    def exact(v: list[torch.Tensor]) -> list[torch.Tensor]:
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

    def shift(v: list[torch.Tensor], h: float) -> None:
        with torch.no_grad():
            for p, vi in zip(params, v):
                p.to_local().add_(vi, alpha=h)

    def difference(v: list[torch.Tensor], h: float) -> list[torch.Tensor]:
        shift(v, h)
        plus = gradient()
        shift(v, -2 * h)
        minus = gradient()
        shift(v, h)
        return [(a - b) / (2 * h) for a, b in zip(plus, minus)]

    def exact_regathered(v: list[torch.Tensor]) -> list[torch.Tensor]:
        """``exact`` with each layer's parameters gathered when the layer runs and, wherever
        autograd saves them for a backward pass, saved as a token and gathered again when read."""
        leaves = [p.detach().requires_grad_() for p in params]
        shards = dict(zip(names, leaves))
        layers = _per_layer_gathering(skeleton, shards, gather)
        with torch.autograd.graph.saved_tensors_hooks(gather.pack, gather.unpack):
            loss = F.cross_entropy(layers(x), y, reduction="sum") / n_total
            grads = torch.autograd.grad(loss, leaves, create_graph=True)
            dot = sum((g.to_local() * vi).sum() for g, vi in zip(grads, v))
            return [t.to_local().detach() for t in torch.autograd.grad(dot, leaves)]

    gather = _Regather(mesh, Replicate, Partial)
    return params, exact, difference, exact_regathered


class _Regather:
    """Gathers a parameter from its shard (differentiably: the backward is a reduce-scatter) and
    remembers which storage holds a gathered parameter while it lives, so that the saved-tensor
    hooks store a token (the shard and the view) in its place and gather it again on unpack."""

    def __init__(self, mesh, replicate, partial):
        from torch.multiprocessing.reductions import StorageWeakRef
        self.mesh, self.replicate, self.partial, self.weak = mesh, replicate, partial, StorageWeakRef
        self.live: dict[int, tuple] = {}          # storage → (its weak reference, the shard)

    def __call__(self, shard) -> torch.Tensor:
        with torch.enable_grad():
            full = shard.redistribute(self.mesh, [self.replicate()]).to_local(grad_placements=[self.partial()])
        ref = self.weak(full.untyped_storage())
        self.live[ref.cdata] = (ref, shard)
        return full

    def pack(self, t: torch.Tensor):
        hit = self.live.get(t.untyped_storage()._cdata) if t.numel() else None
        if hit is None or hit[0].expired():
            return t
        return hit[1], t.size(), t.stride(), t.storage_offset()

    def unpack(self, saved):
        if isinstance(saved, torch.Tensor):
            return saved
        shard, size, stride, offset = saved
        view = self(shard).as_strided(size, stride, offset)
        ref = self.weak(view.untyped_storage())
        self.live[ref.cdata] = (ref, shard)
        return view


def _per_layer_gathering(skeleton: torch.nn.Sequential, shards: dict, gather: _Regather) -> torch.nn.Module:
    """``skeleton`` whose parameterised children gather their parameters from ``shards`` (named as
    in the skeleton) each time they run, so that only the running layer's are whole."""
    from torch.func import functional_call

    def run(x):
        for name, child in skeleton.named_children():
            own = {k: gather(shards[f"{name}.{k}"]) for k, _ in child.named_parameters()}
            x = functional_call(child, own, (x,)) if own else child(x)
        return x
    return run


def _shards(params, flat: np.ndarray, rank: int, world_size: int) -> list[torch.Tensor]:
    """This rank's dim-0 shard of every parameter of a full flat vector (fully_shard's chunks:
    ⌈rows/W⌉ rows per rank, the last ones short or empty)."""
    out, at = [], 0
    for p in params:
        full = torch.from_numpy(flat[at:at + p.numel()]).reshape(p.shape)
        at += p.numel()
        rows = -(-p.shape[0] // world_size)
        out.append(full[rank * rows: rank * rows + p.to_local().shape[0]].clone())
    return out


def _rank(rank: int, world_size: int, port: int, name: str, v_full: np.ndarray, out: dict) -> None:
    x, y = digits(rank, world_size)
    params, exact, difference, _ = _sharded(rank, world_size, port, MODELS[name](), x.double(), y, len(digits()[0]))
    v = _shards(params, v_full, rank, world_size)
    theta_sq = sum(float((p.to_local().detach() ** 2).sum()) for p in params)
    v_sq = sum(float((vi ** 2).sum()) for vi in v)
    sums = torch.tensor([theta_sq, v_sq], dtype=torch.float64)
    dist.all_reduce(sums)
    scale = float(sums[0].sqrt() / sums[1].sqrt())
    arrays = lambda parts: [t.numpy() for t in parts]
    out[rank] = {"exact": arrays(exact(v)), "exact_s": best_of(lambda: exact(v), 3),
                 "fd": {s: (arrays(difference(v, s * scale)), arrays(difference(v, 2 * s * scale))) for s in STEPS},
                 "fd_s": best_of(lambda: difference(v, 1e-4 * scale), 3),
                 "param_bytes": sum(p.to_local().numel() * p.to_local().element_size() for p in params)}
    dist.destroy_process_group()


def wide_mlp() -> torch.nn.Module:
    """64 → 1024 ×4 → 10, tanh, float64: 3.2M parameters (25 MB) in four equal-sized layers, so
    that parameter-sized memory shows above a process's own."""
    torch.manual_seed(0)
    layers, width = [torch.nn.Linear(64, 1024)], 1024
    for _ in range(3):
        layers += [torch.nn.Tanh(), torch.nn.Linear(width, width)]
    return torch.nn.Sequential(*layers, torch.nn.Tanh(), torch.nn.Linear(width, 10)).double()


def _heap_in_use() -> int:
    """Bytes malloc has handed out and not taken back (glibc's mallinfo2: small blocks plus mmapped
    ones): what the process's tensors hold, unlike the resident set, which keeps freed pages."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def _peak_growth_during(fn) -> int:
    """Bytes the heap in use grew by at its peak during ``fn()`` (sampled every 0.2 ms)."""
    import threading
    base, peak, done = _heap_in_use(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _heap_in_use())
            time.sleep(2e-4)

    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return peak[0] - base


def _memory_rank(rank: int, world_size: int, port: int, method: str, out: dict) -> None:
    x, y = digits(rank, world_size)
    x, y = x[:64 // world_size].double(), y[:64 // world_size]
    params, exact, difference, regathered = _sharded(rank, world_size, port, wide_mlp(), x, y, 64, per_layer=True)
    torch.manual_seed(rank)
    v = [torch.randn_like(p.to_local()) for p in params]
    product = {"exact": lambda: exact(v), "exact_regathered": lambda: regathered(v),
               "finite_difference": lambda: difference(v, 1e-4)}[method]
    first = product()                                       # first call: lazy imports, buffers
    grown = _peak_growth_during(product)
    agrees = None
    if method == "exact_regathered":                        # the same product as exact's, to rounding
        agrees = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(first, exact(v)))
    out[rank] = {"param_bytes": sum(p.to_local().numel() * 8 for p in params), "peak_growth_bytes": grown,
                 "relative_difference_from_exact": agrees}
    dist.destroy_process_group()


def memory(ranks: tuple[int, ...] = (1, 2, 4)) -> list[dict]:
    """Per-rank peak memory growth of one product (heap in use, sampled) on the wide MLP,
    exact and finite-difference, at each rank count: each in processes of its own."""
    rows = []
    for method in ("exact", "exact_regathered", "finite_difference"):
        for w in ranks:
            with mp.Manager() as manager:
                out = manager.dict()
                mp.spawn(_memory_rank, args=(w, free_port(), method, out), nprocs=w)
                got = [out[r] for r in range(w)]
            rows.append({"method": method, "ranks": w, "param_bytes_per_rank": max(g["param_bytes"] for g in got),
                         "product_peak_growth_bytes_per_rank": max(g["peak_growth_bytes"] for g in got),
                         "relative_difference_from_exact": None if method != "exact_regathered" else
                         max(g["relative_difference_from_exact"] for g in got)})
    return rows


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
        mp.spawn(_rank, args=(world_size, free_port(), name, v, out), nprocs=world_size)
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
    memory_rows = memory()
    for r in rows:
        best = min(r["finite_difference"].items(), key=lambda kv: kv[1]["relative_error"])
        print(f"{r['model']:>14} W={r['ranks']}: exact {r['exact_relative_error']:.1e}, finite difference best "
              f"{best[1]['relative_error']:.1e} at s={best[0]}; params/rank {max(r['param_bytes_per_rank'])} of "
              f"{r['param_bytes_replicated']} B; time exact/replicated {r['seconds_exact_over_replicated']:.2f}, "
              f"fd/replicated {r['seconds_fd_over_replicated']:.2f}")
    mb = 1 / 2 ** 20
    for r in memory_rows:
        print(f"wide MLP, {r['method']:>17}, W={r['ranks']}: parameters {r['param_bytes_per_rank'] * mb:.1f} MB per rank, "
              f"a product's peak growth {r['product_peak_growth_bytes_per_rank'] * mb:.1f} MB")
    write("fsdp_probe", {"backend": "gloo (CPU), float64, digits (1,797 samples)", "rows": rows,
                         "memory": {"model": "wide MLP 64-1024x4-10 tanh, float64, 3.2M parameters, 64 samples; "
                                             "each parameterised layer its own fully_shard unit",
                                    "how": "growth of the heap in use (glibc mallinfo2) at its peak during one "
                                           "product (sampled every 0.2 ms), after a first product", "rows": memory_rows}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
