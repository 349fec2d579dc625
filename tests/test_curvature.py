"""The curvature operator against dense float64 Hessians/GGNs built independently."""
import numpy as np
import pytest
import torch
from torch import nn

from hessdist.errors import InputError, NonDeterministicError, NonFiniteError, OutOfMemory
from hessdist.curvature import CurvatureOperator, MicroBatchWarning
from hessdist.params import ParameterLayout, load_state

from .helpers import MODELS, cnn_bn, dense_empirical_fisher, digits_subset, mlp, reference

DATA = digits_subset()          # 120 samples, batch 32: three full batches and one of 24


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_and_dense(request):
    return (request.param, *reference(request.param))


def block(n, k=3, seed=1):
    return np.random.default_rng(seed).standard_normal((n, k))


@pytest.mark.parametrize("mode", ["forward", "double-backward"])
def test_hessian_products_match_dense(model_and_dense, mode):
    _, model, H, _ = model_and_dense
    op = CurvatureOperator(model, "cross_entropy", DATA, batch_size=32, dtype=torch.float64, mode=mode)
    assert [len(y) for _, y in op.batches] == [32, 32, 32, 24]
    V = block(op.n)
    np.testing.assert_allclose(op.matmat(V), H @ V, rtol=0, atol=1e-11 * np.abs(H @ V).max())
    v = torch.from_numpy(V[:, 0])
    np.testing.assert_allclose((op @ v).numpy(), H @ V[:, 0], rtol=0, atol=1e-11 * np.abs(H @ V).max())
    assert op.hvps == 4


@pytest.mark.parametrize("mode", ["forward", "double-backward"])
def test_ggn_products_match_closed_form(model_and_dense, mode):
    _, model, _, G = model_and_dense
    op = CurvatureOperator(model, "cross_entropy", DATA, batch_size=32, dtype=torch.float64,
                           curvature="ggn", mode=mode)
    V = block(op.n)
    np.testing.assert_allclose(op.matmat(V), G @ V, rtol=0, atol=1e-11 * np.abs(G @ V).max())


@pytest.mark.parametrize("mode", ["forward", "double-backward"])
def test_empirical_fisher_and_residual_match_dense(model_and_dense, mode):
    """The empirical Fisher against per-sample gradients stacked densely; S against H − G dense."""
    name, model, H, G = model_and_dense
    F = dense_empirical_fisher(model, *DATA)
    V = block(H.shape[0])
    for curvature, dense in (("empirical-fisher", F), ("residual", H - G)):
        op = CurvatureOperator(model, "cross_entropy", DATA, batch_size=32, dtype=torch.float64,
                               curvature=curvature, mode=mode)
        np.testing.assert_allclose(op.matmat(V), dense @ V, rtol=0, atol=1e-11 * np.abs(dense @ V).max(),
                                   err_msg=curvature)
    assert np.linalg.eigvalsh(F).min() > -1e-12 * np.abs(F).max()       # a sum of outer products
    assert np.abs(F - G).max() > 1e-3 * np.abs(G).max()                 # not the GGN off the optimum


def test_with_curvature_switches_the_same_operator(model_and_dense):
    _, model, H, G = model_and_dense
    op = CurvatureOperator(model, "cross_entropy", DATA, batch_size=32, dtype=torch.float64)
    V = block(op.n, k=2)
    for curvature, dense in (("ggn", G), ("residual", H - G), ("hessian", H)):
        view = op.with_curvature(curvature)
        assert view.curvature == curvature and view.n_samples == op.n_samples and view.hvps == 0
        np.testing.assert_allclose(view.matmat(V), dense @ V, rtol=0, atol=1e-11 * np.abs(dense @ V).max())
        assert view.hvps == 2
    assert op.curvature == "hessian" and op.hvps == 0            # the original is untouched
    with pytest.raises(InputError, match="curvature must be one of"):
        op.with_curvature("fisher")


def test_empirical_fisher_refuses_a_loss_that_is_not_a_per_sample_mean():
    x, y = DATA
    def summed(out, t):
        return nn.functional.cross_entropy(out, t, reduction="sum")
    with pytest.raises(InputError, match="mean of per-sample"):
        CurvatureOperator(mlp(), summed, DATA, curvature="empirical-fisher")
    ignored = (x, torch.where(torch.arange(len(y)) % 3 == 0, -100, y))      # ignore-index: not a row mean
    with pytest.raises(InputError, match="mean of per-sample"):
        CurvatureOperator(mlp(), "cross_entropy", ignored, curvature="empirical-fisher")
    with pytest.raises(InputError, match="train-mode model"):
        CurvatureOperator(mlp(), "cross_entropy", DATA, curvature="empirical-fisher", eval_mode=False)
    with pytest.raises(InputError, match="mean of per-sample"):        # checked on a switch too
        CurvatureOperator(mlp(), summed, DATA).with_curvature("empirical-fisher")
    for curvature in ("empirical-fisher", "residual"):
        with pytest.raises(InputError, match="Hessian products only"):
            CurvatureOperator(mlp(), "cross_entropy", DATA, curvature=curvature, mode="finite-difference")


def test_ggn_is_psd_and_differs_from_hessian(model_and_dense):
    _, _, H, G = model_and_dense
    assert np.linalg.eigvalsh(G).min() > -1e-12 * np.abs(G).max()
    assert np.abs(H - G).max() > 1e-6 * np.abs(H).max()


def test_finite_difference_error_is_small_and_measured(model_and_dense):
    _, model, H, _ = model_and_dense
    op = CurvatureOperator(model, "cross_entropy", DATA, batch_size=32, dtype=torch.float64,
                           mode="finite-difference")
    V = block(op.n, k=2)
    err = np.abs(op.matmat(V) - H @ V).max() / np.abs(H @ V).max()
    assert err < 1e-7          # documented: about 1e-8 in float64 with h = sqrt(eps)·max(1, ‖θ‖)
    assert err > 1e-14         # it is a real finite difference, not an exact product


def test_finite_difference_float32_on_a_smooth_model():
    model = mlp()
    H = reference("mlp")[1]
    op = CurvatureOperator(model, "cross_entropy", DATA, dtype=torch.float32, mode="finite-difference")
    V = block(op.n, k=2)
    assert np.abs(op.matmat(V) - H @ V).max() / np.abs(H @ V).max() < 2e-3   # documented: ~2e-4


def test_weighting_is_by_sample_not_by_batch():
    """A batch size that leaves a 1-sample last batch gives the same full-dataset mean."""
    model, H, _ = reference("mlp")
    op = CurvatureOperator(model, "cross_entropy", DATA, batch_size=119, dtype=torch.float64)
    assert [len(y) for _, y in op.batches] == [119, 1]
    V = block(op.n, 2)
    np.testing.assert_allclose(op.matmat(V), H @ V, rtol=0, atol=1e-11 * np.abs(H @ V).max())


def test_closed_form_logistic_regression():
    """Linear softmax model: H = (1/N) Σ (diag p − ppᵀ) ⊗ x̃x̃ᵀ in (weight row-major, bias) order."""
    torch.manual_seed(3)
    x, y = digits_subset(200)
    model = nn.Linear(64, 10).double()
    op = CurvatureOperator(model, "cross_entropy", (x, y), batch_size=50, dtype=torch.float64)
    p = torch.softmax(model(x), 1).detach().numpy()
    X = x.numpy()
    H_out = np.einsum("ic,cd->icd", p, np.eye(10)) - p[:, :, None] * p[:, None, :]
    Hw = np.einsum("icd,ij,ik->cjdk", H_out, X, X).reshape(640, 640) / len(X)
    Hwb = np.einsum("icd,ij->cjd", H_out, X).reshape(640, 10) / len(X)
    Hb = H_out.mean(0)
    H = np.block([[Hw, Hwb], [Hwb.T, Hb]])
    V = block(op.n, 2)
    np.testing.assert_allclose(op.matmat(V), H @ V, rtol=0, atol=1e-12 * np.abs(H @ V).max())


def test_float32_products_close_to_float64():
    model, H, _ = reference("cnn_bn")
    op = CurvatureOperator(model, "cross_entropy", DATA, batch_size=32, dtype=torch.float32)
    V = block(op.n, 2)
    err = np.abs(op.matmat(V) - H @ V).max() / np.abs(H @ V).max()
    assert err < 1e-4


def test_parameter_subset_and_order():
    model, H, _ = reference("mlp")
    layout = ParameterLayout.of(model, ["2.*"])
    assert layout.names == ("2.weight", "2.bias") and layout.n == 130
    op = CurvatureOperator(model, "cross_entropy", DATA, dtype=torch.float64, params=["2.*"])
    V = block(op.n, 2)
    sub = H[-130:, -130:]
    np.testing.assert_allclose(op.matmat(V), sub @ V, rtol=0, atol=1e-11 * np.abs(sub @ V).max())
    with pytest.raises(InputError, match="matches no trainable parameter"):
        ParameterLayout.of(model, ["nope.*"])


def test_determinism_check_fires_on_dropout_in_train_mode():
    model = mlp(dropout=0.3).train()
    op = CurvatureOperator(model, "cross_entropy", DATA, dtype=torch.float64, eval_mode=False)
    with pytest.raises(NonDeterministicError, match="eval"):
        op.check_determinism()
    # the same model, put in eval mode by default, passes
    CurvatureOperator(model, "cross_entropy", DATA, dtype=torch.float64).check_determinism()


def test_batchnorm_in_train_mode_is_explained():
    """torch.func cannot run a module that updates its buffers (BatchNorm's running statistics)."""
    op = CurvatureOperator(cnn_bn().train(), "cross_entropy", DATA, dtype=torch.float64, eval_mode=False)
    with pytest.raises(InputError, match="BatchNorm in train mode.*eval_mode=True"):
        op.matvec(np.ones(op.n))


def test_determinism_check_fires_on_double_backward_dropout_too():
    op = CurvatureOperator(mlp(dropout=0.3).train(), "cross_entropy", DATA, dtype=torch.float64,
                           eval_mode=False, mode="double-backward")
    with pytest.raises(NonDeterministicError):
        op.check_determinism()


# -- bad input -------------------------------------------------------------------------------
def test_nan_loss_is_reported():
    x, y = DATA
    x = x.clone()
    x[5, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        CurvatureOperator(mlp(), "cross_entropy", (x, y), dtype=torch.float64)
    x2 = DATA[0].clone()
    x2[100, 0] = float("inf")      # in a later batch: caught by the product
    op = CurvatureOperator(mlp(), "cross_entropy", (x2, y), batch_size=32, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match="batch 3"):
        op.matmat(block(op.n, 1))


class WithUnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(64, 10)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.body(x)


def test_unused_parameters_are_reported():
    with pytest.raises(InputError, match="unused.weight"):
        CurvatureOperator(WithUnusedHead(), "cross_entropy", digits_subset(50))
    op = CurvatureOperator(WithUnusedHead(), "cross_entropy", digits_subset(50), params=["body.*"])
    assert op.n == 650


def test_model_data_shape_mismatch_is_reported():
    with pytest.raises(InputError, match=r"first batch.*\(32, 64\)"):
        CurvatureOperator(nn.Linear(10, 10), "cross_entropy", digits_subset(50), batch_size=32)


def test_bad_shapes_and_empty_data():
    op = CurvatureOperator(mlp(), "cross_entropy", DATA, dtype=torch.float64)
    with pytest.raises(InputError, match="one entry per selected parameter"):
        op.matmat(np.zeros((op.n + 1, 2)))
    with pytest.raises(InputError, match="vector of length"):
        op.matvec(np.zeros(op.n - 1))
    with pytest.raises(InputError, match="empty"):
        CurvatureOperator(mlp(), "cross_entropy", (DATA[0][:0], DATA[1][:0]))
    with pytest.raises(InputError, match="differ in length"):
        CurvatureOperator(mlp(), "cross_entropy", (DATA[0], DATA[1][:10]))
    with pytest.raises(InputError, match="unknown loss"):
        CurvatureOperator(mlp(), "hinge", DATA)


def test_checkpoint_mismatch_is_reported():
    model = mlp()
    state = mlp(hidden=13).state_dict()
    with pytest.raises(InputError, match="shape mismatch.*0.weight"):
        load_state(model, state)
    state = dict(model.state_dict())
    state.pop("2.bias")
    state["extra"] = torch.zeros(1)
    with pytest.raises(InputError, match="missing keys.*2.bias.*unexpected keys.*extra"):
        load_state(model, state)


def test_to_scipy_operator():
    model, H, _ = reference("mlp")
    A = CurvatureOperator(model, "cross_entropy", DATA, dtype=torch.float64).to_scipy()
    V = block(A.shape[0], 2)
    np.testing.assert_allclose(A @ V, H @ V, rtol=0, atol=1e-11 * np.abs(H @ V).max())
    np.testing.assert_allclose(A.matvec(V[:, 0]), H @ V[:, 0], rtol=0, atol=1e-11 * np.abs(H @ V).max())


# -- speed options: auto mode, channels-last, torch.compile, out-of-memory splitting ----------

def test_auto_mode_picks_an_exact_mode_that_matches_dense():
    model, H, _ = reference("mlp")
    op = CurvatureOperator(model, "cross_entropy", DATA, batch_size=32, dtype=torch.float64, mode="auto")
    assert op.mode in ("forward", "double-backward") and op.hvps == 0      # timing products not counted
    V = block(op.n)
    np.testing.assert_allclose(op.matmat(V), H @ V, rtol=0, atol=1e-11 * np.abs(H @ V).max())
    assert op.describe()["mode"] == op.mode


def test_channels_last_images_match_dense():
    model, H, _ = reference("cnn_bn")
    images = (DATA[0].reshape(-1, 1, 8, 8), DATA[1])
    op = CurvatureOperator(model[1:], "cross_entropy", images, batch_size=32, dtype=torch.float64,
                           channels_last=True)
    assert op.batches.batches[0][0].is_contiguous(memory_format=torch.channels_last)
    assert op.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    V = block(op.n)
    np.testing.assert_allclose(op.matmat(V), H @ V, rtol=0, atol=1e-11 * np.abs(H @ V).max())


def test_compiled_products_match_dense():
    model, H, _ = reference("mlp")
    op = CurvatureOperator(model, "cross_entropy", DATA, batch_size=len(DATA[1]), dtype=torch.float64,
                           mode="forward", compiled=True)
    V = block(op.n, k=2)
    np.testing.assert_allclose(op.matmat(V), H @ V, rtol=0, atol=1e-11 * np.abs(H @ V).max())
    assert op.describe()["compiled"]


def test_compiles_stay_bounded_over_a_solve():
    """A partial last batch, k = 1 and k = 2 columns, a subset and a whole certified solve: the
    product compiles once per batch size, up front, and never inside the solve."""
    from hessdist.solvers import certify
    model, H, _ = reference("mlp")
    op = CurvatureOperator(model, "cross_entropy", DATA, batch_size=32, dtype=torch.float64,
                           mode="forward", compiled=True, compile_width=2)
    assert op.describe()["compiles"] == 2                           # batches of 32 and the last 24
    V = block(op.n, k=3)                                             # two chunks, the second padded
    np.testing.assert_allclose(op.matmat(V), H @ V, rtol=0, atol=1e-11 * np.abs(H @ V).max())
    np.testing.assert_allclose(op.matvec(V[:, 0]), H @ V[:, 0], rtol=0, atol=1e-11 * np.abs(H @ V).max())
    answer = certify.solve(op, which=("LA", "SA"), k=2, rtol=1e-6, seed=0)
    w = np.linalg.eigvalsh(H)
    pairs = answer.result.pairs
    assert answer.result.stop_reason == "converged"
    np.testing.assert_allclose(pairs["LA"].values, w[::-1][:2], rtol=1e-6)
    np.testing.assert_allclose(pairs["SA"].values, w[:2], rtol=1e-6)
    assert op.describe()["compiles"] == 2 and op.describe()["compile_width"] == 2
    assert op.describe()["compile_seconds"] > 0


def test_compile_fails_loudly_past_its_shape_limit():
    from hessdist.compiled import CompiledProduct
    product = CompiledProduct(lambda p, b, T: T * b.sum(), width=1, limit=2)
    T = torch.ones(1, 3)
    for rows_ in (1, 2):
        product(None, torch.ones(rows_), T)
    with pytest.raises(InputError, match="fixed batch sizes"):
        product(None, torch.ones(3), T)
    assert product.compiles == 2


def test_float32_precision_is_set_explicitly_and_restored():
    """On a GPU cuDNN convolutions default to TF32: each data pass sets IEEE float32 (or TF32 when
    asked) through the fp32_precision API only, and puts the previous settings back."""
    from hessdist import precision
    assert precision.NEW_API                                         # torch 2.13: never the legacy flags
    before = precision.in_force()
    with precision.float32_precision(False) as inside:
        assert inside == {"matmul": "ieee", "cudnn_conv": "ieee", "cudnn_rnn": "ieee"} == precision.in_force()
    with precision.float32_precision(True) as inside:
        assert set(inside.values()) == {"tf32"}
    assert precision.in_force() == before
    op = CurvatureOperator(mlp(), "cross_entropy", DATA, batch_size=32)
    op.matvec(np.ones(op.n))
    assert op.describe()["fp32_precision"] == {"matmul": "ieee", "cudnn_conv": "ieee", "cudnn_rnn": "ieee"}
    assert precision.in_force() == before


def test_auto_mode_with_no_exact_mode_names_the_fix():
    """PyTorch's multilabel margin loss has neither a forward-mode nor a second derivative (as a
    cuDNN RNN has neither): no exact mode exists, and the error says what does."""
    def multilabel_margin(outputs, y):
        targets = torch.full_like(outputs, -1, dtype=torch.long)
        targets[:, 0] = y
        return nn.functional.multilabel_margin_loss(outputs, targets)
    with pytest.raises(InputError, match="finite-difference"):
        CurvatureOperator(mlp(), multilabel_margin, DATA, batch_size=32, mode="auto")


def test_compile_refuses_double_backward():
    with pytest.raises(InputError, match="double backward"):
        CurvatureOperator(mlp(), "cross_entropy", DATA, mode="double-backward", compiled=True)
    assert CurvatureOperator(mlp(), "cross_entropy", DATA, mode="auto", compiled=True).mode == "forward"


def test_tf32_needs_cuda():
    with pytest.raises(InputError, match="CUDA"):
        CurvatureOperator(mlp(), "cross_entropy", DATA, tf32=True)


class MemoryLimited(nn.Module):
    """A real model on a device that holds at most ``limit`` samples per pass: larger inputs raise
    torch.OutOfMemoryError, exactly as a CUDA allocation failure does."""

    def __init__(self, net: nn.Module, limit: int):
        super().__init__()
        self.net, self.limit = net, limit

    def forward(self, x):
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {len(x)} > {self.limit} samples)")
        return self.net(x)


def test_out_of_memory_halves_the_micro_batch_with_the_same_answer():
    model, H, _ = reference("cnn_bn")
    with pytest.warns(MicroBatchWarning, match="continuing with micro-batches of 16") as record:
        op = CurvatureOperator(MemoryLimited(model, 20), "cross_entropy", DATA, batch_size=32,
                               dtype=torch.float64, mode="forward")
        V = block(op.n)
        HV = op.matmat(V)
    assert op.micro_batch == 16 and len(record) == 1                 # halved once, then remembered
    np.testing.assert_allclose(HV, H @ V, rtol=0, atol=1e-11 * np.abs(H @ V).max())
    full = CurvatureOperator(model, "cross_entropy", DATA, batch_size=32, dtype=torch.float64)
    (loss, g), (loss_ref, g_ref) = op.loss_and_gradient(), full.loss_and_gradient()
    assert abs(loss - loss_ref) < 1e-13 and float((g - g_ref).abs().max()) < 1e-13
    assert op.describe()["micro_batch"] == 16


def test_out_of_memory_that_splitting_cannot_fix_is_an_error():
    with pytest.warns(MicroBatchWarning), pytest.raises(OutOfMemory, match="ONE sample"):
        CurvatureOperator(MemoryLimited(mlp(), 0), "cross_entropy", DATA, batch_size=8, dtype=torch.float64)
    with pytest.raises(OutOfMemory, match="--batch-size"):      # train mode: splitting would change BN
        CurvatureOperator(MemoryLimited(mlp(), 4), "cross_entropy", DATA, batch_size=8, dtype=torch.float64,
                          eval_mode=False)
