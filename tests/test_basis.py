"""The Krylov basis: a float32 basis within its stated error, and memory that follows max_basis
(never allocated beyond it, compressed in place) at two million parameters."""
import numpy as np
import pytest
import torch
from torch import nn

from hessdist.basis import CHUNK_ROWS
from hessdist.curvature import CurvatureOperator
from hessdist.solvers.lanczos import lanczos

from .helpers import cnn_bn, digits_subset, reference


def test_float32_basis_within_its_stated_error():
    """float64 products, float32 basis: the pairs are confirmed with real products (one per
    pair), so the residuals are true ones; values agree with dense eigh to the residual bound,
    and the basis takes half the memory of a float64 one."""
    _, H, _ = reference("cnn_bn")
    lam = np.linalg.eigvalsh(H)
    op = CurvatureOperator(cnn_bn(), "cross_entropy", digits_subset(), batch_size=32, dtype=torch.float64)
    results = {dt: lanczos(op, which="LA,SA", k=2, rtol=1e-5, seed=2, basis_dtype=dt)
               for dt in (torch.float64, torch.float32)}
    r32, r64 = results[torch.float32], results[torch.float64]
    assert r32.converged and r32.confirm_hvps == 4 and r64.confirm_hvps == 0
    for end, truth in (("LA", lam[::-1][:2]), ("SA", lam[:2])):
        p = r32.pairs[end]
        true_res = np.linalg.norm(H @ p.vectors - p.vectors * p.values, axis=0)
        np.testing.assert_allclose(p.residual_norms, true_res, rtol=1e-6, atol=1e-12)
        assert (p.residual_norms <= 1e-5 * np.abs(p.values)).all()
        assert (np.abs(p.values - truth) <= p.residual_norms + 1e-12).all()
    assert r32.basis_peak_bytes * 2 <= r64.basis_peak_bytes + CHUNK_ROWS * op.n * 8


class Wide(nn.Module):
    """Two million parameters, a cheap product: 32 samples through one wide layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(64, 31_000), nn.Tanh(), nn.Linear(31_000, 10))

    def forward(self, x):
        return self.body(x)


def wide_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)


@pytest.mark.parametrize("max_basis", [12, 40])
def test_basis_memory_stays_within_the_cap_at_two_million_parameters(max_basis):
    op = CurvatureOperator(Wide(), "cross_entropy", wide_data(), batch_size=32, dtype=torch.float32,
                           mode="double-backward")
    assert op.n > 2_000_000
    res = lanczos(op, which="LA,SA", k=1, tol=1e-3, seed=0, max_basis=max_basis, max_hvps=60)
    cap = max_basis * op.n * 8
    assert 0 < res.basis_peak_bytes <= cap
    assert res.restarts > 0 or res.hvps < max_basis       # the cap was reached and honoured
