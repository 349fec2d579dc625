"""The headline: λ_max and λ_min of ResNet-18's full-dataset Hessian on 50,000 CIFAR-shaped images
(CIFAR-10 when it is under ./data, else SYNTHETIC), with certified intervals, and the wall time on
one GPU — goal under 60 s for both ends. Projects 2, 4 and 8 GPUs from the measured product time
and an all-reduce cost.

Needs a CUDA device. Without one it records "not measured" and nothing else: CPU timings of this
problem say nothing about the GPU goal. ``--smoke`` runs the same code path on the CPU on a few
images (to check the script), without writing results.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from hessdist.examples import cifar10, cifar10_dir
from hessdist.curvature import CurvatureOperator
from hessdist.models import resnet18_cifar
from hessdist.solvers.lanczos import lanczos

from .common import write


def projection(product_s: float, products: int, n_params: int, bus_gbps: float) -> dict:
    """Wall time for the same solve on G GPUs: each product's compute divides by G, plus one ring
    all-reduce of the float64 product (2(G−1)/G · 8n bytes over the bus) per product."""
    out = {}
    for gpus in (2, 4, 8):
        allreduce_s = 2 * (gpus - 1) / gpus * 8 * n_params / (bus_gbps * 1e9)
        out[str(gpus)] = {"product_s": product_s / gpus + allreduce_s, "allreduce_s": allreduce_s,
                          "solve_s": products * (product_s / gpus + allreduce_s)}
    return out


def run(samples: int, batch_size: int, tol: float, budget_s: float, compiled: bool, tf32: bool,
        device: str, bus_gbps: float) -> dict:
    root = os.environ.get("HESSDIST_DATA_ROOT", "data")
    note = "CIFAR-10" if cifar10_dir(root) else "SYNTHETIC CIFAR-shaped (no CIFAR-10 under ./data)"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    op = CurvatureOperator(resnet18_cifar(), "cross_entropy", cifar10(root=root, n_samples=samples),
                           batch_size=batch_size, device=device, mode="auto", compiled=compiled, tf32=tf32)
    setup_s = time.perf_counter() - t0
    t = time.perf_counter()
    op.loss_and_gradient()
    gradient_s = time.perf_counter() - t
    res = lanczos(op, which="LA,SA", k=1, tol=tol, budget_s=budget_s, return_vectors=False)
    per_product = res.seconds / max(res.hvps, 1)
    return {"data": note, "n_params": op.n, "n_samples": op.n_samples, "device": device, "products": op.describe(),
            "setup_s": setup_s, "gradient_s": gradient_s, "solve_s": res.seconds, "hvps": res.hvps,
            "stop_reason": res.stop_reason, "converged": bool(res.converged),
            "lambda_max": float(res.largest.values[0]), "lambda_max_interval": res.largest.intervals[0].tolist(),
            "lambda_min": float(res.smallest.values[0]), "lambda_min_interval": res.smallest.intervals[0].tolist(),
            "residuals": [float(res.largest.residual_norms[0]), float(res.smallest.residual_norms[0])],
            "seconds_per_product": per_product, "goal_60s_met": res.seconds < 60,
            "projection": {"assumed_bus_GBps": bus_gbps, "note": "all-reduce bandwidth ASSUMED, not measured",
                           "gpus": projection(per_product, res.hvps, op.n, bus_gbps)}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=50_000)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--budget-s", type=float, default=120)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--bus-gbps", type=float, default=150.0, help="assumed all-reduce bus bandwidth (GB/s)")
    ap.add_argument("--smoke", action="store_true", help="CPU, 32 images, nothing written")
    args = ap.parse_args(argv)
    if args.smoke:
        print(run(32, 16, 1e-2, 600, False, False, "cpu", args.bus_gbps))
        return
    if not torch.cuda.is_available():
        write("headline", {"status": "not measured", "reason": "no GPU machine was lent to this session"})
        return
    write("headline", {"status": "measured", "gpu": torch.cuda.get_device_name(0),
                       **run(args.samples, args.batch_size, args.tol, args.budget_s, args.compile, args.tf32,
                             "cuda", args.bus_gbps)})


if __name__ == "__main__":
    main()
