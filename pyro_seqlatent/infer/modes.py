"""Evaluation mode for scoring: dropout off (and any other train/eval difference of a module).

Pyro models and guides are often ``nn.Module``\\ s; a held-out score must not depend on dropout
masks, so every scoring path of :mod:`pyro_seqlatent.infer` (validation in :func:`train`,
:func:`log_marginal`, :func:`evaluate`, the held-out curves of the estimator lab) runs inside
:func:`eval_mode`, which puts the modules in ``eval()`` and then gives every submodule back the
mode it had (a mixed train/eval tree, such as a frozen encoder, stays as it was).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(*objects: object) -> Iterator[None]:
    """Put every ``nn.Module`` among ``objects`` in eval mode inside the block; other objects
    (plain Pyro functions) are left alone. Restores each submodule's own ``training`` flag."""
    modules = [o for o in objects if isinstance(o, nn.Module)]
    saved = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for root in modules:
            root.eval()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


#: module types whose forward differs between train and eval mode
MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)


def mode_dependent_modules(*objects: object) -> list[str]:
    """Names (``"ClassName at path"``) of the submodules among ``objects`` that behave
    differently in train and eval mode (dropout, batch norm); empty when none do."""
    found = []
    for root in objects:
        if isinstance(root, nn.Module):
            for name, m in root.named_modules():
                if isinstance(m, MODE_DEPENDENT):
                    found.append(f"{type(m).__name__} at {name or type(root).__name__}")
    return found
