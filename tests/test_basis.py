"""The Krylov basis: a float32 basis within its stated error, and memory that follows max_basis
(never allocated beyond it, compressed in place) at two million parameters."""
import json
import os
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hessdist.basis import CHUNK_ROWS, HOST_BASIS_BYTES
from hessdist.curvature import CurvatureOperator
from hessdist.solvers.lanczos import lanczos
from hessdist.workers.slice_basis import SliceBasis
from hessdist.workers.worker import free_port

from .helpers import cnn_bn, digits_subset, mlp, reference


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


def test_the_default_basis_fills_the_room_the_operator_has():
    """No max_basis: the basis fills ``op.basis_bytes()`` (half a GPU's free memory; here a
    room of 24 float64 vectors, as a GPU shared with a training might have) and restarts there."""
    op = CurvatureOperator(Wide(), "cross_entropy", wide_data(), batch_size=32, dtype=torch.float32,
                           mode="double-backward")
    op.basis_bytes = lambda: 24 * op.n * 8
    res = lanczos(op, which="LA,SA", k=1, tol=1e-3, seed=0, max_hvps=60)
    assert 0 < res.basis_peak_bytes <= 24 * op.n * 8 and (res.restarts > 0 or res.hvps < 24)
    assert CurvatureOperator(mlp(), "cross_entropy", digits_subset(40)).basis_bytes() == HOST_BASIS_BYTES


def _expand_with_rank_1_out_of_memory(rank: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo group expanding a sharded basis; rank 1's next row does not
    fit. What each rank raised, how long it took, and a collective after it go to ``out``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        op = CurvatureOperator(mlp(), "cross_entropy", digits_subset(40), dtype=torch.float64)
        basis = SliceBasis(op, capacity=8, dtype=torch.float64)
        basis.add_start(np.ones(op.n))
        if rank == 1:
            def no_memory(q):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            basis.rows.append = no_memory
        t0 = time.perf_counter()
        try:
            basis.expand(0, 2)
            raised = ["nothing", ""]
        except Exception as exc:
            raised = [type(exc).__name__, str(exc)]
        seconds = time.perf_counter() - t0
        after = torch.ones(1, dtype=torch.float64)
        dist.all_reduce(after)                  # the group is still in step
        with open(os.path.join(out, f"{rank}.json"), "w") as f:
            json.dump({"raised": raised, "seconds": seconds, "after": float(after)}, f)
    finally:
        dist.destroy_process_group()


def test_out_of_memory_on_one_rank_raises_on_every_rank_at_once(tmp_path):
    """A worker whose device cannot hold the next basis row tells the user the two knobs that
    shrink the basis, and its peer stops at once with PeerFailed instead of waiting in the next
    collective until the process group's timeout (60 s here)."""
    mp.spawn(_expand_with_rank_1_out_of_memory, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["raised"][0] == "PeerFailed" and "rank(s) [1]" in ranks[0]["raised"][1]
    kind, message = ranks[1]["raised"]
    assert kind == "OutOfMemory" and "--max-basis" in message and "--basis-dtype float32" in message
    assert "1 of at most 8 vectors" in message
    assert all(r["seconds"] < 20 and r["after"] == 2.0 for r in ranks)
