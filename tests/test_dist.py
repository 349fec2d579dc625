"""Distributed products on a real local Ray cluster (gloo) against the in-process operator."""
import os

import numpy as np
import pytest
import ray
import torch

from hessdist.data import spread_indices
from hessdist.dist import DistributedOperator, OperatorSpec, WorkerGroup
from hessdist.errors import InputError, WorkerError
from hessdist.hvp import CurvatureOperator
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
    ray.init(num_cpus=10, include_dashboard=False, runtime_env={"py_modules": [tests_dir]},
             logging_level="ERROR")
    yield
    ray.shutdown()


def spec(curvature="hessian", data=data_factory, model=helpers.cnn_bn, **kw):
    return OperatorSpec(model=model, data=data, curvature=curvature, batch_size=32, dtype="float64", **kw)


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


def test_distributed_lanczos_matches_in_process(groups):
    local = lanczos(in_process(), which="LA,SA", k=3, tol=1e-10, seed=3)
    for workers in (1, 2, 3):
        dist = lanczos(DistributedOperator(groups[workers]), which="LA,SA", k=3, tol=1e-10, seed=3)
        assert dist.hvps == local.hvps
        for end in ("LA", "SA"):
            np.testing.assert_allclose(dist.pairs[end].values, local.pairs[end].values, rtol=1e-12)
            cos = np.abs((dist.pairs[end].vectors * local.pairs[end].vectors).sum(0))
            np.testing.assert_allclose(cos, 1, atol=1e-9)


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
def test_killed_worker_is_replaced_and_nothing_is_lost(workers):
    """Kill a worker mid-solve: the group is rebuilt, the basis carried over (from a survivor,
    or by replay when the only worker died) and the answer is the same."""
    group = WorkerGroup(spec(), workers, collective_timeout_s=20)
    try:
        op = DistributedOperator(group)
        clean = lanczos(op, which="LA,SA", k=2, tol=1e-10, seed=7)
        killed = []

        def kill_once(info):
            if info["hvps"] == 6 and not killed:
                killed.append(group.actors[-1])
                ray.kill(group.actors[-1])

        before = op.hvps
        res = lanczos(op, which="LA,SA", k=2, tol=1e-10, seed=7, callback=kill_once)
        assert killed and len(group.replacements) == 1 and "died" in group.replacements[0]
        assert res.hvps == clean.hvps
        for end in ("LA", "SA"):
            np.testing.assert_allclose(res.pairs[end].values, clean.pairs[end].values, rtol=1e-12)
        replayed = op.hvps - before - res.hvps
        assert replayed == (0 if workers > 1 else 6)   # a survivor's copy costs no products
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
