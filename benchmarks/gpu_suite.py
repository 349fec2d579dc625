"""The device suite (``make gpu``): everything the GPU path promises, checked in one call of at
most ten minutes on one H100/H200, written to ``benchmarks/results/gpu_suite.json`` with a
pass/fail per check and its numbers.

Checks (run cheap ones first, then the minute, then the long product table; each is cut
short, and says so, when the suite's time runs out):

* ``environment`` — the device, torch/CUDA/cuDNN/NCCL versions, the float32 precision in force;
* ``products`` — every product configuration (mode, precision, compile, channels-last) against a
  float64 product, on a digits CNN with BatchNorm and on ResNet-18; float64 CUDA also against
  float64 on the CPU;
* ``determinism`` — the check passes on the eval-mode model and refuses one in train mode;
* ``data_paths`` — streamed and resident data give the same product; an out-of-memory forced with
  ``torch.cuda.set_per_process_memory_fraction`` halves the micro-batch, same product;
* ``collectives`` — a single-rank NCCL group through the workers' reduce and agreement (no Ray
  needed), and, when Ray imports (the ``../shared/tools`` bundle carried), a one-GPU worker group
  whose sharded-basis solve must match the in-process one;
* ``headline`` — ResNet-18 trained here for a few epochs on 50,000 CIFAR-shaped images (CIFAR-10
  when under ``$HESSDIST_DATA_ROOT``/data, else SYNTHETIC, labelled), both ends certified at the
  per-value contract (1% on λ_max, 5% on λ_min) by the default path, whole-call seconds, seconds
  per product, FPE, peak memory — in float32, TF32 and compiled, each checked against a float64
  solve on a subset; the minute counts only when the solve converged;
* ``cost`` — one product ÷ one gradient on the full data, and the per-epoch projection
  (benchmarks/projection.py) filled with the measured product seconds.

``--smoke`` runs every check's code on the CPU with tiny sizes in about a minute (a test runs
it) and writes only where ``--out`` says: CPU numbers never land as GPU ones. Without a GPU and
without ``--smoke`` the JSON says "not measured". ``--also-write DIR`` copies the JSON there
(``$OUT`` on the device machine, so it comes back).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from hessdist import precision
from hessdist.curvature import CurvatureOperator, MicroBatchWarning
from hessdist.errors import InputError, NonDeterministicError
from hessdist.examples import cifar10, cifar10_dir, digits
from hessdist.models import ResNet, digits_cnn, resnet18_cifar
from hessdist.solvers.certify import solve
from hessdist.solvers.lanczos import lanczos

from . import projection
from .common import RESULTS, machine

CONTRACT = {"LA": 1e-2, "SA": 5e-2}     # the per-value accuracy users are promised


@dataclass(frozen=True)
class Sizes:
    """How big each check runs: the device's sizes, or the smoke's."""

    device: str
    small_samples: int          # digits images for the small model
    resnet: Callable[[], torch.nn.Module]
    resnet_samples: int         # images for the ResNet product checks
    train_epochs: int
    headline_samples: int
    reference_samples: int      # the float64 reference's subset
    batch_size: int
    limit_s: float              # the whole suite
    headline_budget_s: float    # one certified solve


DEVICE = Sizes("cuda", 512, resnet18_cifar, 256, 3, 50_000, 1_000, 1_000, 540.0, 150.0)
SMOKE = Sizes("cpu", 64, lambda: ResNet(blocks=(1, 1), width=4), 16, 1, 96, 48, 32, 300.0, 60.0)


class Suite:
    """Runs the checks in order, each within the suite's time, and collects their JSON."""

    def __init__(self, sizes: Sizes):
        self.sizes, self.t0, self.checks = sizes, time.perf_counter(), {}
        self.device = torch.device(sizes.device)

    def left_s(self) -> float:
        return self.sizes.limit_s - (time.perf_counter() - self.t0)

    def run(self, name: str, check: Callable[["Suite"], dict], needs_s: float) -> dict:
        if self.left_s() < needs_s:
            out = {"passed": None, "not_run": f"the suite's {self.sizes.limit_s:.0f} s were nearly spent"}
        else:
            t = time.perf_counter()
            try:
                out = check(self)
            except Exception as exc:           # a failed check is a result: the next one still runs
                out = {"passed": False, "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc().splitlines()[-12:]}
            out["seconds"] = time.perf_counter() - t
        self.checks[name] = out
        state = {True: "PASS", False: "FAIL", None: "not run"}[out.get("passed")]
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {name}: {state}", flush=True)
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> tuple[object, float]:
    """``fn()`` after a warm-up, and the median seconds of ``repeats`` calls."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return out, float(np.median(times))


# -- environment --------------------------------------------------------------------------------
def environment(suite: Suite) -> dict:
    cuda = suite.device.type == "cuda"
    nccl = torch.cuda.nccl.version() if cuda else None
    return {"passed": True, "device": torch.cuda.get_device_name(suite.device) if cuda else "cpu (smoke)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
            "python": platform.python_version(), "fp32_precision_in_force": precision.in_force()}


# -- products -----------------------------------------------------------------------------------
#: (name, operator options, tolerance on ‖Av − ref‖/‖ref‖ against a float64 product). float32
#: finite differences are recorded, not judged: their step (√eps_32 · ‖θ‖) crosses ReLU kinks,
#: so on these ReLU networks the error is O(1) on any device (measured on the CPU: 4 to 5);
#: finite differences want float64 (error ~1e-8 here).
CONFIGS = [
    ("float64 forward", dict(dtype=torch.float64, mode="forward"), 1e-10),
    ("float64 double-backward", dict(dtype=torch.float64, mode="double-backward"), 1e-10),
    ("float64 finite-difference", dict(dtype=torch.float64, mode="finite-difference"), 1e-4),
    ("float32 forward", dict(mode="forward"), 1e-4),
    ("float32 double-backward", dict(mode="double-backward"), 1e-4),
    ("float32 finite-difference", dict(mode="finite-difference"), None),  # recorded, not judged (below)
    ("float32 forward channels-last", dict(mode="forward", channels_last=True), 1e-4),
    ("float32 forward compiled", dict(mode="forward", compiled=True), 1e-4),
    ("float32 forward compiled channels-last", dict(mode="forward", compiled=True, channels_last=True), 1e-4),
    ("tf32 forward", dict(mode="forward", tf32=True), 3e-2),
    ("bfloat16 forward", dict(dtype=torch.bfloat16, mode="forward"), 1e-1),
]


def _problems(suite: Suite) -> dict:
    x, y = digits()
    resnet_x, resnet_y = cifar10(n_samples=suite.sizes.resnet_samples)
    return {"digits CNN+BN": (digits_cnn(), (x[:suite.sizes.small_samples], y[:suite.sizes.small_samples])),
            "ResNet-18" if suite.sizes is DEVICE else "tiny ResNet": (suite.sizes.resnet(), (resnet_x, resnet_y))}


def products(suite: Suite) -> dict:
    rows, bs = [], suite.sizes.batch_size
    for problem, (model, data) in _problems(suite).items():
        reference = CurvatureOperator(model, "cross_entropy", data, batch_size=bs, dtype=torch.float64,
                                      device=suite.device)
        V = np.random.default_rng(int(time.time())).standard_normal((reference.n, 2))   # fresh every run
        ref = reference.matmat(V)
        if suite.device.type == "cuda" and problem == "digits CNN+BN":
            cpu = CurvatureOperator(model, "cross_entropy", data, batch_size=bs, dtype=torch.float64)
            err = relative_error(cpu.matmat(V), ref)
            rows.append({"problem": problem, "config": "float64 CUDA vs CPU", "relative_error": err,
                         "tolerance": 1e-10, "passed": err <= 1e-10})
        for name, options, tol in CONFIGS:
            row = {"problem": problem, "config": name, "tolerance": tol}
            if suite.left_s() < 30:
                rows.append({**row, "passed": None, "not_run": "the suite's time was nearly spent"})
                continue
            if options.get("tf32") and suite.device.type != "cuda":
                rows.append({**row, "passed": None, "not_run": "TF32 is CUDA only"})
                continue
            if options.get("compiled") and suite.sizes is SMOKE and (problem != "digits CNN+BN" or
                                                                    options.get("channels_last")):
                rows.append({**row, "passed": None, "not_run": "smoke: one compiled product, the small model's"})
                continue
            options = {"dtype": torch.float32, **options}
            op = CurvatureOperator(model, "cross_entropy", data, batch_size=bs, device=suite.device, **options)
            out, seconds = timed(lambda: op.matmat(V), suite.device)
            err = relative_error(out, ref)
            finite = bool(np.isfinite(out).all())
            want = "tf32" if options.get("tf32") else "ieee"
            flags = op.describe()["fp32_precision"]
            precise = flags is None or all(v == want for v in flags.values())
            judged = finite and precise and (tol is None or err <= tol)
            rows.append({**row, "relative_error": err, "seconds_per_2_columns": seconds, "fp32_precision": flags,
                         "compiles": op.describe()["compiles"], "passed": judged})
    ran = [r["passed"] for r in rows if r["passed"] is not None]
    return {"passed": all(ran), "rows": rows}


# -- determinism ---------------------------------------------------------------------------------
def _refusal(model: torch.nn.Module, data, device: torch.device, error: type) -> str | None:
    """The message the determinism check gives a model kept in train mode (None: it passed)."""
    try:
        CurvatureOperator(model, "cross_entropy", data, device=device, eval_mode=False).check_determinism()
    except error as exc:
        return str(exc)
    return None


def determinism(suite: Suite) -> dict:
    """Dropout in train mode is refused as non-deterministic, BatchNorm in train mode as a model
    that writes its buffers; both pass in eval mode (the default)."""
    x, y = digits()
    data = (x[:suite.sizes.small_samples], y[:suite.sizes.small_samples])
    dropout = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                                  torch.nn.Linear(32, 10))
    for model in (dropout, digits_cnn()):
        CurvatureOperator(model, "cross_entropy", data, device=suite.device).check_determinism()
    refused = {"dropout": _refusal(dropout, data, suite.device, NonDeterministicError),
               "batchnorm": _refusal(digits_cnn(), data, suite.device, InputError)}
    return {"passed": all(refused.values()), "eval_mode": "passed", "train_mode_refused": refused}


# -- data paths ----------------------------------------------------------------------------------
def data_paths(suite: Suite) -> dict:
    model, data = _problems(suite)["ResNet-18" if suite.sizes is DEVICE else "tiny ResNet"]
    kw = dict(batch_size=suite.sizes.resnet_samples // 2, device=suite.device, mode="forward")
    resident = CurvatureOperator(model, "cross_entropy", data, placement="device", **kw)
    streamed = CurvatureOperator(model, "cross_entropy", data, placement="stream", **kw)
    V = np.random.default_rng(int(time.time())).standard_normal((resident.n, 1))
    ref = resident.matmat(V)
    stream_err = relative_error(streamed.matmat(V), ref)
    out = {"streamed_vs_resident": stream_err, "placements": [resident.describe()["data"],
                                                              streamed.describe()["data"]]}
    passed = stream_err <= 1e-6
    if suite.device.type != "cuda":
        return {**out, "passed": passed, "oom": {"not_run": "set_per_process_memory_fraction is CUDA only"}}
    # out of memory on purpose: allow what is held now plus half of what one batch's product adds
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated(suite.device)
    torch.cuda.reset_peak_memory_stats(suite.device)
    resident.matmat(V)
    extra = torch.cuda.max_memory_allocated(suite.device) - held
    total = torch.cuda.get_device_properties(suite.device).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction((held + extra // 2) / total, suite.device)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            halved = resident.matmat(V)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, suite.device)
    oom_err = relative_error(halved, ref)
    warned = any(issubclass(w.category, MicroBatchWarning) for w in caught)
    out["oom"] = {"micro_batch": resident.micro_batch, "batch_size": kw["batch_size"], "warned": warned,
                  "relative_error": oom_err}
    return {**out, "passed": passed and warned and resident.micro_batch < kw["batch_size"] and oom_err <= 1e-6}


# -- collectives ---------------------------------------------------------------------------------
def collectives(suite: Suite) -> dict:
    import torch.distributed as dist

    from hessdist.workers.collectives import agree_across_ranks, all_reduce_sum
    from hessdist.workers.worker import free_port

    x, y = digits()
    data = (x[:suite.sizes.small_samples], y[:suite.sizes.small_samples])
    local = CurvatureOperator(digits_cnn(), "cross_entropy", data, dtype=torch.float64, device=suite.device)
    backend = "nccl" if suite.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60),
                            **({"device_id": suite.device} if backend == "nccl" else {}))
    try:
        grouped = CurvatureOperator(digits_cnn(), "cross_entropy", data, dtype=torch.float64, device=suite.device,
                                    reducer=all_reduce_sum, agree=agree_across_ranks(suite.device))
        V = np.random.default_rng(int(time.time())).standard_normal((local.n, 2))
        err = relative_error(grouped.matmat(V), local.matmat(V))
    finally:
        dist.destroy_process_group()
    out = {"backend": backend, "process_group_product_vs_in_process": err}
    if importlib.util.find_spec("ray") is None:          # the bundle was not carried
        return {**out, "passed": err <= 1e-12, "ray": {"not_run": "Ray does not import: carry the bundle"}}
    out["ray"] = _ray_solve(suite, data, local)
    return {**out, "passed": err <= 1e-12 and out["ray"]["passed"]}


def _ray_solve(suite: Suite, data, local: CurvatureOperator) -> dict:
    """One worker (one GPU on the device) holding the data and its slice of the basis."""
    import ray

    from hessdist.workers import DistributedOperator, OperatorSpec, WorkerGroup, connect
    gpus = 1 if suite.device.type == "cuda" else 0
    connect(num_cpus=2)
    group = WorkerGroup(OperatorSpec(model=digits_cnn, data=lambda: data, dtype="float64"), 1,
                        gpus_per_worker=gpus)
    try:
        distributed = DistributedOperator(group)
        runs = [lanczos(op, which="LA,SA", k=1, rtol=1e-8, seed=5) for op in (distributed, local)]
        worker = group.run("describe")[0]
    finally:
        group.shutdown()
        ray.shutdown()
    values = {end: [float(r.pairs[end].values[0]) for r in runs] for end in ("LA", "SA")}
    gap = max(abs(d - i) / abs(i) for d, i in values.values())
    return {"values_distributed_vs_in_process": values, "relative_gap": gap, "worker_device": worker["device"],
            "passed": gap <= 1e-10 and all(r.converged for r in runs)}


# -- the headline ----------------------------------------------------------------------------------
def train(model: torch.nn.Module, data, epochs: int, device: torch.device, batch_size: int = 256) -> dict:
    """SGD with momentum, a few epochs, in float32: a trained model for the headline (an
    untrained one's spectrum says little about the users' problem)."""
    x, y = data
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx].to(device, non_blocking=True)), y[idx].to(device))
            loss.backward()
            opt.step()
    sync(device)
    model.eval()
    with torch.no_grad():
        accuracy = float(sum((model(xb.to(device)).argmax(1).cpu() == yb).sum() for xb, yb in
                             zip(x.split(1000), y.split(1000)))) / len(x)
    return {"epochs": epochs, "seconds": time.perf_counter() - t, "final_loss": loss.item(),
            "train_accuracy": accuracy}


def certified(model: torch.nn.Module, data, device: torch.device, budget_s: float, batch_size: int,
              **options) -> dict:
    """The whole user-visible call, timed: build the operator, then the default path for both ends
    at the contract. The minute counts only if the answer converged."""
    t = time.perf_counter()
    op = CurvatureOperator(model, "cross_entropy", data, batch_size=batch_size, device=device,
                           mode="forward", **options)
    build_s = time.perf_counter() - t
    answer = solve(op, which="LA,SA", k=1, rtol=CONTRACT, budget_s=budget_s, seed=0, return_vectors=False)
    whole_s = time.perf_counter() - t
    res = answer.result
    return {"lambda_max": float(res.largest.values[0]), "lambda_min": float(res.smallest.values[0]),
            "intervals": {"LA": res.largest.intervals[0].tolist(), "SA": res.smallest.intervals[0].tolist()},
            "converged": bool(res.converged), "stop_reason": res.stop_reason, "hvps": res.hvps, "fpe": res.fpe,
            "whole_call_s": whole_s, "build_s": build_s, "solve_s": res.seconds,
            "seconds_per_product": res.seconds / max(res.hvps, 1), "subset_search": answer.subset is not None,
            "goal_60s_met": bool(res.converged) and whole_s < 60.0, "products": op.describe()}


VARIANTS = {"float32": {}, "tf32": {"tf32": True}, "compiled": {"compiled": True}}
#: seconds the headline leaves for the products table that runs after it
PRODUCTS_RESERVE_S = 120


def headline(suite: Suite) -> dict:
    sz, device = suite.sizes, suite.device
    root = os.path.abspath(os.environ.get("HESSDIST_DATA_ROOT", "data"))
    label = "CIFAR-10" if cifar10_dir(root) else "SYNTHETIC CIFAR-shaped (no CIFAR-10 under --data-root)"
    data = cifar10(root=root, n_samples=sz.headline_samples)
    model = sz.resnet()
    out = {"data": label, "n_samples": len(data[0]), "training": train(model, data, sz.train_epochs, device)}
    picked = torch.from_numpy(np.linspace(0, len(data[0]) - 1, sz.reference_samples).astype(np.int64))
    subset = (data[0][picked], data[1][picked])
    t = time.perf_counter()
    ref_op = CurvatureOperator(model, "cross_entropy", subset, batch_size=sz.batch_size, dtype=torch.float64,
                               device=device)
    ref = lanczos(ref_op, which="LA,SA", k=1, rtol=1e-4, seed=0, return_vectors=False)   # 100× the contract
    out["reference"] = {"samples": sz.reference_samples, "dtype": "float64", "seconds": time.perf_counter() - t,
                        "LA": float(ref.largest.values[0]), "SA": float(ref.smallest.values[0]),
                        "converged": bool(ref.converged)}
    out["variants"], passed = {}, bool(ref.converged)
    for name, options in VARIANTS.items():
        if name == "tf32" and device.type != "cuda":
            out["variants"][name] = {"not_run": "TF32 is CUDA only"}
            continue
        if name == "compiled" and device.type != "cuda":      # a CPU compile takes the smoke's time
            out["variants"][name] = {"not_run": "smoke: the float32 row runs this code, the products table "
                                                "compiled products"}
            continue
        row = {}
        check = certified(model, subset, device, sz.headline_budget_s, sz.batch_size, **options)
        errors = {"LA": abs(check["lambda_max"] - out["reference"]["LA"]) / abs(out["reference"]["LA"]),
                  "SA": abs(check["lambda_min"] - out["reference"]["SA"]) / abs(out["reference"]["SA"])}
        row["subset_vs_float64"] = {"relative_errors": errors, "converged": check["converged"],
                                    "within_contract": all(errors[e] <= CONTRACT[e] for e in CONTRACT)}
        # float32 first: it gets the most; the products table after the headline keeps its time
        budget_s = min(sz.headline_budget_s, suite.left_s() - PRODUCTS_RESERVE_S)
        if budget_s > 30:
            row["full_data"] = certified(model, data, device, budget_s, sz.batch_size, **options)
        else:
            row["full_data"] = {"not_run": "the suite's time was nearly spent"}
        passed &= row["subset_vs_float64"]["within_contract"] and check["converged"]
        out["variants"][name] = row
    full = out["variants"]["float32"].get("full_data", {})
    out["goal_60s_met"] = bool(full.get("goal_60s_met"))
    return {**out, "passed": passed and bool(full.get("converged"))}


# -- cost ------------------------------------------------------------------------------------------
def cost(suite: Suite) -> dict:
    """One full-data product ÷ one full-data gradient (ResNet-18, float32, forward mode), and the
    per-epoch projection with that product's seconds."""
    sz = suite.sizes
    data = cifar10(root=os.path.abspath(os.environ.get("HESSDIST_DATA_ROOT", "data")), n_samples=sz.headline_samples)
    op = CurvatureOperator(sz.resnet(), "cross_entropy", data, batch_size=sz.batch_size, device=suite.device,
                           mode="forward")
    V = np.random.default_rng(int(time.time())).standard_normal((op.n, 1))
    _, gradient_s = timed(op.loss_and_gradient, suite.device, repeats=2)
    _, product_s = timed(lambda: op.matmat(V), suite.device, repeats=2)
    ratio = product_s / gradient_s
    measured_on = torch.cuda.get_device_name(suite.device) if suite.device.type == "cuda" else "cpu (smoke)"
    epochs = projection.load("epochs")
    rows = projection.rows(projection.fpe_cases(epochs), ratio, product_s) if epochs else None
    return {"gradient_s": gradient_s, "product_s": product_s, "product_over_gradient": ratio,
            "goal_product_over_gradient": 2.5, "measured_on": measured_on,
            "projection": {"label": "PROJECTION: measured product seconds × FPE per epoch from epochs.json",
                           "rows": rows},
            "passed": ratio <= 2.5 if suite.device.type == "cuda" else True,
            "judged": "on a GPU only (the goal is a GPU's ratio)"}


#: cheap checks first, then what settles the minute, then the long table of products (each of
#: its rows skipped, and said so, when the suite's time runs out)
CHECKS = [("environment", environment, 0), ("determinism", determinism, 10), ("data_paths", data_paths, 20),
          ("collectives", collectives, 30), ("cost", cost, 30), ("headline", headline, 200),
          ("products", products, 60)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every check's code on the CPU, tiny sizes (~1 min)")
    ap.add_argument("--out", help="where the JSON goes (default benchmarks/results/gpu_suite.json; "
                                  "--smoke writes nothing unless given)")
    ap.add_argument("--also-write", metavar="DIR", help="copy the JSON into DIR too (the device's $OUT)")
    args = ap.parse_args(argv)
    out = args.out or (None if args.smoke else os.path.join(RESULTS, "gpu_suite.json"))
    if not args.smoke and not torch.cuda.is_available():
        payload = {"status": "not measured", "reason": "no CUDA device here; nothing was estimated"}
    else:
        suite = Suite(SMOKE if args.smoke else DEVICE)
        for name, check, needs_s in CHECKS:
            suite.run(name, check, needs_s)
        verdicts = [c.get("passed") for c in suite.checks.values()]
        payload = {"status": "smoke (CPU, tiny sizes: no GPU figure)" if args.smoke else "measured",
                   "passed": all(v is not False for v in verdicts) and None not in verdicts,
                   "seconds": time.perf_counter() - suite.t0, "checks": suite.checks}
    payload = {"machine": machine(), **payload}
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            json.dump(payload, fh, indent=2, default=str)
        print(f"wrote {out}")
        if args.also_write:
            os.makedirs(args.also_write, exist_ok=True)
            shutil.copy(out, args.also_write)
    return 0 if payload.get("passed", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
