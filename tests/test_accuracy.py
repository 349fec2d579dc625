"""The per-value accuracy contract (rtol with a tol floor), the cost in full-data product
equivalents (fpe), the subset path, and certificates that hold what they say — all against
dense float64 eigendecompositions (torch.linalg.eigh) of real models' Hessians."""
import functools
import math
import time

import numpy as np
import pytest
import torch

from hessdist.errors import InputError
from hessdist.examples import digits_shifted
from hessdist.curvature import CurvatureOperator
from hessdist.solvers.certify import solve, subset_fraction, subset_search
from hessdist.solvers.lanczos import lanczos
from hessdist.solvers.starts import warm_start_vector
from hessdist.solvers.ritz import Accuracy

from .helpers import DenseOperator, dense_ggn_cross_entropy, dense_hessian, digits_subset, mlp, reference, \
    trained_mlp_hessian


def eigh(H):
    lam, U = torch.linalg.eigh(torch.from_numpy(H))
    return lam.numpy(), U.numpy()


def exact_ith(lam: np.ndarray, end: str, k: int) -> np.ndarray:
    return lam[::-1][:k] if end == "LA" else lam[:k]


@pytest.mark.parametrize("case", ["mlp", "cnn_bn", "trained_mlp"])
@pytest.mark.parametrize("rtol, k", [(1e-2, 1), (1e-2, 2), (1e-3, 2)])
def test_rtol_pairs_meet_rtol_against_the_exact_eigenvalues(case, rtol, k):
    """Every pair flagged as met by rtol is within rtol of the exact i-th eigenvalue, and every
    interval contains it — including λ_min of a trained MLP 200+ times smaller than λ_max."""
    H = trained_mlp_hessian() if case == "trained_mlp" else reference(case)[1]
    lam, _ = eigh(H)
    if case == "trained_mlp":
        assert lam[-1] / abs(lam[0]) >= 200
    for seed in range(3):
        res = lanczos(DenseOperator(H), which="LA,SA", k=k, rtol=rtol, tol=1e-14, seed=seed)
        assert res.converged and res.stop_reason == "converged"
        for end, p in res.pairs.items():
            truth = exact_ith(lam, end, k)
            assert list(p.met) == ["rtol"] * k
            assert (np.abs(p.values - truth) <= rtol * np.abs(truth)).all(), (end, p.values, truth)
            np.testing.assert_allclose(p.relative_widths, p.residual_norms / np.abs(p.values))
            assert (p.relative_widths <= rtol).all()
            for (lo, hi), t in zip(p.intervals, truth):
                assert lo - 1e-12 <= t <= hi + 1e-12


def test_a_loose_rtol_does_not_stop_a_cold_run_before_lambda_min_surfaces():
    """The residual certifies only that SOME eigenvalue lies within r of θ: with rtol 0.1 a
    residual-only rule stopped 15 of 100 runs on this CNN's second-smallest eigenvalue (a small
    component in the start). A cold run also waits for its probabilistic far side, so the
    interval can miss λ_min only where the limit does — at the limit's confidence."""
    _, H, _ = reference("cnn_bn")
    lam, _ = eigh(H)
    misses = uncovered = 0
    for seed in range(60):
        res = lanczos(DenseOperator(H), which="SA", rtol=0.1, tol=1e-14, seed=seed, return_vectors=False,
                      confidence=0.9)
        p = res.smallest
        assert p.values[0] >= lam[0] - 1e-12                        # certain: θ ≥ λ_min
        assert np.abs(lam - p.values[0]).min() <= p.residual_norms[0] * (1 + 1e-9)   # certain
        assert p.limit - p.values[0] >= -0.1 * abs(p.values[0])    # the far side met rtol too
        misses += not p.intervals[0, 0] - 1e-12 <= lam[0]
        uncovered += lam[0] < p.limit
    assert misses <= uncovered <= 0.1 * 60


def test_rtol_asks_more_of_the_small_end_than_tol():
    """tol relative to max|θ| stops with λ_min of the trained MLP far off; rtol does not."""
    H = trained_mlp_hessian()
    lam, _ = eigh(H)
    loose = lanczos(DenseOperator(H), which="LA,SA", tol=1e-3, seed=0)
    tight = lanczos(DenseOperator(H), which="LA,SA", rtol=1e-3, seed=0)
    assert loose.converged and tight.converged and tight.hvps > loose.hvps
    assert loose.smallest.relative_widths[0] > 1e-2                 # "converged", yet not 1% sure
    assert abs(tight.smallest.values[0] - lam[0]) <= 1e-3 * abs(lam[0])
    per_end = lanczos(DenseOperator(H), which="LA,SA", rtol={"LA": 1e-6, "SA": 1e-1}, seed=0)
    assert per_end.largest.relative_widths[0] <= 1e-6 and per_end.smallest.relative_widths[0] <= 1e-1


def test_a_value_at_zero_is_floored_by_tol_not_converged_by_rtol():
    """The GGN of an MLP on fewer samples than parameters/classes is singular: λ_min = 0 exactly,
    where no relative accuracy exists; the pair is reported as met by the tol floor."""
    torch.manual_seed(0)
    model = mlp(hidden=12)
    x, y = digits_subset(40)                      # rank ≤ 40·9 = 360 < 910 parameters
    G = dense_ggn_cross_entropy(model, x, y)
    lam, _ = eigh(G)
    assert abs(lam[0]) < 1e-12 * lam[-1]
    op = CurvatureOperator(model, "cross_entropy", (x, y), curvature="ggn", dtype=torch.float64)
    res = lanczos(op, which="LA,SA", rtol=1e-2, tol=1e-8, seed=0)
    assert res.converged and res.largest.met[0] == "rtol" and res.smallest.met[0] == "tol"
    assert abs(res.smallest.values[0]) <= 1e-8 * lam[-1] and res.smallest.relative_widths[0] > 1e-2
    assert res.to_dict()["met"] == {"largest": ["rtol"], "smallest": ["tol"]}


def test_accuracy_arguments_are_checked():
    with pytest.raises(InputError, match="rtol must lie in"):
        Accuracy.of(None, 2.0, ("LA",))
    with pytest.raises(InputError, match="not in which"):
        Accuracy.of(None, {"SA": 0.1}, ("LA",))
    with pytest.raises(InputError, match="tol must be positive"):
        Accuracy.of(-1.0, None, ("LA",))
    assert Accuracy.of(None, 0.01, ("LA", "SA")).rtol == {"LA": 0.01, "SA": 0.01}


class ScaledOperator(DenseOperator):
    """A dense operator whose products touch a fraction of the data (for fpe bookkeeping)."""

    def __init__(self, H, fraction):
        super().__init__(H)
        self.data_fraction = fraction


def test_fpe_weights_products_by_data_fraction_and_max_fpe_is_never_exceeded():
    _, H, _ = reference("mlp")
    op = ScaledOperator(H, 0.25)
    res = lanczos(op, which="LA,SA", tol=1e-14, max_fpe=5.0, seed=0)
    assert res.stop_reason == "max_fpe" and res.hvps == 20 and res.fpe == pytest.approx(5.0)
    res = lanczos(DenseOperator(H), which="LA,SA", tol=1e-14, max_fpe=7.5, block=2, seed=0)
    assert res.fpe <= 7.5 and res.hvps == 7
    with pytest.raises(InputError, match="max_fpe"):
        lanczos(DenseOperator(H), max_fpe=0)


def test_runs_draw_fresh_seeds_and_report_them():
    _, H, _ = reference("mlp")
    a = lanczos(DenseOperator(H), which="LA", rtol=1e-4)
    b = lanczos(DenseOperator(H), which="LA", rtol=1e-4)
    assert a.seed != b.seed
    again = lanczos(DenseOperator(H), which="LA", rtol=1e-4, seed=a.seed)
    assert again.hvps == a.hvps and np.array_equal(again.largest.values, a.largest.values)


def test_krylov_degree_is_the_dimension_the_limit_comes_from():
    """The limit uses the dimension of K(A, v) of the random start v alone: e after e products
    from one random vector (not e + 1), ⌈e/b⌉ for a width-b block (the random column first)."""
    _, H, _ = reference("mlp")
    for e in (1, 2, 7):
        assert lanczos(DenseOperator(H), which="LA", tol=1e-15, max_hvps=e, seed=0).krylov_degree == e
    block = np.random.default_rng(1).standard_normal((H.shape[0], 2))          # + a random column: width 3
    res = lanczos(DenseOperator(H), which="LA", tol=1e-15, max_hvps=9, v0=block, seed=0)
    assert res.krylov_degree == math.ceil(9 / 3)


def kw_epsilon(n: int, degree: int, delta: float) -> float:
    """Kuczyński–Woźniakowski's a-priori bound (the one the limit replaced, for comparison):
    λ_max − θ_max ≤ ε (λ_max − λ_min) with probability ≥ 1 − δ after Lanczos to this degree."""
    return (math.log(1.648 * math.sqrt(n) / delta) / (2 * degree - 1)) ** 2


def test_limits_cover_at_the_stated_confidence_on_a_hard_spectrum():
    """A spectrum where Lanczos is slow (one eigenvalue 1 above a dense bulk on [0, 0.8]): over
    many seeds, λ_max ≤ limit (and λ_min ≥ limit) at least as often as the confidence says —
    and the a-posteriori limit lies far closer than Kuczyński–Woźniakowski's at the same degree."""
    n = 400
    lam = np.concatenate([[1.0], 0.8 * (1 - np.cos(np.pi * np.linspace(0, 1, n - 1))) / 2])
    op = DenseOperator(np.diag(lam))
    confidence, seeds, covered, reach = 0.6, 300, 0, []
    for seed in range(seeds):
        res = lanczos(op, which="LA,SA", tol=1e-15, max_hvps=12, seed=seed, confidence=confidence,
                      return_vectors=False)
        assert res.krylov_degree == 12
        covered += res.largest.limit >= 1.0 and res.smallest.limit <= 0.0
        reach.append(res.largest.limit - res.largest.values[0])
    assert covered / seeds >= confidence
    eps = kw_epsilon(n, 12, (1 - confidence) / 2)
    assert np.median(reach) < 0.2 * eps * (lam.max() - lam.min()) / (1 - 2 * eps)


def test_a_warm_starts_limits_cover_at_the_stated_confidence_whatever_its_previous_vectors():
    """A warm start's far side comes from its random part alone (the quantile scaled by its
    share): on the same hard spectrum, previous vectors that point at a bulk eigenvector (the
    worst case: nothing along the extreme ones) still leave the limits covering λ_max and
    λ_min at least as often as the confidence says."""
    n = 400
    lam = np.concatenate([[1.0], 0.8 * (1 - np.cos(np.pi * np.linspace(0, 1, n - 1))) / 2])
    op = DenseOperator(np.diag(lam))
    previous = {"bulk": np.eye(n)[:, 200:201]}
    confidence, seeds, covered = 0.6, 300, 0
    for seed in range(seeds):
        start = warm_start_vector(previous, n, seed)
        res = lanczos(op, which="LA,SA", tol=1e-15, max_hvps=12, v0=start, seed=seed, confidence=confidence,
                      return_vectors=False)
        assert res.krylov_degree == 12 and start.share == 0.5
        covered += res.largest.limit >= 1.0 and res.smallest.limit <= 0.0
    assert covered / seeds >= confidence


def test_a_limit_that_is_not_yet_tight_keeps_the_run_going():
    """Residuals that meet the target say an eigenvalue is near θ, not that none lies beyond:
    from a random start the run goes on until the probabilistic far side meets the target too,
    so the trained MLP's λ_min (next to a second eigenvalue 11% above it) is not missed."""
    H = trained_mlp_hessian()
    lam, _ = eigh(H)
    for seed in range(20):
        res = lanczos(DenseOperator(H), which="LA,SA", tol=1e-4, seed=seed, return_vectors=False)
        assert res.converged
        for end, truth in (("LA", lam[-1]), ("SA", lam[0])):
            p = res.pairs[end]
            assert abs(p.limit - p.values[0]) <= 1e-4 * res.largest.values[0]
            assert p.intervals[0, 0] - 1e-12 <= truth <= p.intervals[0, 1] + 1e-12


class SkewOperator(DenseOperator):
    """Products with a slightly non-symmetric matrix: what inexact products look like to Lanczos."""


def test_thick_restart_keeps_the_skew_part_in_the_residuals():
    """Residuals after thick restarts must bound the true ‖Ax − θx‖ even when A's products are
    not exactly symmetric (the dropped skew part is carried as a bound)."""
    H = trained_mlp_hessian()
    S = np.random.default_rng(0).standard_normal(H.shape)
    A = H + 1e-7 * np.abs(H).max() * (S - S.T)
    res = lanczos(SkewOperator(A), which="LA,SA", k=2, tol=1e-9, max_basis=30, max_hvps=1500, seed=0)
    assert res.restarts > 0
    for p in res.pairs.values():
        for x, theta, r in zip(p.vectors.T, p.values, p.residual_norms):
            true = np.linalg.norm(A @ x - theta * x) / np.linalg.norm(x)
            assert true <= r * (1 + 1e-6) + 1e-13 * np.abs(H).max(), (true, r)


class WarmUpOperator(DenseOperator):
    """The first product is slow (a CUDA start-up or a compilation), the rest fast."""

    def _matmat(self, V):
        time.sleep(0.6 if self.hvps == 0 else 0.01 * V.shape[1])
        return super()._matmat(V)


def test_budget_is_not_spent_by_a_warm_up_product():
    _, H, _ = reference("mlp")
    res = lanczos(WarmUpOperator(H), which="LA,SA", tol=1e-14, budget_s=1.0, seed=0)
    assert res.stop_reason == "budget" and res.hvps > 5 and res.seconds <= 1.0 + 0.25


@functools.lru_cache(maxsize=None)
def float32_mlp():
    model, H, _ = reference("mlp")
    return model, H


def test_inexact_products_are_confirmed_with_real_products():
    """float32 products: the returned residuals are those of real products (two more, one per
    returned pair, counted in hvps and fpe), and they bound the distance to the exact spectrum up
    to the products' own float32 error."""
    model, H = float32_mlp()
    lam, _ = eigh(H)
    op = CurvatureOperator(model, "cross_entropy", digits_subset(), dtype=torch.float32, batch_size=64)
    assert not op.exact
    res = lanczos(op, which="LA,SA", rtol=1e-3, seed=0)
    assert res.confirm_hvps == 2 and res.hvps == op.hvps and res.fpe == op.fpe
    for end, p in res.pairs.items():
        x = p.vectors[:, 0]
        true = np.linalg.norm(H @ x - p.values[0] * x)
        assert abs(true - p.residual_norms[0]) <= 1e-5 * lam[-1]
        assert abs(p.values[0] - exact_ith(lam, end, 1)[0]) <= p.residual_norms[0] + 1e-5 * lam[-1]


class Float32Dense(DenseOperator):
    """A dense matrix whose products run in float32 (rounded like a float32 HVP); ``H`` may be
    replaced between solves, as training replaces the parameters."""
    exact = False

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return (self.H.float() @ V.float()).double()


def sgd_states(steps: int, every: int):
    """The digits MLP's parameters (float64) every ``every`` full-batch SGD steps, with each
    state's dense Hessian: a short training trajectory whose spectrum moves."""
    model, x, y = mlp(), *digits_subset()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    states = []
    for step in range(steps):
        if step % every == 0:
            states.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, dense_hessian(model, x, y)))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return states


def test_a_measured_rounding_gap_skips_later_confirmations_and_every_interval_holds():
    """float32 products along a training trajectory, warm-started solve to solve as the service
    chains them: the first solve confirms (and measures the rounding gap), the later ones skip
    their confirmations (no product beyond the run's own), and every interval still holds the
    dense float64 eigenvalue and every reported residual bounds the float64 one. (A confirmed
    interval is that of the float32 operator as computed: it holds the float64 value to within
    the products' own rounding, the gap.)"""
    states = sgd_states(steps=40, every=10)
    op = CurvatureOperator(mlp(), "cross_entropy", digits_subset(), dtype=torch.float32, batch_size=64)
    previous = None
    for i, (state, H) in enumerate(states):
        op.set_parameters(state)
        res = solve(op, previous=previous, rtol={"LA": 1e-2, "SA": 5e-2}, seed=i).result
        previous = {w: p.vectors for w, p in res.pairs.items()}
        lam = np.linalg.eigvalsh(H)
        if i == 0:
            assert res.confirm_hvps == 2 and res.rounding_gap is None and op.rounding_gaps
            assert all(why.startswith("confirmed") for why in res.confirmation.values())
        else:
            assert res.confirm_hvps == 0 and res.rounding_gap > 0, res.confirmation
            assert all(why.startswith("skipped") for why in res.confirmation.values())
        ratio, _ = op.rounding_gaps["torch.float64"]
        slack = 0.0 if i else ratio * abs(lam).max()
        for end, p in res.pairs.items():
            truth = lam[-1] if end == "LA" else lam[0]
            assert p.intervals[0, 0] - slack <= truth <= p.intervals[0, 1] + slack, (i, end, p.intervals, truth)
            x = p.vectors[:, 0]
            assert np.linalg.norm(H @ x - p.values[0] * x) <= p.residual_norms[0] + slack


def test_a_target_near_the_rounding_level_is_confirmed_and_the_gap_is_measured_again():
    """An end whose target lies within the safety factor of the measured gap is confirmed with
    a real product, the other end may still skip; a spectrum that moved beyond the scale window
    is confirmed whatever its target."""
    _, H = float32_mlp()
    op = Float32Dense(H)
    lanczos(op, which="LA,SA", rtol=1e-2, seed=0)
    ratio, _ = op.rounding_gaps["torch.float64"]
    res = lanczos(op, which="LA,SA", rtol={"LA": 3 * ratio, "SA": 1e-2}, seed=1)
    assert res.confirmation["LA"].startswith("confirmed: not met") and res.confirmation["SA"].startswith("skipped")
    assert res.confirm_hvps == 1
    op.H = op.H * 1.5                                  # inside the window: the measurement carries over
    assert lanczos(op, which="LA,SA", rtol=1e-2, seed=2).confirm_hvps == 0
    op.H = op.H * 3.0                                  # 4.5x the measured scale: measured again
    res = lanczos(op, which="LA,SA", rtol=1e-2, seed=3)
    assert res.confirm_hvps == 2 and res.rounding_gap is None
    assert op.rounding_gaps["torch.float64"][1] == pytest.approx(4.5 * abs(np.linalg.eigvalsh(H)).max(), rel=1e-4)


# -- the subset path on a data set large enough for it (23,361 real digits images) ----------------
@functools.lru_cache(maxsize=None)
def shifted_problem():
    """A small trained MLP on the shifted digits, its float64 operator and dense Hessian."""
    x, y = digits_shifted()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 6), torch.nn.Tanh(), torch.nn.Linear(6, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x.double()), y).backward()
        opt.step()
    H = dense_hessian(model, x.double(), y)
    op = CurvatureOperator(model, "cross_entropy", (x, y), dtype=torch.float64, batch_size=8192)
    return op, H


def test_subset_path_certifies_full_data_values_and_counts_fpe_exactly():
    op, H = shifted_problem()
    lam, _ = eigh(H)
    assert op.n_samples == 23_361 and subset_fraction(op.n_samples) == 0.05
    answer = solve(op, which="LA,SA", rtol={"LA": 1e-3, "SA": 1e-2}, subset="auto", seed=0)
    res, sub = answer.result, answer.subset
    assert sub is not None and sub["n_samples"] == math.ceil(0.05 * 23_361)
    assert sub["fpe"] == pytest.approx(sub["hvps"] * sub["n_samples"] / 23_361, rel=1e-12)
    assert res.fpe == pytest.approx(sub["fpe"] + sub["full_fpe"]) and sub["full_fpe"] == sub["full_hvps"]
    assert res.converged
    for end, p in res.pairs.items():
        truth = exact_ith(lam, end, 1)[0]
        lo, hi = p.intervals[0]
        assert lo - 1e-12 <= truth <= hi + 1e-12
        assert abs(p.values[0] - truth) <= p.residual_norms[0] + 1e-12
    # the subset said something else; the certified values are the full data's
    assert sub["smallest"]["values"][0] != pytest.approx(lam[0], rel=1e-3)
    # by default no search, however large the data: every product is a full-data one (a few
    # products show it)
    plain = solve(op, which="LA,SA", rtol={"LA": 1e-3, "SA": 1e-2}, seed=0, max_hvps=4)
    assert plain.subset is None and plain.result.fpe == plain.result.hvps == 4


def test_subset_search_warm_started_within_its_limits_and_the_default_path_stays_warm():
    op, H = shifted_problem()
    lam, U = eigh(H)
    previous = {"LA": U[:, -1:] + 1e-3, "SA": U[:, :1] + 1e-3}
    answer = subset_search(op, which="LA,SA", rtol=1e-3, fraction=0.02, previous=previous, seed=1, max_fpe=20)
    assert answer.subset["warm_start"] and answer.result.fpe <= 20
    assert answer.result.stop_reason in ("converged", "max_fpe")
    # with previous eigenvectors the default path starts from them on all the data: a subset's
    # eigenvectors could only blur what they know; the warm start waits for its far side
    warm = solve(op, which="LA,SA", rtol=1e-3, previous=previous, seed=1)
    assert warm.subset is None and warm.result.converged and warm.result.krylov_degree == warm.result.hvps
    for p in warm.result.pairs.values():
        assert abs(p.limit - p.values[0]) <= max(1e-3 * abs(p.values[0]), 1e-6 * warm.result.largest.values[0])
    assert abs(warm.result.smallest.values[0] - lam[0]) <= 1e-3 * abs(lam[0])
    with pytest.raises(InputError, match="fraction"):
        subset_search(op, fraction=1.0)


def test_auto_subset_skips_the_search_on_small_data():
    """``subset="auto"`` on 1,797 samples: 5% is 90 samples, and raising it to the minimum subset
    size would take more than a quarter of the data — the plain solve runs."""
    assert subset_fraction(1797) is None and subset_fraction(100_000) == 0.05
    assert subset_fraction(15_000) == pytest.approx(1000 / 15_000) and subset_fraction(4000) == 0.25
    _, H, _ = reference("mlp")
    model, _, _ = reference("mlp")
    op = CurvatureOperator(model, "cross_entropy", digits_subset(), dtype=torch.float64, batch_size=64)
    answer = solve(op, which="LA,SA", rtol=1e-3, subset="auto", seed=0)
    assert answer.subset is None and answer.result.fpe == answer.result.hvps
