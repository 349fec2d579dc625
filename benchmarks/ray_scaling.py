"""The Ray layer: time per full-dataset product in-process vs 1 and 2 workers, parallel
efficiency, and the per-step overhead of the distributed Lanczos beyond the product — with the
basis on the workers (hessdist's design) and, for comparison, with every vector shipped
through the driver."""
from __future__ import annotations

import argparse
import time

import numpy as np
import ray
import torch
from torch import nn

from hessdist.dist import DistributedOperator, OperatorSpec, WorkerGroup, connect
from hessdist.examples import cifar10
from hessdist.hvp import CurvatureOperator
from hessdist.models import resnet18_cifar
from hessdist.solvers.krylov import LocalKrylovBasis
from hessdist.solvers.lanczos import lanczos

from .common import write


def wide_mlp() -> nn.Module:
    """10.2M parameters: products are cheap next to their 82 MB float64 vectors."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 2500), nn.Tanh(), nn.Linear(2500, 1000), nn.Tanh(),
                         nn.Linear(1000, 10))


def cifar_subset(rank: int = 0, world_size: int = 1, n: int = 256):
    return cifar10(rank=rank, world_size=world_size, n_samples=n)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def product_times(model_fn, data_fn, batch_size: int, repeats: int) -> dict:
    torch.set_num_threads(2)
    local = CurvatureOperator(model_fn(), "cross_entropy", data_fn(), batch_size=batch_size)
    v = np.random.default_rng(0).standard_normal((local.n, 1))
    out = {"n_params": local.n, "n_samples": local.n_samples,
           "in_process_2_threads_s": best_of(lambda: local.matmat(v), repeats)}
    for workers in (1, 2):
        group = WorkerGroup(OperatorSpec(model=model_fn, data=data_fn, batch_size=batch_size), workers)
        op = DistributedOperator(group)
        basis = op.krylov_basis()
        basis.add_start(v[:, 0])
        # worker-side product: one expand, the vector never leaves the workers
        out[f"ray_{workers}_worker_1_cpu_each_s"] = best_of(lambda: basis.expand(basis.size - 1), repeats)
        group.shutdown()
    out["parallel_efficiency_1_to_2"] = out["ray_1_worker_1_cpu_each_s"] / (2 * out["ray_2_worker_1_cpu_each_s"])
    return out


def step_overhead(steps: int) -> dict:
    """Lanczos step time vs product time on the 10.2M-parameter model, one 2-CPU worker."""
    torch.set_num_threads(2)
    data_fn = lambda rank=0, world_size=1: cifar10(rank=rank, world_size=world_size, n_samples=64)  # noqa: E731
    local = CurvatureOperator(wide_mlp(), "cross_entropy", data_fn(), batch_size=64)
    v = np.random.default_rng(0).standard_normal((local.n, 1))
    product = best_of(lambda: local.matmat(v), 3)
    t = time.perf_counter()
    lanczos(local, which="LA,SA", tol=1e-300, max_hvps=steps, return_vectors=False)
    in_process_step = (time.perf_counter() - t) / steps

    group = WorkerGroup(OperatorSpec(model=wide_mlp, data=data_fn, batch_size=64), 1, cpus_per_worker=2)
    op = DistributedOperator(group)
    t = time.perf_counter()
    lanczos(op, which="LA,SA", tol=1e-300, max_hvps=steps, return_vectors=False)
    remote_step = (time.perf_counter() - t) / steps
    t = time.perf_counter()
    lanczos(LocalKrylovBasis(op), which="LA,SA", tol=1e-300, max_hvps=steps, return_vectors=False)
    shipped_step = (time.perf_counter() - t) / steps
    group.shutdown()
    return {"n_params": local.n, "steps": steps, "product_s": product,
            "in_process_step_s": in_process_step, "ray_basis_on_workers_step_s": remote_step,
            "ray_vectors_through_driver_step_s": shipped_step,
            "overhead_basis_on_workers": (remote_step - in_process_step) / product,
            "overhead_vectors_through_driver": (shipped_step - in_process_step) / product}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--resnet-samples", type=int, default=256,
                    help="CIFAR-shaped images for the ResNet-18 timing (the issue's 2,000 take ~5 min a product on 2 CPU cores)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    connect(None, num_cpus=2)
    payload = {"resnet18_cifar_shaped": product_times(
        resnet18_cifar, lambda rank=0, world_size=1: cifar_subset(rank, world_size, args.resnet_samples),
        64, args.repeats)}
    print(payload)
    payload["step_overhead_10M_params"] = step_overhead(args.steps)
    print(payload)
    write("ray_scaling", payload)
    ray.shutdown()


if __name__ == "__main__":
    main()
