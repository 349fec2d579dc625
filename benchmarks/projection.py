"""The user's problem on paper: ResNet-18 (11.2M parameters) on 50,000 CIFAR images, both ends
at the contract after each epoch, on 1, 2, 4 and 8 GPUs — a PROJECTION, not a measurement.

Inputs, each from a measured JSON file:

* full-data product equivalents per epoch: the median after the first epoch and the first
  (cold) epoch of the per-epoch loop (epochs.json; the count depends on the spectrum, which a
  narrower ResNet on real data stands in for);
* one product ÷ one gradient for ResNet-18 in the mode ``auto`` picks, one column
  (product_cost.json; measured on the machine named there);
* one full-data product on one GPU, in seconds: gpu_suite.json's (``cost``) when it was measured,
  else the ratio above times ``--gradient-seconds`` when given (stated as the user's figure),
  else unknown.

Without a GPU figure it reports what it can without one: the work per epoch in full-data
gradient passes, and the longest full-data gradient pass on one GPU for which a solve still
fits the minute on W GPUs (products split W ways; collectives and basis work left out — their
CPU/gloo cost per step and the driver's, which GPUs share, are listed from ray_overhead.json).
The bytes each product moves between GPUs are exact.
"""
from __future__ import annotations

import argparse
import json
import os

from .common import RESULTS, write

GPUS = (1, 2, 4, 8)
N_PARAMS = 11_173_962            # ResNet-18 for CIFAR-10 (hessdist.models.resnet18_cifar)
BUDGET_S = 60.0


def load(name: str) -> dict | None:
    path = os.path.join(RESULTS, f"{name}.json")
    return json.load(open(path)) if os.path.exists(path) else None


def product_ratio(pc: dict) -> tuple[float, str]:
    """Product ÷ gradient for ResNet-18, one column, eager, in the mode auto chose."""
    row = next(r for r in pc["rows"] if r["problem"] == "resnet18-cifar")
    c = next(c for c in row["configs"] if c["mode"] == row["auto_mode"] and c["k"] == 1
             and not c["compiled"] and not c["channels_last"])
    return c["ratio_to_gradient"], f"{row['auto_mode']} mode, measured on {row['device']} ({pc['machine']['date']})"


def fpe_cases(ep: dict) -> dict[str, float]:
    """Full-data product equivalents per epoch, from epochs.json: warm, cold and the worst."""
    return {"warm (median after the first epoch)": ep["summary"]["median_fpe_after_first"],
            "cold (first epoch)": ep["summary"]["first_epoch_fpe"],
            "worst epoch": max(r["hessdist"]["fpe"] for r in ep["rows"])}


def rows(fpe: dict[str, float], ratio: float, product_s: float | None) -> list[dict]:
    """Per case: the work in gradient passes, the slowest product and gradient that still fit the
    minute on W GPUs, and (given one GPU's product seconds) the seconds per epoch."""
    return [{"case": case, "fpe": f, "gradient_passes": f * ratio,
             "max_product_seconds_for_the_minute": {w: BUDGET_S * w / f for w in GPUS},
             "max_gradient_seconds_for_the_minute": {w: BUDGET_S * w / (f * ratio) for w in GPUS},
             "seconds_per_epoch": {w: f * product_s / w for w in GPUS} if product_s else None}
            for case, f in fpe.items()]


def ray_layer(overhead: dict | None) -> dict | None:
    """The Ray layer per Lanczos step from ray_overhead.json (fixed-duration products, CPU, gloo):
    the driver's share (Ray calls and the object store: the same on GPUs) and the bytes each rank
    moves (exact; what NCCL would carry), per W at the n nearest ResNet-18's."""
    if not overhead:
        return None
    n = min({r["n"] for r in overhead["rows"]}, key=lambda m: abs(m - N_PARAMS))
    rows = {r["workers"]: r for r in sorted(overhead["rows"], key=lambda r: r["workers"]) if r["n"] == n}
    return {"from": f"ray_overhead.json (n = {n:,}, {overhead['machine']['date']}, {overhead['machine']['cpu_count']} "
                    "CPU cores, gloo)",
            "driver_seconds_per_step": {w: r["split_s"]["driver"] for w, r in rows.items()},
            "cpu_gloo_collectives_seconds_per_step": {w: r["split_s"]["collectives"] for w, r in rows.items()},
            "cpu_basis_seconds_per_step": {w: r["split_s"]["basis"] for w, r in rows.items()},
            "gathered_bytes_per_step_per_rank": {w: r["gathered_bytes_per_step_per_rank"] for w, r in rows.items()}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gradient-seconds", type=float,
                    help="one full-data (50,000 images) gradient pass on one GPU, if you measured it")
    args = ap.parse_args(argv)
    ep, pc, suite = load("epochs"), load("product_cost"), load("gpu_suite")
    if not ep or not pc:
        raise SystemExit("needs benchmarks/results/epochs.json and product_cost.json: run those benchmarks first")
    ratio, ratio_note = product_ratio(pc)
    measured = suite and suite.get("status") == "measured" and "product_s" in suite["checks"].get("cost", {})
    if measured:
        cost = suite["checks"]["cost"]
        product_s, product_note = cost["product_s"], f"measured on {cost['measured_on']} (gpu_suite.json)"
    elif args.gradient_seconds:
        product_s = ratio * args.gradient_seconds
        product_note = f"{ratio:.2f} × --gradient-seconds {args.gradient_seconds} (given, not measured here)"
    else:
        product_s, product_note = None, "not measured (no GPU lent): pass --gradient-seconds or run make gpu"
    write("projection", {
        "label": "PROJECTION from measured inputs, not a measurement",
        "problem": f"ResNet-18 ({N_PARAMS:,} parameters), 50,000 CIFAR-10 images",
        "inputs": {"fpe_from": f"epochs.json ({ep['config']['data']}, {ep['config']['n_params']:,} parameters, "
                               f"{ep['machine']['date']})",
                   "product_over_gradient": ratio, "product_over_gradient_from": ratio_note,
                   "product_seconds_one_gpu": product_s, "product_seconds_from": product_note},
        "left_out": "collectives and basis work on GPUs (measured on CPU/gloo only: ray_layer below); data "
                    "loading; the first call's CUDA warm-up",
        "ray_layer": ray_layer(load("ray_overhead")),
        "bytes_between_gpus_per_product": {w: 2 * 8 * N_PARAMS * (w - 1) // w for w in GPUS if w > 1},
        "bytes_note": "reduce-scatter of the partial product + all-gather of the next vector, float64, per GPU",
        "rows": rows(fpe_cases(ep), ratio, product_s)})


if __name__ == "__main__":
    main()
