"""Lanczos against torch.linalg.eigh of dense float64 Hessians of real models."""
import functools

import numpy as np
import pytest
import torch

from hessdist.errors import InputError
from hessdist.curvature import CurvatureOperator
from hessdist.solvers.lanczos import lanczos
from hessdist.solvers.starts import WarmStart

from .helpers import MODELS, dense_hessian, digits_subset, reference, trained_digits_mlp

DATA = digits_subset()


def eigh(H):
    lam, U = torch.linalg.eigh(torch.from_numpy(H))
    return lam.numpy(), U.numpy()


def check_pairs(H, pairs, lam, U, order, rel=1e-8, angle=1e-6):
    """Values within rel·|λ|, vectors within ``angle`` (sine), residuals reported truthfully."""
    scale = np.abs(lam).max()
    for i, j in enumerate(order[: len(pairs.values)]):
        assert abs(pairs.values[i] - lam[j]) <= rel * abs(lam[j]), (pairs.which, i, pairs.values[i], lam[j])
        x = pairs.vectors[:, i]
        assert abs(np.linalg.norm(x) - 1) < 1e-10
        assert np.sqrt(max(0.0, 1 - (x @ U[:, j]) ** 2)) <= angle
        true_res = np.linalg.norm(H @ x - pairs.values[i] * x)
        assert abs(true_res - pairs.residual_norms[i]) <= 1e-10 * scale
        assert abs(pairs.values[i] - lam[j]) <= pairs.error_bounds[i] + 1e-13 * scale
    assert pairs.converged.all()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("k", [1, 3])
def test_both_ends_from_one_run_match_eigh(name, k):
    model, H, _ = reference(name)
    lam, U = eigh(H)
    gaps = np.diff(lam)
    assert gaps[: k + 1].min() > 1e-4 * np.abs(lam).max() and gaps[-k - 1:].min() > 1e-4 * np.abs(lam).max()
    op = CurvatureOperator(model, "cross_entropy", DATA, batch_size=32, dtype=torch.float64)
    res = lanczos(op, which="LA,SA", k=k, tol=1e-10, seed=1)
    assert res.stop_reason == "converged" and res.converged
    assert res.hvps == op.hvps < op.n
    check_pairs(H, res.largest, lam, U, order=np.argsort(-lam))
    check_pairs(H, res.smallest, lam, U, order=np.argsort(lam))


@functools.lru_cache(maxsize=None)
def trained():
    model, data = trained_digits_mlp()
    return model, data, dense_hessian(model, *data)


def test_tiny_negative_lambda_min_next_to_large_lambda_max():
    model, data, H = trained()
    lam, U = eigh(H)
    assert lam[0] < 0 and lam[-1] / -lam[0] >= 200        # the hard case this tool exists for
    op = CurvatureOperator(model, "cross_entropy", data, batch_size=500, dtype=torch.float64)
    res = lanczos(op, which=("LA", "SA"), k=1, tol=1e-10)
    check_pairs(H, res.largest, lam, U, order=np.argsort(-lam))
    check_pairs(H, res.smallest, lam, U, order=np.argsort(lam))


def test_largest_magnitude():
    model, H, _ = reference("mlp")
    lam, _ = eigh(H)
    op = CurvatureOperator(model, "cross_entropy", DATA, dtype=torch.float64)
    res = lanczos(op, which="LM", k=2, tol=1e-10)
    expected = lam[np.argsort(-np.abs(lam))[:2]]
    np.testing.assert_allclose(res.pairs["LM"].values, expected, rtol=1e-8)


def test_budgets_stop_early_and_say_so():
    model, H, _ = reference("cnn_bn")
    lam, _ = eigh(H)
    op = CurvatureOperator(model, "cross_entropy", DATA, dtype=torch.float64)
    res = lanczos(op, which="LA,SA", k=1, tol=1e-14, max_hvps=5)
    assert res.hvps == 5 and res.stop_reason == "max_hvps" and not res.converged
    assert not res.smallest.converged.any()
    # the residual is still truthful: an eigenvalue lies within it of each Ritz value
    for pairs in (res.largest, res.smallest):
        assert np.abs(lam - pairs.values[0]).min() <= pairs.residual_norms[0] * (1 + 1e-8)
    # Ritz values never overshoot the spectrum
    assert res.largest.values[0] <= lam[-1] + 1e-12 and res.smallest.values[0] >= lam[0] - 1e-12
    res = lanczos(op, which="LA", k=1, tol=1e-14, budget_s=0.0)
    assert res.stop_reason == "budget" and res.hvps <= 1


def test_start_vector_and_progress_callback():
    model, H, _ = reference("mlp")
    lam, U = eigh(H)
    op = CurvatureOperator(model, "cross_entropy", DATA, dtype=torch.float64)
    seen = []
    res = lanczos(op, which="LA", k=1, tol=1e-10, v0=U[:, -1] + 1e-3 * U[:, 0], callback=seen.append)
    assert res.hvps <= 4                      # a start next to the answer converges at once
    assert [s["hvps"] for s in seen] == list(range(1, res.hvps + 1))
    assert seen[-1]["LA"][0][0] == pytest.approx(lam[-1], rel=1e-8)


def test_exhausted_krylov_space_is_exact():
    """A tiny model (tanh MLP, MSE: no symmetry, so no repeated eigenvalues): the Krylov space
    reaches n = 17 and every Ritz pair is an eigenpair."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    x, y = torch.randn(20, 2).double(), torch.randn(20, 2).double()
    H = dense_hessian(model, x, y, loss=torch.nn.functional.mse_loss)
    lam, _ = eigh(H)
    op = CurvatureOperator(model, "mse", (x, y), dtype=torch.float64)
    res = lanczos(op, which="LA,SA", k=3, tol=1e-300)
    assert res.stop_reason == "exhausted" and res.hvps == op.n == 17
    np.testing.assert_allclose(res.largest.values, lam[::-1][:3], atol=1e-12)
    np.testing.assert_allclose(res.smallest.values, lam[:3], atol=1e-12)
    assert res.hvps <= op.n


def test_bad_arguments():
    op = CurvatureOperator(reference("mlp")[0], "cross_entropy", DATA, dtype=torch.float64)
    with pytest.raises(InputError, match="k must be between 1 and n"):
        lanczos(op, k=op.n + 1)
    with pytest.raises(InputError, match="which"):
        lanczos(op, which="XX")
    with pytest.raises(InputError, match="v0 must be a vector of length"):
        lanczos(op, v0=np.ones(3))
    with pytest.raises(InputError, match="non-zero"):
        lanczos(op, v0=np.zeros(op.n))
    with pytest.raises(InputError, match=r"v0 must be a vector of length n = \d+, got shape \(3,\)"):
        lanczos(op, v0=WarmStart(np.ones(3), 1.0))
    with pytest.raises(InputError, match="finite"):
        lanczos(op, v0=WarmStart(np.full(op.n, np.nan), 1.0))
    with pytest.raises(InputError, match="tol"):
        lanczos(op, tol=0)
