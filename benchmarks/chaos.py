"""Chaos: the eigen-service on a simulated 3-node cluster (``ray.cluster_utils``; a head without
CPUs and three 1-CPU worker nodes) serving consecutive solves while a worker process or a whole
node is killed at random moments (a removed node is replaced by a fresh one). The trainer does
what a user would: it resubmits a step the service says was lost.

Each answer is checked against an in-process float64 solve at the same parameters (the
service's certified intervals must contain the reference values). A failure-free run of the
same solves on the same cluster first gives the seconds a solve takes without failures.

JSON (benchmarks/results/chaos.json): ``solves_completed``, ``wrong_answers``, ``lost_answers``
(steps never answered), ``resubmitted``, ``failures`` (what was killed, when), ``products_redone``,
``seconds_lost_per_failure``.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import tempfile
import time

import torch

from hessdist.curvature import CurvatureOperator
from hessdist.errors import WorkerError
from hessdist.examples import get_example
from hessdist.solvers.lanczos import lanczos

from .common import write

RTOL = {"LA": 1e-6, "SA": 1e-4}


def nudged(state: dict, step: int) -> dict:
    """The trained parameters moved a little per step (a stand-in for training)."""
    out = {k: v.clone() for k, v in state.items()}
    out["1.weight"] += 1e-3 * step * torch.ones_like(out["1.weight"])
    return out


def reference(model, data, state: dict) -> dict:
    model.load_state_dict(state)
    op = CurvatureOperator(model, "cross_entropy", data, dtype=torch.float64, batch_size=2048)
    res = lanczos(op, which="LA,SA", k=1, rtol={"LA": 1e-10, "SA": 1e-8}, tol=1e-14, seed=0)
    if not (res.converged and all(m == "rtol" for p in res.pairs.values() for m in p.met)):
        raise RuntimeError(f"the reference did not reach its accuracy ({res.stop_reason})")
    return {"largest": float(res.largest.values[0]), "smallest": float(res.smallest.values[0])}


def contains(result: dict, ref: dict) -> bool:
    """Both reference values inside the service's certified intervals (a hair of rounding allowed)."""
    ok = True
    for end in ("largest", "smallest"):
        lo, hi = result["intervals"][end][0]
        slack = 1e-9 * abs(ref[end])
        ok &= (lo is None or lo - slack <= ref[end]) and (hi is None or ref[end] <= hi + slack)
    return bool(ok)


def run_solves(handle, states: list[dict], refs: list[dict], first_step: int, chaos: "Chaos | None") -> dict:
    out = {"completed": 0, "wrong": 0, "lost": 0, "resubmitted": 0, "redone": 0, "replaced": 0, "seconds": 0.0}
    t0 = time.monotonic()
    for i, (state, ref) in enumerate(zip(states, refs)):
        step = first_step + i
        for attempt in range(3):
            fut = handle.submit(state, step=step, rtol=RTOL)
            if chaos is not None and attempt == 0:
                chaos.maybe_strike(handle)
            try:
                r = handle.result(fut, timeout_s=600)
            except WorkerError as exc:
                if "submit this step again" not in str(exc):
                    raise
                out["resubmitted"] += 1           # the handle waits out the service's restart
                continue
            out["completed"] += 1
            if not contains(r, ref):
                out["wrong"] += 1
                out.setdefault("wrong_details", []).append(
                    {"step": step, "reference": ref, "largest": r["largest"], "smallest": r["smallest"],
                     "intervals": r["intervals"], "warm_start": r["warm_start"]})
            out["redone"] += r.get("products_redone", 0)
            out["replaced"] += r.get("workers_replaced", 0)
            break
        else:
            out["lost"] += 1
    out["seconds"] = time.monotonic() - t0
    return out


class Chaos:
    """Kills a worker process or removes a worker node (and adds a fresh one) at a random moment
    after a submit, with probability ``p`` per solve."""

    def __init__(self, cluster, nodes: list, p: float, seed: int):
        self.cluster, self.nodes, self.p = cluster, nodes, p
        self.rng = random.Random(seed)
        self.failures: list[dict] = []

    def maybe_strike(self, handle) -> None:
        """After a random pause (the solve runs meanwhile), in this thread: cluster_utils removes
        nodes with signals, which only the main thread may use."""
        if self.rng.random() >= self.p:
            return
        delay, kind = self.rng.uniform(0.0, 1.0), self.rng.choice(["worker", "node"])
        pids = handle.status()["worker_pids"]
        time.sleep(delay)
        if kind == "worker":
            pid = self.rng.choice(pids)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
        else:
            node = self.nodes.pop(self.rng.randrange(len(self.nodes)))
            self.cluster.remove_node(node)
            self.nodes.append(self.cluster.add_node(num_cpus=1))
        self.failures.append({"kind": kind, "at": time.time()})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--solves", type=int, default=20)
    ap.add_argument("--p", type=float, default=0.4, help="chance of a failure per solve")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import ray
    from ray.cluster_utils import Cluster

    from hessdist import service
    from hessdist.workers import OperatorSpec, connect

    ex = get_example("digits-mlp")
    model, data = ex.model(), ex.data()
    ex.train(model, data)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = [nudged(base, s) for s in range(2 * args.solves)]
    print("references ...", flush=True)
    refs = [reference(model, data, s) for s in states]

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    connect(cluster.address)
    spec = OperatorSpec(model="hessdist.models:digits_mlp", data="hessdist.examples:digits",
                        batch_size=2048, dtype="float64")
    out_dir = tempfile.mkdtemp(prefix="hessdist-chaos-")
    # failures every few seconds are far above any real rate: the rebuild budget is raised to match
    group_options = {"min_workers": 1, "start_timeout_s": 30, "max_restarts": 100}
    handle = service.start("chaos", spec, 3, out_dir, group_options=group_options)
    try:
        print("failure-free ...", flush=True)
        calm = run_solves(handle, states[:args.solves], refs[:args.solves], 0, None)
        print(calm, flush=True)
        print("with failures ...", flush=True)
        chaos = Chaos(cluster, nodes, args.p, args.seed)
        rough = run_solves(handle, states[args.solves:], refs[args.solves:], args.solves, chaos)
        print(rough, flush=True)
        failures = max(len(chaos.failures), 1)
        write("chaos", {
            "config": {**vars(args), "nodes": "head (0 CPUs) + 3 × 1 CPU, ray.cluster_utils", "workers": 3,
                       "group_options": group_options, "rtol": RTOL, "model": "digits-mlp (real data), float64"},
            "solves_completed": rough["completed"], "wrong_answers": rough["wrong"] + calm["wrong"],
            "lost_answers": rough["lost"], "resubmitted": rough["resubmitted"], "failures": chaos.failures,
            "workers_replaced": rough["replaced"], "products_redone": rough["redone"],
            "seconds_failure_free": calm["seconds"], "seconds_with_failures": rough["seconds"],
            "seconds_lost_per_failure": (rough["seconds"] - calm["seconds"]) / failures,
            "workers_at_end": handle.status()["workers"]})
    finally:
        handle.stop()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
