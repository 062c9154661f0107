"""make_loader: batches gathered by index are DataLoader's batches, batch by batch."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pyro_seqlatent.data.mnist import BinarizedMNIST
from pyro_seqlatent.infer.loader import IndexedBatches, in_memory_tensors, make_loader

try:  # where train's sampler lives (infer.train re-exports it after the split)
    from pyro_seqlatent.infer.epochs import ResumableSampler
except ImportError:  # pragma: no cover
    from pyro_seqlatent.infer.train import ResumableSampler

N = 23


def assert_same(a, b):
    """Same structure, types, dtypes, shapes and values."""
    assert type(a) is type(b), (type(a), type(b))
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
        assert a.is_contiguous() == b.is_contiguous()
        assert torch.equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def several_tensors():
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 3, 2, generator=gen),
                         torch.randint(0, 9, (N,), generator=gen),
                         torch.rand(N, 4, generator=gen) < 0.5,
                         torch.randn(N, 5, generator=gen).double())


def one_tensor():
    return TensorDataset(torch.randn(N, 7, generator=torch.Generator().manual_seed(1)))


def mnist_like():
    data = BinarizedMNIST.__new__(BinarizedMNIST)  # no file: the images set by hand
    data.images = (torch.rand(N, 784, generator=torch.Generator().manual_seed(2)) < 0.5).float()
    data.split = "train"
    return data


def bare_tensor():
    return torch.randn(N, 3, 2, generator=torch.Generator().manual_seed(3)).double()


DATASETS = {"several_tensors": several_tensors, "one_tensor": one_tensor, "mnist": mnist_like,
            "tensor": bare_tensor}


def both(dataset, batch_size, drop_last, shuffle, **kwargs):
    """(make_loader, DataLoader), each with its own ResumableSampler in the same state."""
    out = []
    for fn in (make_loader, DataLoader):
        sampler = ResumableSampler(dataset, shuffle, 3, drop_last)
        out.append(fn(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(3), **kwargs))
    return out


def epochs_of(loader, epochs_and_skips, batch_size):
    batches = []
    for epoch, skip in epochs_and_skips:
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = 0
        loader.sampler.skip = min(skip, len(loader) - 1) * batch_size  # a resumed epoch
        loader.generator.manual_seed(3 + epoch)
        batches.append((len(loader), list(loader)))
    return batches


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("batch_size", [1, 5, N])
def test_the_batches_are_dataloaders(name, shuffle, drop_last, batch_size):
    dataset = DATASETS[name]()
    fast, reference = both(dataset, batch_size, drop_last, shuffle)
    assert isinstance(fast, IndexedBatches)
    schedule = [(0, 0), (1, 0), (1, 2), (4, 1), (5, 0)]  # skip > 0 mid-run, epochs change
    got, want = epochs_of(fast, schedule, batch_size), epochs_of(reference, schedule, batch_size)
    assert [n for n, _ in got] == [n for n, _ in want]
    for (n, a), (_, b) in zip(got, want):
        assert len(a) == len(b) == n
        for x, y in zip(a, b):
            assert_same(x, y)
    if name in ("mnist", "tensor"):  # items are tensors
        assert torch.is_tensor(got[0][1][0])
    else:  # a TensorDataset's items are tuples: default_collate gives a list
        assert type(got[0][1][0]) is list


def test_a_shorter_batch_and_iterating_twice():
    dataset = several_tensors()
    fast, reference = both(dataset, 10, False, True)
    assert len(fast) == len(reference) == 3
    for _ in range(2):  # iter(sampler) is called anew each time: the same epoch again
        for x, y in zip(fast, reference, strict=True):
            assert_same(x, y)


def test_the_random_streams_stay_those_of_dataloader():
    dataset = one_tensor()
    for generator in (None, torch.Generator().manual_seed(5)):
        states = []
        for fn in (make_loader, DataLoader):
            torch.manual_seed(0)
            if generator is not None:
                generator.manual_seed(5)
            loader = fn(dataset, batch_size=4, shuffle=True, generator=generator)
            batches = list(loader)
            states.append((batches, torch.randn(3),
                           generator.get_state() if generator is not None else None))
        (a, ra, ga), (b, rb, gb) = states
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
        assert torch.equal(ra, rb)
        assert ga is None or torch.equal(ga, gb)


def test_without_sampler_it_is_sequential_like_dataloader():
    dataset = several_tensors()
    fast = make_loader(dataset, batch_size=4)
    assert isinstance(fast, IndexedBatches)
    for x, y in zip(fast, DataLoader(dataset, batch_size=4), strict=True):
        assert_same(x, y)


class Doubled(TensorDataset):
    def __getitem__(self, index):
        return tuple(2 * t[index] for t in self.tensors)


class Lying(Dataset):
    """Has ``tensors`` but its items are not their rows."""

    def __init__(self):
        self.tensors = (torch.arange(6.0),)

    def __len__(self):
        return 6

    def __getitem__(self, index):
        return self.tensors[0][index] + 1


class Named(Dataset):
    """Has ``tensors`` and items that are their rows: the fast path applies."""

    def __init__(self):
        self.tensors = (torch.arange(12.0).reshape(6, 2), torch.arange(6))

    def __len__(self):
        return 6

    def __getitem__(self, index):
        return tuple(t[index] for t in self.tensors)


def test_everything_else_gets_a_dataloader():
    dataset = several_tensors()
    custom = make_loader(dataset, batch_size=4, collate_fn=lambda rows: len(rows))
    assert type(custom) is DataLoader
    assert list(custom) == [4] * 5 + [3]
    assert type(make_loader(dataset, batch_size=4, num_workers=1)) is DataLoader
    for other in (Doubled(torch.arange(6.0)), Lying(), [torch.zeros(2)] * 3):
        assert in_memory_tensors(other) is None
        loader = make_loader(other, batch_size=4)
        assert type(loader) is DataLoader
    assert torch.equal(next(iter(make_loader(Lying(), batch_size=6))), torch.arange(1.0, 7.0))
    named = make_loader(Named(), batch_size=4)
    assert isinstance(named, IndexedBatches)
    for x, y in zip(named, DataLoader(Named(), batch_size=4), strict=True):
        assert_same(x, y)
    with pytest.raises(ValueError, match="mutually exclusive"):  # as DataLoader says
        make_loader(dataset, batch_size=4, sampler=ResumableSampler(dataset, True, 0, False),
                    shuffle=True)
