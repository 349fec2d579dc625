"""Distributed products side by side: one full-dataset Hessian product with 2 processes (1 CPU
thread each, gloo) — hessdist's Ray workers against hessian-eigenthings' ``DDPHessianOperator``
(torch.distributed processes it expects the caller to launch; spawned here). Same trained model,
same data split into the same two shards, float64, the same vector; the products are compared.
DDPHessianOperator averages the ranks' batch means, so shards of unequal size (1797 digits:
899 and 898) bias its product by ~1e-4 relative; with equal shards the two agree to ~1e-15
(checked on 1796 samples). hessdist weights by sample count.

hessdist sends one flat all-reduce per product; DDPHessianOperator all-reduces every gradient
tensor inside the graph and every product tensor (2 × tensors × batches calls per product).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import tempfile
import time

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn

from hessdist.workers.worker import free_port

from .common import merged_rows, ray_operator, trained_model, write

WORKERS = 2


def _eigenthings_rank(rank: int, port: int, path: str, repeats: int, out: str) -> None:
    """One DDP rank: its strided shard, the peer's operator, the best of ``repeats`` products."""
    import torch.distributed as dist
    import hessian_eigenthings as he
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORKERS)
    saved = torch.load(path, weights_only=False)       # our own temporary file: a pickled model
    model, (x, y), v = saved["model"], saved["data"], saved["v"]
    op = he.DDPHessianOperator(model, [(x[rank::WORKERS], y[rank::WORKERS])],
                               he.supervised_loss(nn.CrossEntropyLoss()))
    best = float("inf")
    for _ in range(repeats + 1):                        # the first is a warm-up
        dist.barrier()
        t = time.perf_counter()
        hv = op.matvec(v)
        best = min(best, time.perf_counter() - t)
    if rank == 0:
        torch.save({"seconds": best, "hv": hv, "tensors": len(list(model.parameters()))}, out)
    dist.destroy_process_group()


def eigenthings_ddp(model: nn.Module, data, v: torch.Tensor, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path, out = os.path.join(tmp, "problem.pt"), os.path.join(tmp, "out.pt")
        torch.save({"model": model, "data": data, "v": v}, path)
        mp.spawn(_eigenthings_rank, args=(free_port(), path, repeats, out), nprocs=WORKERS, join=True)
        return torch.load(out, weights_only=True)


def hessdist_ray(model: nn.Module, data, v: torch.Tensor, repeats: int) -> dict:
    with ray_operator(model, data, WORKERS, dtype="float64", batch_size=4096, mode="double-backward") as op:
        V = v.numpy()[:, None]
        basis = op.krylov_basis()
        basis.add_start(V[:, 0])
        times = {"driver_round_trip_s": float("inf"), "vector_on_workers_s": float("inf")}
        for _ in range(repeats + 1):
            t = time.perf_counter()
            hv = op.matmat(V)[:, 0]
            times["driver_round_trip_s"] = min(times["driver_round_trip_s"], time.perf_counter() - t)
            t = time.perf_counter()
            basis.expand(basis.size - 1)          # the product as the solver runs it
            times["vector_on_workers_s"] = min(times["vector_on_workers_s"], time.perf_counter() - t)
            basis.compress(np.eye(2)[:, :1], 2)       # back to the start vector alone
        return {**times, "hv": torch.from_numpy(hv)}


def run(problem: str, repeats: int) -> dict:
    model, data = trained_model(problem)
    model = model.double().eval()
    data = (data[0].double(), data[1])
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    ours = hessdist_ray(model, data, v, repeats)
    row = {"problem": problem, "n_params": v.numel(), "n_samples": len(data[1]), "processes": WORKERS,
           "shard_sizes": [len(data[1][rank::WORKERS]) for rank in range(WORKERS)],
           "hessdist_ray": {k: ours[k] for k in ("driver_round_trip_s", "vector_on_workers_s")}}
    try:
        peer = eigenthings_ddp(model, data, v, repeats)
    except ImportError as exc:
        row["eigenthings_ddp"] = {"status": "not installed", "note": str(exc)}
        return row
    row["eigenthings_ddp"] = {"status": "ok", "version": importlib.metadata.version("hessian-eigenthings"),
                              "product_s": peer["seconds"], "all_reduce_calls_per_product": 2 * peer["tensors"],
                              "rel_diff_vs_hessdist": float((peer["hv"] - ours["hv"]).norm() / ours["hv"].norm())}
    row["ratio_hessdist_to_eigenthings"] = ours["vector_on_workers_s"] / peer["seconds"]
    print(row, flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--problems", nargs="+", default=["digits-mlp", "digits-cnn"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    rows = [run(p, args.repeats) for p in args.problems]
    write("ddp_peer", {"rows": merged_rows("ddp_peer", rows)})


if __name__ == "__main__":
    main()
