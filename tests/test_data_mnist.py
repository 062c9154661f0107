import pytest
import torch

from conftest import require_data
from pyro_seqlatent.data.mnist import BinarizedMNIST, load_binarized_mnist
from pyro_seqlatent.data.root import DataNotFoundError


def test_real_binarized_mnist_splits():
    require_data("binarized_mnist/binarized_mnist_test.mat")
    test = load_binarized_mnist("test")
    assert test.shape == (10000, 784) and test.dtype == torch.float32
    assert set(test.unique().tolist()) == {0.0, 1.0}
    assert abs(test.mean().item() - 0.1325) < 5e-4  # the data README's pixel mean
    ds = BinarizedMNIST("valid", limit=7)
    assert len(ds) == 7 and ds[3].shape == (784,)


def test_missing_file_names_file_and_variable(tmp_path):
    with pytest.raises(DataNotFoundError, match="binarized_mnist_train.mat.*PYRO_SEQLATENT_DATA"):
        load_binarized_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_binarized_mnist("training", root=tmp_path)
