"""The Ray layer: time per full-dataset product in-process vs 1 and 2 workers, parallel
efficiency, and the per-step overhead of the distributed Lanczos beyond the product — with the
basis on the workers (hessdist's design) and, for comparison, with every vector shipped
through the driver."""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import ray
import torch
from torch import nn

from hessdist.workers import DistributedOperator, OperatorSpec, WorkerGroup, connect
from hessdist.examples import cifar10
from hessdist.curvature import CurvatureOperator
from hessdist.models import resnet18_cifar
from hessdist.solvers.lanczos import default_max_basis, lanczos

from .common import RESULTS, best_of, write


def wide_mlp() -> nn.Module:
    """10.2M parameters: products are cheap next to their 82 MB float64 vectors."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 2500), nn.Tanh(), nn.Linear(2500, 1000), nn.Tanh(),
                         nn.Linear(1000, 10))


def cifar_subset(rank: int = 0, world_size: int = 1, n: int = 256):
    return cifar10(rank=rank, world_size=world_size, n_samples=n)


def product_times(model_fn, data_fn, batch_size: int, repeats: int) -> dict:
    torch.set_num_threads(2)
    local = CurvatureOperator(model_fn(), "cross_entropy", data_fn(), batch_size=batch_size)
    v = np.random.default_rng(0).standard_normal((local.n, 1))
    out = {"n_params": local.n, "n_samples": local.n_samples,
           "in_process_2_threads_s": best_of(lambda: local.matmat(v), repeats)}
    for workers in (1, 2):
        group = WorkerGroup(OperatorSpec(model=model_fn, data=data_fn, batch_size=batch_size), workers)
        op = DistributedOperator(group)
        basis = op.krylov_basis(capacity=4)
        basis.add_start(v[:, 0])
        # worker-side product: one expand, the vector never leaves the workers
        out[f"ray_{workers}_worker_1_cpu_each_s"] = best_of(lambda: basis.expand(basis.size - 1), repeats)
        group.shutdown()
    out["parallel_efficiency_1_to_2"] = out["ray_1_worker_1_cpu_each_s"] / (2 * out["ray_2_worker_1_cpu_each_s"])
    return out


class KeepsBasis(DistributedOperator):
    """The distributed operator, holding on to the last basis it made (to ask for its timings)."""

    def krylov_basis(self, *args, **kw):
        self.basis = super().krylov_basis(*args, **kw)
        return self.basis


def step_overhead(steps: int, samples: int, worker_counts: tuple[int, ...], dtypes: tuple[str, ...]) -> dict:
    """The Lanczos step beyond the product on the 10.2M-parameter model with the basis sharded
    over W workers: the workers time their partial products, the two collectives (all-gather of
    the vector, reduce-scatter of the product: the traffic of the one all-reduce a replicated
    product pays) and the whole expand step (means, first step included); the driver's step is
    the median time between blocks. Also the default basis capacity and the peak basis memory
    per worker. For each product precision in ``dtypes``: the all-gather sends vectors in it, so
    float32 products move half the bytes of float64 ones (the reduce-scatter is float64 for both)."""
    data_fn = lambda rank=0, world_size=1: cifar10(rank=rank, world_size=world_size, n_samples=samples)  # noqa: E731
    rows = []
    for dtype, workers in [(d, w) for d in dtypes for w in worker_counts]:
        group = WorkerGroup(OperatorSpec(model=wide_mlp, data=data_fn, batch_size=samples, dtype=dtype), workers,
                            cpus_per_worker=2 / max(workers, 2))
        try:
            op = KeepsBasis(group)
            stamps = []
            res = lanczos(op, which="LA,SA", tol=1e-300, max_hvps=steps, return_vectors=False,
                          callback=lambda info: stamps.append(time.perf_counter()))
            seconds = group.run("basis_seconds", op.basis.id)
        finally:
            group.shutdown()
        driver_step = float(np.median(np.diff(stamps)))        # block to block, as the driver sees it
        product = max(s["product"] / s["columns"] for s in seconds)
        worker_step = max(s["expand"] / s["columns"] for s in seconds)
        collectives = max(s["collectives"] / s["columns"] for s in seconds)
        gathered = max(s["gathered_bytes"] / s["columns"] for s in seconds)
        rows.append({"workers": workers, "n_params": op.n, "n_samples": samples, "steps": len(stamps),
                     "basis_vectors_at_end": int(op.basis.size),
                     "product_s": product, "worker_step_s": worker_step, "driver_step_s": driver_step,
                     "collectives_s": collectives, "gathered_bytes_per_column": gathered,
                     "product_dtype": group.spec.dtype,
                     "basis_work_on_workers_s": worker_step - product - collectives,
                     "overhead_on_workers_s": worker_step - product,
                     "overhead_beyond_product_and_collectives_s": driver_step - product - collectives,
                     "overhead_with_driver_s": driver_step - product,
                     "overhead_fraction": (driver_step - product) / product,
                     "default_max_basis": default_max_basis(op),
                     "basis_peak_bytes_per_worker": res.basis_peak_bytes})
        print(rows[-1], flush=True)
    return {"note": f"{os.cpu_count()} CPU cores shared by all workers: with more workers than cores they "
                    "run oversubscribed, so product times grow; the overhead is what the step adds",
            "rows": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--resnet-samples", type=int, default=256,
                    help="CIFAR-shaped images for the ResNet-18 timing (the issue's 2,000 take ~5 min a product on 2 CPU cores)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--samples", type=int, default=256, help="images for the 10.2M-parameter product")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--dtypes", default="float32,float64", help="product precisions of the sharded-step runs")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", choices=("resnet", "step"), help="rerun one part, keep the other's numbers")
    args = ap.parse_args(argv)
    connect(None, num_cpus=max(2, *map(int, args.workers.split(","))))
    old = os.path.join(RESULTS, "ray_scaling.json")
    payload = {k: v for k, v in json.load(open(old)).items() if k != "machine"} if args.only and os.path.exists(old) else {}
    if args.only != "step":
        payload["resnet18_cifar_shaped"] = product_times(
            resnet18_cifar, lambda rank=0, world_size=1: cifar_subset(rank, world_size, args.resnet_samples),
            64, args.repeats)
    if args.only != "resnet":
        payload.pop("step_overhead_10M_params", None)
        payload["sharded_step_10M_params"] = step_overhead(args.steps, args.samples,
                                                           tuple(map(int, args.workers.split(","))),
                                                           tuple(args.dtypes.split(",")))
    write("ray_scaling", payload)
    ray.shutdown()


if __name__ == "__main__":
    main()
