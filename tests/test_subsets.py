"""fixed_subset: the same representative items on every call, never just the first N."""

import pytest
import torch
from torch.utils.data import TensorDataset

from pyro_seqlatent.data.subsets import fixed_subset


def test_fixed_subset_is_seeded_sorted_and_covers_a_class_sorted_file():
    labels = torch.arange(10).repeat_interleave(100)  # sorted by class, as binarized MNIST test
    data = TensorDataset(labels)
    a, b = fixed_subset(data, 50), fixed_subset(data, 50)
    assert a.indices == b.indices and a.indices == sorted(a.indices)
    assert len(set(a.indices)) == 50
    classes = {int(data[i][0]) for i in a.indices}
    assert len(classes) >= 8  # the first 50 items would all be class 0
    assert fixed_subset(data, 50, seed=1).indices != a.indices
    assert fixed_subset(data, None) is data and fixed_subset(data, 5000) is data
    with pytest.raises(ValueError, match="size"):
        fixed_subset(data, 0)
