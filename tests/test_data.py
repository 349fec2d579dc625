"""Data placement: a shard streamed from host memory on every product gives the products of the
resident one (same batches, same order), for tensors, Datasets and DataLoaders, subsets included;
``auto`` keeps data on the device when they fit and streams them when they do not."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from hessdist import data as data_module
from hessdist.curvature import CurvatureOperator
from hessdist.data import StreamedBatches, load_batches
from hessdist.errors import InputError

from .helpers import cnn_bn, digits_subset, reference

X, Y = digits_subset()          # 120 samples: batches of 32, 32, 32, 24


class Samples(Dataset):
    """A map-style dataset read one sample at a time, as from disk."""

    def __len__(self):
        return len(Y)

    def __getitem__(self, i):
        return X[i], Y[i]


SOURCES = {"tensors": lambda: (X, Y), "dataset": Samples,
           "loader": lambda: DataLoader(Samples(), batch_size=32, shuffle=False)}


def operator(data, placement, **kw):
    return CurvatureOperator(cnn_bn(), "cross_entropy", data, batch_size=32, dtype=torch.float64,
                             placement=placement, **kw)


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_streamed_shard_equals_resident_and_dense(source):
    _, H, _ = reference("cnn_bn")
    resident, streamed = operator((X, Y), "device"), operator(SOURCES[source](), "stream")
    assert isinstance(streamed.batches, StreamedBatches) and streamed.describe()["data"] == "stream"
    assert streamed.n_samples == resident.n_samples == 120 and streamed.micro_batch == 32
    V = np.random.default_rng(0).standard_normal((resident.n, 3))
    np.testing.assert_array_equal(streamed.matmat(V), resident.matmat(V))     # same batches: same bits
    np.testing.assert_allclose(streamed.matmat(V), H @ V, rtol=0, atol=1e-11 * np.abs(H @ V).max())
    loss, g = streamed.loss_and_gradient()
    ref_loss, ref_g = resident.loss_and_gradient()
    assert loss == ref_loss and torch.equal(g, ref_g)
    sub_s, sub_r = streamed.subset(0.3), resident.subset(0.3)
    assert sub_s.n_samples == sub_r.n_samples == 36 and sub_s.data_fraction == sub_r.data_fraction
    np.testing.assert_allclose(sub_s.matmat(V), sub_r.matmat(V), rtol=0, atol=1e-13 * np.abs(H @ V).max())


def test_streaming_with_loader_processes_and_channels_last():
    resident = operator((X, Y), "device", channels_last=True)
    streamed = operator(Samples(), "stream", channels_last=True, loader_workers=2)
    V = np.random.default_rng(1).standard_normal((resident.n, 2))
    np.testing.assert_array_equal(streamed.matmat(V), resident.matmat(V))


def test_auto_placement_follows_free_memory(monkeypatch):
    assert operator(Samples(), "auto").describe()["data"] == "device"
    monkeypatch.setattr(data_module, "free_memory", lambda device: 1000)     # 120 images need 30 kB
    assert operator(Samples(), "auto").describe()["data"] == "stream"


def test_bad_data_sources_are_named():
    with pytest.raises(InputError, match="placement must be one of"):
        load_batches((X, Y), placement="disk")
    with pytest.raises(InputError, match="ray.data dataset or an"):
        load_batches([1, 2, 3], placement="stream")
    with pytest.raises(InputError, match="differ in length"):
        load_batches((X, Y[:5]), placement="stream")
    with pytest.raises(InputError, match="empty"):
        operator((X[:0], Y[:0]), "stream")
