"""Distributed products and the sharded basis on a real local Ray cluster (gloo), against the
in-process operator and dense eigendecompositions."""
import functools
import os

import numpy as np
import pytest
import ray
import torch

from hessdist import BatchLoss
from hessdist.data import spread_indices
from hessdist.workers import DistributedOperator, OperatorSpec, WorkerGroup
from hessdist.errors import InputError, NonFiniteError, WorkerError
from hessdist.curvature import CurvatureOperator
from hessdist.solvers.lanczos import lanczos

from . import helpers

pytestmark = pytest.mark.ray
N = 121          # strided shards: 121 = 61+60 = 41+40+40 samples


def data_factory():
    return helpers.digits_subset(N)


def lopsided_data(rank: int, world_size: int):
    """Very unequal shards: rank 0 gets 100 samples (4 batches of 32), the rest share 21."""
    x, y = helpers.digits_subset(N)
    if rank == 0:
        return x[:100], y[:100]
    return x[100 + rank - 1::world_size - 1], y[100 + rank - 1::world_size - 1]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    ray.init(address="local", num_cpus=10, include_dashboard=False, runtime_env={"py_modules": [tests_dir]},
             logging_level="ERROR")
    yield
    ray.shutdown()


def spec(curvature="hessian", data=data_factory, model=helpers.cnn_bn, dtype="float64", **kw):
    return OperatorSpec(model=model, data=data, curvature=curvature, batch_size=32, dtype=dtype, **kw)


def in_process(curvature="hessian"):
    return CurvatureOperator(helpers.cnn_bn(), "cross_entropy", data_factory(), curvature=curvature,
                             batch_size=32, dtype=torch.float64)


@pytest.fixture(scope="module")
def groups():
    made = {w: WorkerGroup(spec(), w, collective_timeout_s=30) for w in (1, 2, 3)}
    yield made
    for g in made.values():
        g.shutdown()


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_distributed_products_equal_in_process(groups, workers, curvature):
    group = groups[workers] if curvature == "hessian" else WorkerGroup(spec("ggn"), workers)
    try:
        op = DistributedOperator(group)
        assert op.n_samples == N
        V = np.random.default_rng(workers).standard_normal((op.n, 3))
        ref = in_process(curvature).matmat(V)
        np.testing.assert_allclose(op.matmat(V), ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    finally:
        if curvature == "ggn":
            group.shutdown()


@pytest.mark.parametrize("workers", [2, 3])
def test_lopsided_shards_do_not_hang_and_weight_by_sample(workers):
    group = WorkerGroup(spec(data=lopsided_data), workers, collective_timeout_s=30, call_timeout_s=120)
    try:
        op = DistributedOperator(group)
        V = np.random.default_rng(0).standard_normal((op.n, 2))
        ref = in_process().matmat(V)
        np.testing.assert_allclose(op.matmat(V), ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    finally:
        group.shutdown()


@functools.lru_cache(maxsize=None)
def dense_spectrum(curvature: str) -> np.ndarray:
    x, y = data_factory()
    model = helpers.cnn_bn()
    M = helpers.dense_hessian(model, x, y) if curvature == "hessian" else helpers.dense_ggn_cross_entropy(model, x, y)
    return torch.linalg.eigvalsh(torch.from_numpy(M)).numpy()


def assert_same_solve(dist, local, lam):
    for end, truth in (("LA", lam[::-1]), ("SA", lam)):
        if end not in dist.pairs:
            continue
        np.testing.assert_allclose(dist.pairs[end].values, local.pairs[end].values, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(dist.pairs[end].values, truth[:len(dist.pairs[end].values)], rtol=1e-8,
                                   atol=1e-11 * abs(lam).max())
        cos = np.abs((dist.pairs[end].vectors * local.pairs[end].vectors).sum(0))
        np.testing.assert_allclose(cos, 1, atol=1e-8)


@pytest.mark.parametrize("max_basis", [None, 16])
def test_sharded_lanczos_matches_in_process_and_dense(groups, max_basis):
    """The basis sharded over 1, 2, 3 workers gives the in-process solve (to 1e-10) and the dense
    eigenvalues, thick restarts included; each worker holds 1/W of the basis."""
    lam = dense_spectrum("hessian")
    local = lanczos(in_process(), which="LA,SA", k=3, tol=1e-10, seed=3, max_basis=max_basis, max_hvps=600)
    peaks = {}
    for workers in (1, 2, 3):
        dist = lanczos(DistributedOperator(groups[workers]), which="LA,SA", k=3, tol=1e-10, seed=3,
                       max_basis=max_basis, max_hvps=600)
        assert dist.converged and dist.restarts == local.restarts and (dist.restarts > 0) == (max_basis is not None)
        assert_same_solve(dist, local, lam)
        peaks[workers] = dist.basis_peak_bytes
    n = groups[1].n
    assert peaks[1] >= local.basis_peak_bytes and peaks[3] <= peaks[1] // 3 + 16 * 8 * 3
    if max_basis:
        assert peaks[1] <= max_basis * n * 8


def test_sharded_ggn_and_lopsided_shards_match_in_process():
    # the GGN's smallest eigenvalue is 0 many times over: one start vector finds one copy, so LA only
    for curvature, data, workers, which in (("ggn", data_factory, 3, "LA"), ("hessian", lopsided_data, 2, "LA,SA")):
        group = WorkerGroup(spec(curvature, data=data), workers, collective_timeout_s=30)
        try:
            local = lanczos(in_process(curvature), which=which, k=2, tol=1e-10, seed=5)
            dist = lanczos(DistributedOperator(group), which=which, k=2, tol=1e-10, seed=5)
            assert local.converged and dist.hvps == local.hvps
            assert_same_solve(dist, local, dense_spectrum(curvature))
        finally:
            group.shutdown()


def test_float32_products_gather_float32_vectors_and_match_in_process():
    """float32 products on a sharded float64 basis: the all-gather sends the vectors in float32,
    the precision the product reads them in (half the bytes), and the solve still matches the
    in-process float32 solve and the dense eigenvalues to float32 accuracy."""
    lam = dense_spectrum("hessian")
    group = WorkerGroup(spec(dtype="float32"), 2, collective_timeout_s=30)
    try:
        op = DistributedOperator(group)
        dist = lanczos(op, which="LA,SA", k=2, rtol=1e-4, seed=5, return_vectors=False)
        basis = op.krylov_basis(capacity=4)
        basis.add_start(np.random.default_rng(0).standard_normal(op.n))
        basis.expand(0)
        gathered = [s["gathered_bytes"] for s in group.run("basis_seconds", basis.id)]
    finally:
        group.shutdown()
    local = lanczos(CurvatureOperator(helpers.cnn_bn(), "cross_entropy", data_factory(), batch_size=32,
                                      dtype=torch.float32), which="LA,SA", k=2, rtol=1e-4, seed=5)
    assert dist.converged and local.converged
    for end, truth in (("LA", lam[::-1][:2]), ("SA", lam[:2])):
        np.testing.assert_allclose(dist.pairs[end].values, local.pairs[end].values, rtol=1e-4)
        np.testing.assert_allclose(dist.pairs[end].values, truth, rtol=2e-4)
    assert gathered == [2 * -(-op.n // 2) * 4] * 2       # one column, every rank's slice: 4 bytes an entry


def test_auto_mode_is_one_choice_for_every_rank_and_reported():
    group = WorkerGroup(spec(mode="auto"), 2, collective_timeout_s=30)
    try:
        modes = {r["mode"] for r in group.run("describe")}
        described = DistributedOperator(group).describe()
        V = np.random.default_rng(0).standard_normal((group.n, 2))
        np.testing.assert_allclose(DistributedOperator(group).matmat(V), in_process().matmat(V), rtol=1e-12, atol=1e-14)
    finally:
        group.shutdown()
    assert len(modes) == 1 and described["mode"] in ("forward", "double-backward")
    assert described["workers"] == 2 and described["micro_batch"] == 32 and described["peak_host_rss_bytes"] > 0


def test_parameters_are_sent_and_used(groups):
    model = helpers.cnn_bn(seed=5)
    op = DistributedOperator(groups[2])
    op.set_parameters(model.state_dict())
    ref = CurvatureOperator(model, "cross_entropy", data_factory(), batch_size=32, dtype=torch.float64)
    V = np.random.default_rng(1).standard_normal((op.n, 1))
    np.testing.assert_allclose(op.matmat(V), ref.matmat(V), rtol=0, atol=1e-12 * np.abs(ref.matmat(V)).max())
    loss, g = op.loss_and_gradient()
    ref_loss, ref_g = ref.loss_and_gradient()
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(g.numpy(), ref_g.numpy(), rtol=0, atol=1e-12 * float(ref_g.abs().max()))
    op.set_parameters(helpers.cnn_bn().state_dict())        # restore for the other tests


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


def test_a_death_inside_a_collective_recovers_in_seconds():
    """Kill a worker while a product's collective is in flight (rank 0 still computes its four
    slow batches; the killed rank, done with its one, waits in the sum): the driver sees the
    death at once, the rebuild kills the survivor blocked in the collective, and the solve
    continues from its checkpoint — long before the 300 s collective timeout, with the
    eigenvalues of an uninterrupted in-process solve."""
    import threading
    import time
    group = WorkerGroup(spec(model=helpers.slow_cnn_bn, data=lopsided_data), 3, collective_timeout_s=300)
    try:
        op = DistributedOperator(group)
        killed = []

        def kill_during_next_product(info):
            if info["hvps"] == 5 and not killed:
                killed.append(group.actors[1])
                threading.Timer(0.4, ray.kill, args=(group.actors[1],)).start()

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
    with pytest.raises(WorkerError, match="cannot provide 1 workers of .*GPU"):
        WorkerGroup(spec(), 1, gpus_per_worker=1, start_timeout_s=3)


def test_module_that_does_not_import_on_a_worker():
    with pytest.raises(InputError, match="on a worker: cannot import module 'not_a_module'"):
        WorkerGroup(spec(model="not_a_module:make"), 1, start_timeout_s=60)


def test_subset_density_trace_and_line_through_workers(groups):
    """Issue-5 features on the worker group give the in-process numbers: a subset (half of each
    rank's strided shard, spread evenly over it), SLQ, Hutch++ and a line scan."""
    from hessdist.directions import line_scan
    from hessdist.solvers.slq import slq
    from hessdist.solvers.trace import hutchpp
    dist_op, local = DistributedOperator(groups[2]), in_process()
    dist_op.set_parameters(local.model.state_dict())
    x, y = data_factory()
    kept = torch.cat([torch.arange(N)[r::2][spread_indices(len(range(r, N, 2)), 0.5)] for r in (0, 1)])
    sub, ref = dist_op.subset(0.5), CurvatureOperator(helpers.cnn_bn(), "cross_entropy", (x[kept], y[kept]),
                                                      batch_size=32, dtype=torch.float64)
    V = np.random.default_rng(0).standard_normal((local.n, 2))
    assert sub.n_samples == 61 and sub.data_fraction == 61 / N
    np.testing.assert_allclose(sub.matmat(V), ref.matmat(V), rtol=1e-10, atol=1e-13)
    d_dist, d_local = slq(dist_op, probes=2, steps=12, seed=1), slq(local, probes=2, steps=12, seed=1)
    for a, b in zip(d_dist.nodes, d_local.nodes):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert abs(hutchpp(dist_op, hvps=12, seed=2).value - hutchpp(local, hvps=12, seed=2).value) < 1e-9
    v = V[:, 0]
    np.testing.assert_allclose(line_scan(dist_op, v, [-0.1, 0.1]).loss, line_scan(local, v, [-0.1, 0.1]).loss,
                               rtol=1e-12)


def test_streamed_shards_and_a_ray_dataset_give_the_resident_products():
    """Shards streamed on every product, and a ray.data dataset split once by the driver (two
    columns, lopsided blocks), give the in-process resident products."""
    x, y = data_factory()
    ds = ray.data.from_items([{"image": x[i].numpy(), "label": int(y[i])} for i in range(N)]).repartition(3)
    V = np.random.default_rng(4).standard_normal((in_process().n, 2))
    ref = in_process().matmat(V)
    for data, kw in ((data_factory, {"placement": "stream"}), (ds, {"data_columns": ("image", "label")}),
                     (ds, {"placement": "stream"})):
        group = WorkerGroup(spec(data=data, **kw), 2, collective_timeout_s=30)
        try:
            op = DistributedOperator(group)
            assert op.n_samples == N
            assert {r["data"] for r in group.run("describe")} == {kw.get("placement", "device")}
            np.testing.assert_allclose(op.matmat(V), ref, rtol=0, atol=1e-12 * np.abs(ref).max())
        finally:
            group.shutdown()


def test_dict_batches_and_token_weighting_on_workers_equal_in_process():
    """A GPT-2 on dict batches whose shards hold different numbers of predicted tokens: the
    sum over workers weights every token once, as the in-process operator does; and a solve
    through the workers finds the dense extreme eigenvalues."""
    loss = BatchLoss("causal_lm", "predicted_tokens")
    gpt2 = OperatorSpec(model=helpers.tiny_gpt2, data=helpers.gpt2_tokens, loss=loss, batch_size=5,
                        dtype="float64", params=helpers.GPT2_PARAMS)
    local = CurvatureOperator(helpers.tiny_gpt2(), loss, helpers.gpt2_tokens(), batch_size=5, dtype=torch.float64,
                              params=helpers.GPT2_PARAMS)
    lam = np.linalg.eigvalsh(helpers.dense_gpt2_hessian(helpers.tiny_gpt2(), helpers.gpt2_tokens()).numpy())
    group = WorkerGroup(gpt2, 3, collective_timeout_s=30)
    try:
        op = DistributedOperator(group)
        assert op.n_samples == local.n_samples
        V = np.random.default_rng(5).standard_normal((op.n, 3))
        ref = local.matmat(V)
        np.testing.assert_allclose(op.matmat(V), ref, rtol=0, atol=1e-12 * np.abs(ref).max())
        res = lanczos(op, which="LA,SA", tol=1e-10, seed=0)
        np.testing.assert_allclose([res.largest.values[0], res.smallest.values[0]], [lam[-1], lam[0]], rtol=1e-8)
    finally:
        group.shutdown()


def test_sharded_basis_memory_per_worker_within_its_share_of_the_cap():
    """Two million parameters on two workers: each holds half of every basis vector, never more
    than max_basis of them."""
    from .test_basis import Wide, wide_data
    group = WorkerGroup(OperatorSpec(model=Wide, data=wide_data, batch_size=32,
                                     mode="double-backward"), 2, collective_timeout_s=60)
    try:
        op = DistributedOperator(group)
        res = lanczos(op, which="LA,SA", k=1, tol=1e-3, seed=0, max_basis=12, max_hvps=40)
        assert res.restarts > 0 and 0 < res.basis_peak_bytes <= 12 * -(-op.n // 2) * 8
    finally:
        group.shutdown()


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
    WorkerGroup(OperatorSpec(model="tests.helpers:mlp", data="tests.test_workers:data_factory"), 1,
                gpus_per_worker=1, start_timeout_s=120)
except WorkerError as exc:
    out["no_cuda"] = str(exc)
ray.shutdown()
cluster.shutdown()
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
from tests.test_workers import spec
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 0}})
cluster.add_node(num_cpus=2)
lose = cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
connect(cluster.address, runtime_env={{"py_modules": [{tests_dir!r}]}})
group = WorkerGroup(spec(), 3, min_workers=1, start_timeout_s=30, collective_timeout_s=60)
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
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["nodes_before"] == 2 and got["workers"] == 2 and got["recoveries"] == 1 and got["converged"]
    assert len(got["replacements"]) == 1 and "shrunk from 3 to 2 workers" in got["replacements"][0]
    ref = lanczos(in_process(), which="LA,SA", k=1, tol=1e-9, seed=5)
    for end in ("LA", "SA"):
        np.testing.assert_allclose(got[end], ref.pairs[end].values, rtol=1e-8)
