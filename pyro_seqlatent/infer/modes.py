"""Evaluation mode for scoring: dropout off (and any other train/eval difference of a module).

Pyro models and guides are often ``nn.Module``\\ s; a held-out score must not depend on dropout
masks, so every scoring path of :mod:`pyro_seqlatent.infer` (validation in :func:`train`,
:func:`log_marginal`, :func:`evaluate`) runs inside :func:`eval_mode`, which puts the modules in
``eval()`` and then gives every submodule back the mode it had (a mixed train/eval tree, such
as a frozen encoder, stays as it was).
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
