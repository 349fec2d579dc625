"""Batches of any shape: dict batches and keyword models (the pairs contract), and a model's own
loss over dict batches with token-level sample weighting (BatchLoss), against dense float64
Hessians built without hessdist's operator."""
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import hessdist
from hessdist import BatchLoss, CurvatureOperator
from hessdist.cli import main
from hessdist.errors import InputError

from . import helpers

TOKENS = BatchLoss("causal_lm", "predicted_tokens")


def dense(op) -> np.ndarray:
    return op.matmat(np.eye(op.n))


@pytest.fixture(scope="module")
def gpt2():
    model, data = helpers.tiny_gpt2(), helpers.gpt2_tokens()
    return model, data, helpers.dense_gpt2_hessian(model, data).numpy()


def test_gpt2_dict_batches_weight_every_predicted_token(gpt2):
    model, data, H = gpt2
    op = CurvatureOperator(model, TOKENS, data, batch_size=7, dtype=torch.float64, params=helpers.GPT2_PARAMS)
    assert op.n == H.shape[0] == 64
    assert op.n_samples == int((data["labels"][:, 1:] != -100).sum())      # tokens, not sequences
    np.testing.assert_allclose(dense(op), H, rtol=0, atol=1e-10 * np.abs(H).max())
    # causal_lm counts predicted tokens by default; the same loss counted by rows (sequences) weights
    # short sequences too much: a different matrix
    assert BatchLoss("causal_lm").count(data) == op.n_samples
    rows = CurvatureOperator(model, BatchLoss("causal_lm", "rows"), data, batch_size=7, dtype=torch.float64,
                             params=helpers.GPT2_PARAMS)
    assert rows.n_samples == 48 and np.abs(dense(rows) - H).max() > 1e-3 * np.abs(H).max()
    # the model's own loss (Hugging Face computes it in float32) agrees to float32 accuracy
    own = CurvatureOperator(model, BatchLoss("model_loss", "predicted_tokens"), data, batch_size=7,
                            dtype=torch.float64, params=helpers.GPT2_PARAMS)
    H_own = helpers.dense_gpt2_hessian(model, data, own_loss=True).numpy()
    np.testing.assert_allclose(dense(own), H_own, rtol=0, atol=1e-6 * np.abs(H).max())
    np.testing.assert_allclose(H_own, H, rtol=0, atol=1e-6 * np.abs(H).max())


def test_gpt2_extreme_eigenvalues_match_dense_eigh(gpt2):
    model, data, H = gpt2
    lam = np.linalg.eigvalsh(H)
    op = CurvatureOperator(model, TOKENS, data, batch_size=16, dtype=torch.float64, params=helpers.GPT2_PARAMS)
    res = hessdist.lanczos(op, which="LA,SA", k=2, tol=1e-10, seed=0)
    assert res.converged and lam[0] < 0 < lam[-1]
    np.testing.assert_allclose(res.largest.values, lam[::-1][:2], rtol=1e-8)
    np.testing.assert_allclose(res.smallest.values, lam[:2], rtol=1e-8)


def test_gpt2_through_the_cli_with_params(gpt2, tmp_path):
    _, _, H = gpt2
    lam = np.linalg.eigvalsh(H)
    out = tmp_path / "gpt2.json"
    code = main(["eigs", "--model", "tests.helpers:tiny_gpt2", "--data", "tests.helpers:gpt2_tokens",
                 "--batch-loss", "causal_lm", "--batch-samples", "predicted_tokens", "--params",
                 ",".join(helpers.GPT2_PARAMS), "--dtype", "float64", "--batch-size", "10", "--workers", "0",
                 "--which", "LA,SA", "--rtol", "1e-6", "--seed", "0", "--quiet", "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and result["converged"] and result["n_params"] == 64
    assert result["n_samples"] == int((helpers.gpt2_tokens()["labels"][:, 1:] != -100).sum())
    np.testing.assert_allclose([result["largest"][0], result["smallest"][0]], [lam[-1], lam[0]], rtol=1e-6)


class DictSamples(Dataset):
    """A map-style dataset of dict samples, as Hugging Face datasets give them."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.data.items()}


@pytest.mark.parametrize("placement", ["device", "stream"])
def test_a_dataset_of_dict_samples_and_a_subset_count_tokens(gpt2, placement):
    model, data, H = gpt2
    op = CurvatureOperator(model, TOKENS, DictSamples(data), batch_size=8, dtype=torch.float64,
                           params=helpers.GPT2_PARAMS, placement=placement)
    np.testing.assert_allclose(dense(op), H, rtol=0, atol=1e-10 * np.abs(H).max())
    sub = op.subset(0.25)                        # rows 0, 4, 8, ...: fpe counted by the tokens they hold
    picked = data["labels"][::4, 1:]
    assert sub.n_samples == int((picked != -100).sum())
    assert sub.data_fraction == pytest.approx(sub.n_samples / op.n_samples)


class KeywordMLP(nn.Module):
    """A model with keyword inputs: image and a per-sample scale."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))

    def forward(self, pixels, scale):
        return self.body(pixels * scale[:, None])


def test_keyword_inputs_in_the_pairs_contract_hessian_and_ggn():
    x, y = helpers.digits_subset(90)
    scale = torch.linspace(0.5, 1.5, len(y), dtype=torch.float64)
    model = KeywordMLP().double()
    as_dict = CurvatureOperator(model, "cross_entropy", ({"pixels": x, "scale": scale}, y), batch_size=32,
                                dtype=torch.float64)
    H = helpers.dense_hessian(model.body, x * scale[:, None], y)
    np.testing.assert_allclose(dense(as_dict), H, rtol=0, atol=1e-10 * np.abs(H).max())
    ggn = CurvatureOperator(model, "cross_entropy", ({"pixels": x, "scale": scale}, y), curvature="ggn",
                            dtype=torch.float64)
    G = helpers.dense_ggn_cross_entropy(model.body, x * scale[:, None], y)
    np.testing.assert_allclose(dense(ggn), G, rtol=0, atol=1e-10 * np.abs(G).max())


def test_bad_batches_are_named():
    model, data = helpers.tiny_gpt2(), helpers.gpt2_tokens()
    with pytest.raises(InputError, match="GGN needs the model's outputs"):
        CurvatureOperator(model, TOKENS, data, curvature="ggn", dtype=torch.float64)
    with pytest.raises(InputError, match="same first dimension"):
        CurvatureOperator(model, TOKENS, {**data, "labels": data["labels"][:5]}, dtype=torch.float64)
    with pytest.raises(InputError, match="unknown sample count 'tokens'"):
        BatchLoss("model_loss", "tokens")
    with pytest.raises(InputError, match="returned no loss"):
        CurvatureOperator(model, BatchLoss("model_loss"), {k: v for k, v in data.items() if k != "labels"},
                          dtype=torch.float64)
    with pytest.raises(InputError, match="need data_columns=.*or a BatchLoss"):
        CurvatureOperator(model, "cross_entropy", DictSamples(data), dtype=torch.float64)
    samples = [DictSamples(data)[i] for i in range(5)]          # a list of per-sample dicts, not one batch
    with pytest.raises(InputError, match="list of 5 samples.*stack the samples"):
        CurvatureOperator(model, TOKENS, samples, dtype=torch.float64)
    x, y = helpers.digits_subset(4)
    with pytest.raises(InputError, match="list of 4 samples"):
        CurvatureOperator(nn.Linear(64, 10).double(), "cross_entropy", list(zip(x, y)), dtype=torch.float64)
    with pytest.raises(InputError, match="the data hold no samples the loss counts"):
        CurvatureOperator(model, TOKENS, {**data, "labels": torch.full_like(data["labels"], -100)})
    first_masked = {**data, "labels": data["labels"].clone()}
    first_masked["labels"][:4] = -100
    with pytest.raises(InputError, match="the first 4 rows hold no sample the loss counts"):
        CurvatureOperator(model, TOKENS, first_masked, batch_size=4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="samples='predicted_tokens'"):
        CurvatureOperator(model, BatchLoss("model_loss"), data, dtype=torch.float64, params=helpers.GPT2_PARAMS)


def test_batches_without_counted_tokens_add_nothing(gpt2):
    """Sequences whose labels are all masked count no sample: their batches add nothing, the
    same matrix as without them."""
    model, data, H = gpt2
    masked = {**data, "labels": data["labels"].clone()}
    masked["labels"][8:] = -100                       # batches of 8: only the first one counts tokens
    op = CurvatureOperator(model, TOKENS, masked, batch_size=8, dtype=torch.float64, params=helpers.GPT2_PARAMS)
    first = CurvatureOperator(model, TOKENS, {k: v[:8] for k, v in data.items()}, batch_size=8,
                              dtype=torch.float64, params=helpers.GPT2_PARAMS)
    assert op.n_samples == first.n_samples
    np.testing.assert_allclose(dense(op), dense(first), rtol=0, atol=1e-12 * np.abs(H).max())


def test_fused_attention_without_second_derivatives_is_explained():
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=40, n_positions=16, attn_implementation="sdpa")
    model = GPT2LMHeadModel(config).double().eval()
    with pytest.raises(InputError, match="attn_implementation='eager'"):      # when the mode is chosen
        CurvatureOperator(model, TOKENS, helpers.gpt2_tokens(), dtype=torch.float64, mode="auto",
                          params=["transformer.h.0.attn.c_attn.bias"])       # before the attention
    op = CurvatureOperator(model, TOKENS, helpers.gpt2_tokens(), dtype=torch.float64, mode="forward",
                           params=["transformer.h.0.attn.c_attn.bias"])
    with pytest.raises(InputError, match="attn_implementation='eager'"):      # or at the first product
        op.matvec(np.ones(op.n))
