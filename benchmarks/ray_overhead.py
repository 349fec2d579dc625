"""The Ray layer's cost per Lanczos step where compute cannot hide it (issue 25, item 3).

Each worker's partial product is REPLACED by a sleep of ``--product-s`` (1.0 s) and a
deterministic output of the right size (diag(d)·V, d fixed; labelled ``fixed-duration`` in the
JSON): no CPU is spent on it, so whatever a step takes beyond the sleep is the layer's own cost.
Everything else is real: the worker actors, the gloo process group, the sharded basis
(all-gather of the vectors to expand, reduce-scatter of the partial sums, Gram–Schmidt on the
slices with all-reduced dot products) and the driver's call per step through Ray. For each n and
W it expands ``--steps`` columns and splits a step's seconds, less the product, into

* collectives — the all-gather and reduce-scatter (and the dot products' all-reduces), per rank;
* basis — the rest of the workers' expand (Gram–Schmidt, padding, copies), per rank;
* driver — the step's wall time on the driver less the slowest rank's expand (Ray's call, the
  object store, the coefficients' return and their check).

overhead = step / product − 1; goal < 5% at n = 1e7 for every W. On a machine with fewer cores
than workers the ranks share cores and the basis/collective figures include the wait for one.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

from hessdist.basis import HOST_BASIS_BYTES
from hessdist.workers import DistributedOperator, OperatorSpec, WorkerGroup, connect

from .common import merged_rows, write


class FixedDurationProducts:
    """What a worker's sharded basis needs of an operator, with a product that sleeps instead of
    computing: ``local_sum(V)`` → (k, n) = d ⊙ V after ``seconds``; one sample per rank."""

    curvature, dtype = "hessian", torch.float64

    def __init__(self, n: int, seconds: float, world_size: int):
        self.n, self.seconds, self.n_samples = n, seconds, world_size
        self.device = torch.device("cpu")
        self.d = torch.linspace(-0.5, 100.0, n, dtype=torch.float64)       # a fixed spectrum

    def local_sum(self, V: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return (V.T.to(torch.float64) * self.d).contiguous()

    def basis_bytes(self) -> int:
        return HOST_BASIS_BYTES

    def describe(self) -> dict:
        return {"mode": "fixed-duration", "micro_batch": 1, "peak_device_bytes": None, "peak_host_rss_bytes": None}


@dataclasses.dataclass(frozen=True)
class FixedDurationSpec(OperatorSpec):
    """Workers that build :class:`FixedDurationProducts` instead of a model's operator."""

    n: int = 10_000_000
    seconds: float = 1.0

    def build(self, rank, world_size, device, reducer=None, agree=None):
        return FixedDurationProducts(self.n, self.seconds, world_size)


def measure(n: int, workers: int, steps: int, seconds: float) -> dict:
    spec = FixedDurationSpec(model="fixed", data="fixed", dtype="float64", n=n, seconds=seconds)
    group = WorkerGroup(spec, workers, collective_timeout_s=300, call_timeout_s=600)
    try:
        op = DistributedOperator(group)
        basis = op.krylov_basis(capacity=steps + 2)
        basis.add_start(np.random.default_rng(0).standard_normal(n))
        walls, before = [], None
        for j in range(steps):
            t = time.perf_counter()
            basis.expand(j)
            walls.append(time.perf_counter() - t)
            if j == 0:                        # the first step allocates the basis rows: not counted
                before = group.run("basis_seconds", basis.id)
        after = group.run("basis_seconds", basis.id)
    finally:
        group.shutdown()
    counted = steps - 1
    per_step = {key: max(a[key] - b[key] for a, b in zip(after, before)) / counted
                for key in ("expand", "product", "collectives")}
    step = statistics.mean(walls[1:])
    product = per_step["product"]
    return {"config": f"n={n:.0e} W={workers}", "n": n, "workers": workers, "steps": steps, "product": f"fixed-duration: sleep {seconds} s + d⊙V",
            "step_s": step, "product_s": product, "overhead": step / seconds - 1,
            "split_s": {"collectives": per_step["collectives"],
                        "basis": per_step["expand"] - per_step["product"] - per_step["collectives"],
                        "output": product - seconds,
                        "driver": step - per_step["expand"]},
            "gathered_bytes_per_step_per_rank": max(a["gathered_bytes"] - b["gathered_bytes"]
                                                    for a, b in zip(after, before)) / counted,
            "goal_met": step / seconds - 1 < 0.05}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, nargs="+", default=[1e7, 5e7])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--product-s", type=float, default=1.0)
    args = ap.parse_args(argv)
    connect(num_cpus=max(args.workers))
    rows = []
    for n in map(int, args.n):
        for w in args.workers:
            rows.append(measure(n, w, args.steps, args.product_s))
            r = rows[-1]
            print(f"n={n:.0e} W={w}: step {r['step_s']:.3f} s, overhead {100 * r['overhead']:.1f}% "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["split_s"].items()), flush=True)
    write("ray_overhead", {"label": "FIXED-DURATION products (sleep, no compute): the Ray layer's own cost",
                           "rows": merged_rows("ray_overhead", rows, key="config")})


if __name__ == "__main__":
    main()
