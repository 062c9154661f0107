r"""k-means++ seeding and Lloyd's k-means on torch tensors (the initialisers of the mixtures).

k-means++ (Arthur & Vassilvitskii, 2007) draws the first centre uniformly and every next one with
probability :math:`\propto D(x)^2`, the squared distance to the nearest centre chosen so far; the
greedy variant draws :math:`2 + \lfloor\ln K\rfloor` candidates and keeps the one that most
reduces the potential :math:`\sum_n D(x_n)^2`.
"""

from __future__ import annotations

import math

import torch


def squared_distances(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    r""":math:`\lVert x_n - c_k\rVert^2 = \lVert x_n\rVert^2 - 2 x_n^\top c_k + \lVert c_k\rVert^2`,
    clamped at 0, shape (N, K)."""
    d2 = (X * X).sum(1, keepdim=True) - 2.0 * X @ C.T + (C * C).sum(1)
    return d2.clamp_min_(0.0)


def kmeans_plusplus(X: torch.Tensor, n_clusters: int, generator: torch.Generator,
                    n_local_trials: int | None = None) -> torch.Tensor:
    """Greedy k-means++ centres, shape (n_clusters, D), chosen among the rows of ``X``."""
    n = X.shape[0]
    if n_clusters > n:
        raise ValueError(f"n_components={n_clusters} exceeds the number of samples {n}")
    if n_local_trials is None:
        n_local_trials = 2 + int(math.log(n_clusters))
    first = int(torch.randint(n, (1,), generator=generator, device=generator.device))
    centers = [X[first]]
    closest = squared_distances(X, X[first:first + 1]).squeeze(1)
    potential = closest.sum()
    for _ in range(1, n_clusters):
        if float(potential) <= 0.0:  # fewer distinct points than clusters: pick at random
            idx = torch.randint(n, (1,), generator=generator, device=generator.device)
        else:
            idx = torch.multinomial(closest / potential, n_local_trials, replacement=True,
                                    generator=generator)
        cand = torch.minimum(closest.unsqueeze(0), squared_distances(X, X[idx]).T)
        pots = cand.sum(1)
        best = int(torch.argmin(pots))
        centers.append(X[idx[best]])
        closest, potential = cand[best], pots[best]
    return torch.stack(centers)


def kmeans(X: torch.Tensor, n_clusters: int, generator: torch.Generator, max_iter: int = 100,
           tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm from k-means++ centres; returns (centres (K, D), labels (N,)).

    Stops when the centres move less than ``tol`` times the mean feature variance (squared).
    An emptied cluster keeps its previous centre.
    """
    centers = kmeans_plusplus(X, n_clusters, generator)
    scale = X.var(0).mean().clamp_min(torch.finfo(X.dtype).tiny)
    for _ in range(max_iter):
        labels = squared_distances(X, centers).argmin(1)
        one_hot = torch.nn.functional.one_hot(labels, n_clusters).to(X.dtype)
        counts = one_hot.sum(0)
        sums = one_hot.T @ X
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
        shift = ((new - centers) ** 2).sum()
        centers = new
        if float(shift) <= tol * float(scale):
            break
    return centers, squared_distances(X, centers).argmin(1)
