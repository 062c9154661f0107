"""Statically binarized MNIST (Larochelle & Murray 2011): 50,000 / 10,000 / 10,000 images.

The set of the VAE, planar-flow and IWAE papers. Files
``binarized_mnist/binarized_mnist_{train,valid,test}.mat`` under the data root (MATLAB v5,
``X`` uint8 in {0, 1}, shape (N, 784)).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from pyro_seqlatent.data.root import data_file, data_file_error, reading_data_file

SPLITS = ("train", "valid", "test")
IMAGE_SHAPE = (28, 28)


def load_binarized_mnist(split: str, root: str | os.PathLike | None = None) -> torch.Tensor:
    """The ``split`` images as a float32 tensor of 0/1 values, shape ``(N, 784)``."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    import scipy.io

    path = data_file(f"binarized_mnist/binarized_mnist_{split}.mat", root)
    with reading_data_file(path, "not a readable MATLAB file (truncated or corrupt)"):
        contents = scipy.io.loadmat(path)
    array = contents.get("X")
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] != 784:
        found = "no variable X" if array is None else f"X of shape {np.shape(array)}"
        raise data_file_error(path, f"expected a variable X of shape (N, 784), found {found}")
    # MATLAB files hold column-major arrays: rows made contiguous here, or every batch would
    # gather its images from 784 places 50,000 floats apart (~100x slower to index)
    return torch.from_numpy(array.astype("float32", order="C"))


class BinarizedMNIST(Dataset):
    """One split of statically binarized MNIST; items are ``(784,)`` float tensors in {0, 1}.

    :param limit: keep only the first ``limit`` images (quick runs).
    """

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None,
                 limit: int | None = None):
        images = load_binarized_mnist(split, root)
        self.images = images[:limit] if limit else images
        self.split = split

    @property
    def tensors(self) -> tuple[torch.Tensor]:
        """``(images,)``: ``self[i]`` is ``self.tensors[0][i]``, so a loader can gather a batch
        by index (:func:`pyro_seqlatent.infer.loader.make_loader`) instead of row by row."""
        return (self.images,)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]
