"""Shared pieces of the benchmarks: problems, machine description, JSON output."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from typing import Iterator

import torch

from hessdist.examples import digits, get_example, train_full_batch
from hessdist.curvature import CurvatureOperator
from hessdist.models import digits_cnn
from hessdist.precision import in_force

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu_count": os.cpu_count(), "gpu": gpu or "none (GPU figures: not measured)",
            "torch": torch.__version__, "python": platform.python_version(),
            # hessdist's data passes set IEEE float32 (TF32 only where a row says tf32); outside them:
            "fp32_precision_outside_passes": in_force(), "fp32_precision_in_passes": "ieee unless tf32",
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def best_of(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn``, in seconds."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def write(name: str, payload: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as fh:
        json.dump({"machine": machine(), **payload}, fh, indent=2)
    print(f"wrote {path}")
    return path


def merged_rows(name: str, rows: list[dict], key: str = "problem") -> list[dict]:
    """``rows`` plus the rows of an earlier ``name``.json for problems not rerun now, so one
    problem can be rerun (say, on a GPU) without losing the others."""
    path = os.path.join(RESULTS, f"{name}.json")
    old = json.load(open(path)).get("rows", []) if os.path.exists(path) else []
    fresh = {r[key] for r in rows}
    return [r for r in old if r[key] not in fresh] + rows


@contextlib.contextmanager
def ray_operator(model: torch.nn.Module, data, workers: int, **spec) -> Iterator:
    """A DistributedOperator over ``workers`` Ray workers (1 CPU each) on a local Ray cluster
    started for it, each holding a copy of ``model`` and a strided shard of ``data``; the
    workers and the cluster are shut down afterwards."""
    import ray

    from hessdist.workers import DistributedOperator, OperatorSpec, WorkerGroup, connect
    connect(num_cpus=workers)
    group = WorkerGroup(OperatorSpec(model=lambda: model, data=lambda: data, **spec), workers)
    try:
        yield DistributedOperator(group)
    finally:
        group.shutdown()
        ray.shutdown()


def trained_model(name: str):
    """(model, data) for digits-mlp, digits-cnn, or cnn-100k (a 95k-parameter digits CNN)."""
    if name == "cnn-100k":
        model, data = digits_cnn(width=64), digits()
        train_full_batch(model, data, steps=40)
        return model, data
    ex = get_example(name)
    model, data = ex.model(), ex.data()
    ex.train(model, data)
    return model, data


def operator(name: str, dtype=torch.float64, **kw) -> CurvatureOperator:
    model, data = trained_model(name)
    kw.setdefault("batch_size", 2048)
    kw.setdefault("mode", "double-backward")
    return CurvatureOperator(model, "cross_entropy", data, dtype=dtype, **kw)
