"""Distributed products and the sharded basis on a real local Ray cluster (gloo), against the
in-process operator and dense eigendecompositions."""
import functools

import numpy as np
import pytest
import ray
import torch

from hessdist import BatchLoss
from hessdist.data import spread_indices
from hessdist.errors import InputError
from hessdist.workers import DistributedOperator, OperatorSpec, WorkerGroup
from hessdist.curvature import CurvatureOperator
from hessdist.solvers.lanczos import lanczos
from hessdist.studies.along import along
from hessdist.studies.decompose import decompose_at
from hessdist.studies.rank import rank
from hessdist.studies.subset_vs_full import compare_subset
from hessdist.studies.verify import verify

from . import helpers
from .workers_setup import N, data_factory, in_process, lopsided_data, respecced, spec

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]


@pytest.fixture(scope="module")
def groups():
    """Groups of 1, 2 and 3 workers on :func:`spec`, shared by the module: a test that needs
    another spec rebuilds their operators in place (``respecced``) instead of starting workers."""
    made = {w: WorkerGroup(spec(), w, collective_timeout_s=60, call_timeout_s=120) for w in (1, 2, 3)}
    yield made
    for g in made.values():
        g.shutdown()


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("curvature", ["hessian", "ggn", "empirical-fisher", "residual"])
def test_distributed_products_equal_in_process(groups, workers, curvature):
    op = DistributedOperator(groups[workers])
    op = op if curvature == "hessian" else op.with_curvature(curvature)   # the same workers, another curvature
    assert op.n_samples == N and op.curvature == curvature
    V = np.random.default_rng(workers).standard_normal((op.n, 3))
    ref = in_process(curvature).matmat(V)
    np.testing.assert_allclose(op.matmat(V), ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_a_curvature_view_solves_on_sharded_workers_as_in_process(groups):
    """The empirical Fisher and H − G of the hessian group's workers: a sharded solve of each
    equals the in-process one and the dense eigenvalues; an unknown curvature is refused."""
    for curvature, which in (("empirical-fisher", "LA"), ("residual", "LA,SA")):
        op = DistributedOperator(groups[2]).with_curvature(curvature)
        local = lanczos(in_process(curvature), which=which, k=2, tol=1e-10, seed=5)
        dist = lanczos(op, which=which, k=2, tol=1e-10, seed=5)
        assert local.converged and dist.hvps == local.hvps
        assert_same_solve(dist, local, dense_spectrum(curvature))
    with pytest.raises(InputError, match="curvature must be one of"):
        DistributedOperator(groups[2]).subset(0.5).with_curvature("fisher")


def test_studies_on_workers_give_the_in_process_numbers(groups):
    """decompose and along on 2 workers: the in-process numbers to float64 rounding; the exact
    rank's dense matrix against the dense spectrum, verify against the dense Hessian; subset against the dense Hessians of the
    samples it keeps and of all of them."""
    dist, local = DistributedOperator(groups[2]), in_process()
    close = functools.partial(np.testing.assert_allclose, rtol=1e-9, atol=1e-12)
    a, b = (decompose_at(op, tol=1e-2, trace_hvps=6, seed=3) for op in (dist, local))
    for curvature in a:
        close([a[curvature][key] for key in ("largest", "smallest", "trace")],
              [b[curvature][key] for key in ("largest", "smallest", "trace")], err_msg=curvature)
    exact = rank(dist, relative=1e-2, method="exact")
    lam = dense_spectrum("hessian")
    close(exact["eigenvalues"], lam, atol=1e-12 * abs(lam).max())
    assert exact["positive"] == (lam > 1e-2 * lam[-1]).sum() and exact["hvps"] == dist.n
    checked = verify(dist, k=1, seed=0, reference=dense("hessian"))
    assert checked["passed"] and checked["product_error"] < 1e-13 and checked["asymmetry"] < 1e-13
    res = lanczos(local, which="LA", k=1, tol=1e-8, seed=1)
    vectors = {"LA": (res.largest.values, res.largest.vectors)}
    a, b = (along(op, vectors, scales=(0.1,), points=5) for op in (dist, local))
    for key in ("slope", "optimal_step", "best_improvement", "loss_evaluations"):
        close(a["ends"]["LA"][0][key], b["ends"]["LA"][0][key], err_msg=key)
    close(a["ends"]["LA"][0]["lines"][0]["loss"], b["ends"]["LA"][0]["lines"][0]["loss"])
    # the subset is spread over each worker's shard: its dense Hessian is that of those samples
    out = compare_subset(dist, fraction=0.5, k=1, tol=1e-8, seed=2)
    x, y = data_factory()
    kept = torch.cat([torch.arange(N)[r::2][spread_indices(len(range(r, N, 2)), 0.5)] for r in (0, 1)])
    lam_sub = np.linalg.eigvalsh(helpers.dense_hessian(helpers.cnn_bn(), x[kept], y[kept]))
    assert out["subset_samples"] == len(kept)
    for end, sub in (("LA", lam_sub[::-1]), ("SA", lam_sub)):
        np.testing.assert_allclose(out["ends"][end]["subset"], sub[:1], rtol=1e-7)
    np.testing.assert_allclose([out["ends"]["LA"]["full"][0], out["ends"]["SA"]["full"][0]], lam[[-1, 0]], rtol=1e-7)


@pytest.mark.parametrize("workers", [2, 3])
def test_lopsided_shards_do_not_hang_and_weight_by_sample(groups, workers):
    """Very unequal shards (rank 0 holds 100 of the 121 samples)."""
    with respecced(groups[workers], spec(data=lopsided_data)) as group:
        op = DistributedOperator(group)
        V = np.random.default_rng(0).standard_normal((op.n, 2))
        ref = in_process().matmat(V)
        np.testing.assert_allclose(op.matmat(V), ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_respec_builds_another_problem_in_the_same_workers(groups):
    """A group respecced for another model's GGN computes that model's GGN products in the same
    processes; a spec that a worker cannot build raises its error and leaves the group rebuilt
    on the old spec."""
    group = groups[1]
    pids = [p["pid"] for p in group.placements]
    V = np.random.default_rng(2).standard_normal((group.n, 2))
    with respecced(group, spec("ggn", model=helpers.mlp)):
        other = CurvatureOperator(helpers.mlp(), "cross_entropy", data_factory(), curvature="ggn", batch_size=32,
                                  dtype=torch.float64)
        assert group.n == other.n != V.shape[0] and [p["pid"] for p in group.placements] == pids
        W = np.random.default_rng(3).standard_normal((other.n, 2))
        ref = other.matmat(W)
        np.testing.assert_allclose(DistributedOperator(group).matmat(W), ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    with pytest.raises(InputError, match="on rank 0: cannot import module 'not_a_module'"):
        group.respec(spec(model="not_a_module:make"))
    assert group.replacements[-1].startswith("respec failed") and group.spec == spec()
    ref = in_process().matmat(V)
    np.testing.assert_allclose(DistributedOperator(group).matmat(V), ref, rtol=0, atol=1e-12 * np.abs(ref).max())


@functools.lru_cache(maxsize=None)
def dense(curvature: str) -> np.ndarray:
    """The dense float64 ``curvature`` of the workers' problem, built independently."""
    x, y = data_factory()
    model = helpers.cnn_bn()
    if curvature == "residual":
        return dense("hessian") - dense("ggn")
    return {"hessian": helpers.dense_hessian, "ggn": helpers.dense_ggn_cross_entropy,
            "empirical-fisher": helpers.dense_empirical_fisher}[curvature](model, x, y)


@functools.lru_cache(maxsize=None)
def dense_spectrum(curvature: str) -> np.ndarray:
    return torch.linalg.eigvalsh(torch.from_numpy(dense(curvature))).numpy()


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


def test_sharded_ggn_and_lopsided_shards_match_in_process(groups):
    """Workers built for the GGN (its spec's curvature, not a view) and lopsided shards: sharded
    solves equal to the in-process ones and the dense eigenvalues."""
    # the GGN's smallest eigenvalue is 0 many times over: one start vector finds one copy, so LA only
    with respecced(groups[3], spec("ggn")) as ggn, respecced(groups[2], spec(data=lopsided_data)) as lopsided:
        for curvature, group, which in (("ggn", ggn, "LA"), ("hessian", lopsided, "LA,SA")):
            local = lanczos(in_process(curvature), which=which, k=2, tol=1e-10, seed=5)
            dist = lanczos(DistributedOperator(group), which=which, k=2, tol=1e-10, seed=5)
            assert local.converged and dist.hvps == local.hvps
            assert_same_solve(dist, local, dense_spectrum(curvature))


def test_float32_products_gather_float32_vectors_and_match_in_process(groups):
    """float32 products on a sharded float64 basis: the all-gather sends the vectors in float32,
    the precision the product reads them in (half the bytes), and the solve still matches the
    in-process float32 solve and the dense eigenvalues to float32 accuracy. The first solve's
    confirmations measure the rounding gap on the driver's operator; the next solve skips them,
    on the workers as in-process, and its intervals hold the dense eigenvalues."""
    lam = dense_spectrum("hessian")
    with respecced(groups[2], spec(dtype="float32")) as group:
        op = DistributedOperator(group)
        dist = lanczos(op, which="LA,SA", k=2, rtol=1e-4, seed=5, return_vectors=False)
        dist_next = lanczos(op, which="LA,SA", k=2, rtol=1e-3, seed=6, return_vectors=False)
        basis = op.krylov_basis(capacity=4)
        basis.add_start(np.random.default_rng(0).standard_normal(op.n))
        basis.expand(0)
        gathered = [s["gathered_bytes"] for s in group.run("basis_seconds", basis.id)]
    local_op = CurvatureOperator(helpers.cnn_bn(), "cross_entropy", data_factory(), batch_size=32, dtype=torch.float32)
    local = lanczos(local_op, which="LA,SA", k=2, rtol=1e-4, seed=5)
    local_next = lanczos(local_op, which="LA,SA", k=2, rtol=1e-3, seed=6)
    assert dist.converged and local.converged and dist_next.converged
    assert dist.confirm_hvps == local.confirm_hvps == 4 and dist_next.confirm_hvps == local_next.confirm_hvps == 0
    (ratio, _), (local_ratio, _) = op.rounding_gaps["torch.float64"], local_op.rounding_gaps["torch.float64"]
    assert 0.1 < ratio / local_ratio < 10 and ratio < 1e-5
    for end, truth in (("LA", lam[::-1][:2]), ("SA", lam[:2])):
        lo, hi = dist_next.pairs[end].intervals.T
        assert ((lo <= truth) & (truth <= hi)).all(), (end, lo, hi, truth)
    for end, truth in (("LA", lam[::-1][:2]), ("SA", lam[:2])):
        np.testing.assert_allclose(dist.pairs[end].values, local.pairs[end].values, rtol=1e-4)
        np.testing.assert_allclose(dist.pairs[end].values, truth, rtol=2e-4)
    assert gathered == [2 * -(-op.n // 2) * 4] * 2       # one column, every rank's slice: 4 bytes an entry


def test_auto_mode_is_one_choice_for_every_rank_and_reported(groups):
    with respecced(groups[2], spec(mode="auto")) as group:
        modes = {r["mode"] for r in group.run("describe")}
        described = DistributedOperator(group).describe()
        V = np.random.default_rng(0).standard_normal((group.n, 2))
        np.testing.assert_allclose(DistributedOperator(group).matmat(V), in_process().matmat(V), rtol=1e-12, atol=1e-14)
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


def test_streamed_shards_and_a_ray_dataset_give_the_resident_products(groups):
    """Shards streamed on every product, and a ray.data dataset split once by the driver (two
    columns, lopsided blocks), give the in-process resident products."""
    x, y = data_factory()
    ds = ray.data.from_items([{"image": x[i].numpy(), "label": int(y[i])} for i in range(N)]).repartition(3)
    V = np.random.default_rng(4).standard_normal((in_process().n, 2))
    ref = in_process().matmat(V)
    for data, kw in ((data_factory, {"placement": "stream"}), (ds, {"data_columns": ("image", "label")}),
                     (ds, {"placement": "stream"})):
        with respecced(groups[2], spec(data=data, **kw)) as group:
            op = DistributedOperator(group)
            assert op.n_samples == N
            assert {r["data"] for r in group.run("describe")} == {kw.get("placement", "device")}
            np.testing.assert_allclose(op.matmat(V), ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_dict_batches_and_token_weighting_on_workers_equal_in_process(groups):
    """A GPT-2 on dict batches whose shards hold different numbers of predicted tokens: the
    sum over workers weights every token once, as the in-process operator does; and a solve
    through the workers finds the dense extreme eigenvalues."""
    loss = BatchLoss("causal_lm", "predicted_tokens")
    gpt2 = OperatorSpec(model=helpers.tiny_gpt2, data=helpers.gpt2_tokens, loss=loss, batch_size=5,
                        dtype="float64", params=helpers.GPT2_PARAMS)
    local = CurvatureOperator(helpers.tiny_gpt2(), loss, helpers.gpt2_tokens(), batch_size=5, dtype=torch.float64,
                              params=helpers.GPT2_PARAMS)
    lam = np.linalg.eigvalsh(helpers.dense_gpt2_hessian(helpers.tiny_gpt2(), helpers.gpt2_tokens()).numpy())
    with respecced(groups[3], gpt2) as group:
        op = DistributedOperator(group)
        assert op.n_samples == local.n_samples
        V = np.random.default_rng(5).standard_normal((op.n, 3))
        ref = local.matmat(V)
        np.testing.assert_allclose(op.matmat(V), ref, rtol=0, atol=1e-12 * np.abs(ref).max())
        res = lanczos(op, which="LA,SA", tol=1e-10, seed=0)
        np.testing.assert_allclose([res.largest.values[0], res.smallest.values[0]], [lam[-1], lam[0]], rtol=1e-8)


def test_sharded_basis_memory_per_worker_within_its_share_of_the_cap(groups):
    """Two million parameters on two workers: each holds half of every basis vector, never more
    than max_basis of them."""
    from .test_basis import Wide, wide_data
    with respecced(groups[2], OperatorSpec(model=Wide, data=wide_data, batch_size=32, mode="double-backward")) as group:
        op = DistributedOperator(group)
        res = lanczos(op, which="LA,SA", k=1, tol=1e-3, seed=0, max_basis=12, max_hvps=40)
        assert res.restarts > 0 and 0 < res.basis_peak_bytes <= 12 * -(-op.n // 2) * 8
