"""Worker groups when things go wrong, on real Ray clusters: a worker killed mid-solve or inside
a collective, a rebuild that fails, an error on one rank, resources the cluster lacks, a module
a worker cannot import, a GPU the workers' torch cannot use, a node lost mid-solve."""
import functools
import os

import numpy as np
import pytest
import ray
import torch

from hessdist.curvature import CurvatureOperator
from hessdist.errors import InputError, NonFiniteError, WorkerError
from hessdist.solvers.lanczos import lanczos
from hessdist.workers import DistributedOperator, WorkerGroup

from . import helpers
from .service_setup import failure
from .workers_setup import N, in_process, lopsided_data, spec

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]


@pytest.mark.parametrize("workers", [2, 1])
def test_killed_worker_mid_solve_same_eigenvalues_lost_work_reported(workers):
    """Kill a worker mid-solve: its basis slices are gone, the group is rebuilt and the solve
    continues from the last checkpointed Ritz vectors; same eigenvalues, the lost products and
    the rebuild reported."""
    group = WorkerGroup(spec(), workers, collective_timeout_s=20)
    try:
        op = DistributedOperator(group)
        clean = lanczos(op, which="LA,SA", k=2, tol=1e-10, seed=7)
        killed = []

        def kill_once(info):
            if info["hvps"] == 7 and not killed:
                killed.append(group.actors[-1])
                ray.kill(group.actors[-1])

        res = lanczos(op, which="LA,SA", k=2, tol=1e-10, seed=7, checkpoint_every=3, callback=kill_once)
        assert killed and len(group.replacements) == 1 and "died" in group.replacements[0]
        assert res.converged and res.recoveries == 1 and res.products_redone == 1     # checkpoint at 6, lost at 7
        for end in ("LA", "SA"):
            np.testing.assert_allclose(res.pairs[end].values, clean.pairs[end].values, rtol=1e-9)
    finally:
        group.shutdown()


def test_a_death_inside_a_collective_recovers_in_seconds(tmp_path):
    """Kill a worker while a product's collective is in flight (rank 0 still computes its four
    slowed batches; the killed rank, done with its one, waits in the sum): the driver sees the
    death at once, the rebuild kills the survivor blocked in the collective, and the solve
    continues from its checkpoint — long before the 300 s collective timeout, with the
    eigenvalues of an uninterrupted in-process solve. Only the interrupted product is slowed
    (its forward passes pause while a marker file exists)."""
    import threading
    import time
    marker = str(tmp_path / "slow")
    group = WorkerGroup(spec(model=functools.partial(helpers.slow_cnn_bn, while_exists=marker), data=lopsided_data),
                        2, collective_timeout_s=300)
    try:
        op = DistributedOperator(group)
        killed = []

        def kill(actor):
            ray.kill(actor)
            os.remove(marker)

        def kill_during_next_product(info):
            if info["hvps"] == 5 and not killed:
                killed.append(group.actors[1])
                open(marker, "w").close()
                threading.Timer(0.4, kill, args=(group.actors[1],)).start()

        t0 = time.monotonic()
        res = lanczos(op, which="LA,SA", k=1, tol=1e-8, seed=3, checkpoint_every=2, callback=kill_during_next_product)
        seconds = time.monotonic() - t0
        assert killed and len(group.replacements) == 1 and res.recoveries == 1
        assert seconds < 150, seconds
        ref = lanczos(CurvatureOperator(helpers.cnn_bn(), "cross_entropy", helpers.digits_subset(N), batch_size=32,
                                        dtype=torch.float64), which="LA,SA", k=1, tol=1e-8, seed=3)
        for end in ("LA", "SA"):
            np.testing.assert_allclose(res.pairs[end].values, ref.pairs[end].values, rtol=1e-7)
    finally:
        group.shutdown()


def refusing_data(marker: str, rank: int, world_size: int):
    """The strided shard, unless the file ``marker`` exists (then building the worker fails)."""
    if os.path.exists(marker):
        raise RuntimeError(f"{marker} exists: this worker refuses to start")
    return helpers.digits_subset(N)


def test_restart_budget_is_per_time_window_and_a_failed_rebuild_is_retried(tmp_path):
    """max_restarts counts rebuilds in the last restart_window_s seconds, not in the group's
    life; a rebuild that fails (a worker cannot start) leaves no actors, and the next call
    rebuilds and answers."""
    import time
    marker = str(tmp_path / "refuse")
    group = WorkerGroup(spec(data=functools.partial(refusing_data, marker)), 1, max_restarts=1,
                        restart_window_s=600, collective_timeout_s=20)
    try:
        op = DistributedOperator(group)
        v = np.random.default_rng(0).standard_normal(op.n)
        want = op.matvec(v)
        ray.kill(group.actors[0])
        np.testing.assert_array_equal(op.matvec(v), want)                  # rebuilt once
        ray.kill(group.actors[0])
        with pytest.raises(WorkerError, match="rebuilt 1 times in the last 600 s"):
            op.matvec(v)                                                   # twice within the window: refused
        group.restart_window_s = 1                                         # a short window, and let it pass
        time.sleep(1.5)
        open(marker, "w").close()
        with pytest.raises(WorkerError, match="refuses to start"):
            op.matvec(v)                                                   # allowed again; the rebuild fails
        assert group.actors == []
        os.remove(marker)
        time.sleep(1.5)
        np.testing.assert_array_equal(op.matvec(v), want)                  # the next call rebuilds and answers
        assert len(group.replacements) == 3
    finally:
        group.shutdown()


def nan_in_rank_1(rank: int, world_size: int):
    """Strided shards with one NaN input on rank 1, in its second batch (the first passes the
    start-up check)."""
    x, y = helpers.digits_subset(N)
    x, y = x[rank::world_size].clone(), y[rank::world_size]
    if rank == 1:
        x[-1, 0] = float("nan")
    return x, y


def test_an_error_on_one_rank_reaches_every_rank_and_leaves_the_group_clean():
    """A NaN in one worker's shard: the user sees that rank's NonFiniteError at once (not after
    the collective timeout the other rank would wait in), and the next collective call on the
    same group lines up (an orphaned all-reduce would pair with it or block it)."""
    import time
    group = WorkerGroup(spec(data=nan_in_rank_1), 2, collective_timeout_s=300)
    try:
        op = DistributedOperator(group)
        v = np.random.default_rng(0).standard_normal(op.n)
        t0 = time.monotonic()
        with pytest.raises(NonFiniteError, match="on rank 1"):
            op.matvec(v)
        basis = op.krylov_basis(capacity=4)              # a sharded basis: all-reduces on both ranks
        assert basis.add_start(v) == pytest.approx(1.0)
        assert basis.combine(np.eye(1)).ravel() == pytest.approx(v / np.linalg.norm(v))
        assert time.monotonic() - t0 < 100 and not group.replacements     # far below the 300 s timeout
    finally:
        group.shutdown()


def test_too_many_resources_fail_fast_with_a_message():
    """Resources the live nodes lack: at once with grow_timeout_s=0 (a fixed cluster), after the
    start timeout by default; resources that exist but stay busy: after the start timeout."""
    import time
    from ray.util.placement_group import placement_group, remove_placement_group
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="cannot provide 1 workers of .*GPU.*: its live nodes hold 0"):
        WorkerGroup(spec(), 1, gpus_per_worker=1, start_timeout_s=120, grow_timeout_s=0)
    assert time.monotonic() - t0 < 20
    with pytest.raises(WorkerError, match=r"cannot provide 1 workers of .*GPU.*hold 0 .waited \d+ s"):
        WorkerGroup(spec(), 1, gpus_per_worker=1, start_timeout_s=3)
    every_cpu = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
    ray.get(every_cpu.ready(), timeout=60)
    try:
        with pytest.raises(WorkerError, match="cannot provide 1 workers .*not freed within 2 s"):
            WorkerGroup(spec(), 1, start_timeout_s=2, grow_timeout_s=0)
    finally:
        remove_placement_group(every_cpu)


def test_module_that_does_not_import_on_a_worker():
    with pytest.raises(InputError, match="on a worker: cannot import module 'not_a_module'"):
        WorkerGroup(spec(model="not_a_module:make"), 1, start_timeout_s=60)


def test_worker_layout_reads_the_cluster_not_the_driver():
    """A GPU cluster whose head has no GPU (simulated: a CPU head and a node declaring 3 logical
    GPUs; the driver's torch.cuda is never asked): the defaults come from the cluster; a
    fraction of a GPU, or more than one, is refused; a worker Ray gives a GPU that this CPU build
    of torch cannot use fails loudly instead of running on the CPU. Run in a process of its own
    (this module holds a Ray session)."""
    import json
    import subprocess
    import sys
    code = """
import json, ray
from ray.cluster_utils import Cluster
from hessdist.errors import WorkerError
from hessdist.workers import OperatorSpec, WorkerGroup, connect, worker_layout
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
cluster.add_node(num_cpus=3, num_gpus=3)
cluster.wait_for_nodes()
connect(cluster.address)
out = {"default": worker_layout(), "asked": worker_layout(2, 1), "cpu": worker_layout(None, 0)}
try:
    worker_layout(None, 0.5)
except WorkerError as exc:
    out["fraction"] = str(exc)
try:
    worker_layout(None, 2)
except WorkerError as exc:
    out["two"] = str(exc)
try:
    WorkerGroup(OperatorSpec(model="tests.helpers:mlp", data="tests.workers_setup:data_factory"), 1,
                gpus_per_worker=1, start_timeout_s=120)
except WorkerError as exc:
    out["no_cuda"] = str(exc)
ray.shutdown()
cluster.shutdown()
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure(proc)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["default"][:2] == [3, 1] and "cluster with 3 GPU(s)" in got["default"][2]
    assert got["asked"] == [2, 1, "2 worker(s) with 1 GPU each"]
    assert got["cpu"][:2] == [2, 0]
    assert "not a whole number of GPUs" in got["fraction"] and "NCCL" in got["fraction"]
    assert "--gpus-per-worker 1 with one worker per GPU" in got["two"]
    assert "torch cannot use CUDA" in got["no_cuda"] and "--gpus-per-worker 0" in got["no_cuda"]


def test_worker_device_is_the_one_ray_assigned():
    """Ray's assignment, not torch's view, picks the device: no GPU ids means CPU even where CUDA
    is visible; an id maps to its position among the visible devices (or stands for itself when
    Ray leaves CUDA_VISIBLE_DEVICES alone); two GPUs for one rank are refused."""
    from hessdist.workers.worker import assigned_device
    assert assigned_device([], "0,1,2,3", True) == torch.device("cpu")
    assert assigned_device(["2"], "2", True) == torch.device("cuda", 0)
    assert assigned_device(["3"], "1,3", True) == torch.device("cuda", 1)
    assert assigned_device(["3"], None, True) == torch.device("cuda", 3)
    with pytest.raises(WorkerError, match="given 2 GPUs"):
        assigned_device(["0", "1"], "0,1", True)
    with pytest.raises(WorkerError, match="torch cannot use CUDA"):
        assigned_device(["0"], "0", False)


def test_a_lost_node_shrinks_the_group_and_the_solve_finishes():
    """A multi-node cluster simulated on this machine (a head without CPUs, a 2-CPU node and a
    1-CPU node): three ranks over both nodes; the 1-CPU node is removed mid-solve; the group is
    rebuilt on what is left — two workers, the data re-sharded — and the solve finishes with the
    eigenvalues of the in-process solve, saying what happened. Run in a process of its own."""
    import json
    import subprocess
    import sys
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = f"""
import json, sys
sys.path.insert(0, {os.path.dirname(tests_dir)!r})
import ray
from ray.cluster_utils import Cluster
from hessdist.workers import DistributedOperator, WorkerGroup, connect
from hessdist.solvers.lanczos import lanczos
from tests.workers_setup import spec
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 0}})
cluster.add_node(num_cpus=2)
lose = cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
connect(cluster.address, runtime_env={{"py_modules": [{tests_dir!r}]}})
group = WorkerGroup(spec(), 3, min_workers=1, start_timeout_s=30, grow_timeout_s=0, collective_timeout_s=60)
nodes = len({{p["node_id"] for p in group.placements}})
removed = []
def remove_node(info):
    if info["hvps"] == 5 and not removed:
        removed.append(cluster.remove_node(lose))
res = lanczos(DistributedOperator(group), which="LA,SA", k=1, tol=1e-9, seed=5, checkpoint_every=2,
              callback=remove_node)
print(json.dumps({{"LA": res.pairs["LA"].values.tolist(), "SA": res.pairs["SA"].values.tolist(),
                  "nodes_before": nodes, "workers": group.size, "replacements": group.replacements,
                  "recoveries": res.recoveries, "converged": res.converged}}))
group.shutdown()
ray.shutdown()
cluster.shutdown()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, failure(proc)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["nodes_before"] == 2 and got["workers"] == 2 and got["recoveries"] == 1 and got["converged"]
    assert len(got["replacements"]) == 1 and "shrunk from 3 to 2 workers" in got["replacements"][0]
    ref = lanczos(in_process(), which="LA,SA", k=1, tol=1e-9, seed=5)
    for end in ("LA", "SA"):
        np.testing.assert_allclose(got[end], ref.pairs[end].values, rtol=1e-8)
