r"""Per-step and per-sequence scores of sequence models: the negative ELBO and the NLL.

For sequence :math:`n` with :math:`T_n` scored steps (the unmasked steps of its padded batch)
and :math:`K` draws :math:`z^{(k)} \sim q(z \mid x_n)` with weights
:math:`w_k = p(x_n, z^{(k)}) / q(z^{(k)} \mid x_n)` (:func:`~pyro_seqlatent.infer.evaluate`):

.. math::
    \mathrm{NLL}_n = -\log \frac1K \sum_k w_k, \qquad
    -\mathrm{ELBO}_n = -\frac1K \sum_k \log w_k \;\ge\; \mathrm{NLL}_n \text{ (in expectation)},

and the per-step figures divide totals over the data set by its number of scored steps,

.. math::
    \mathrm{NLL/step} = \frac{\sum_n \mathrm{NLL}_n}{\sum_n T_n}, \qquad
    -\mathrm{ELBO/step} = \frac{\sum_n -\mathrm{ELBO}_n}{\sum_n T_n}

(as Pyro's DMM reports its test −ELBO per time step). For a model without latents (the RNN
baselines) both are the exact negative log-likelihood. The gap between the two per-step
figures is how much the guide loses against the posterior; near 0 for a model with latents,
it is also the sign of an unused latent (posterior collapse).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from pyro_seqlatent.infer.evaluate import evaluate
from pyro_seqlatent.infer.loader import make_loader


@dataclass(frozen=True)
class SequenceScores:
    """What :func:`score_sequences` returns: per-sequence tensors ``(N,)`` in data-set order and
    the figures derived from them (nats)."""

    #: :math:`-\mathrm{ELBO}_n`, the mean of the negative log-weights of sequence n
    neg_elbo: torch.Tensor
    #: :math:`\mathrm{NLL}_n`, the importance-sampled negative log-likelihood of sequence n
    nll: torch.Tensor
    #: :math:`T_n`, the scored steps of sequence n
    steps: torch.Tensor
    #: :math:`K`
    num_samples: int

    @property
    def neg_elbo_per_step(self) -> float:
        return float(self.neg_elbo.sum() / self.steps.sum())

    @property
    def nll_per_step(self) -> float:
        return float(self.nll.sum() / self.steps.sum())

    @property
    def neg_elbo_per_sequence(self) -> float:
        return float(self.neg_elbo.mean())

    @property
    def nll_per_sequence(self) -> float:
        return float(self.nll.mean())

    @property
    def nll_per_sequence_sem(self) -> float:
        n = self.nll.numel()
        return float(self.nll.std() / math.sqrt(n)) if n > 1 else float("nan")

    def as_dict(self) -> dict[str, float]:
        """The figures (no tensors), e.g. for a JSON table."""
        return {"num_sequences": int(self.nll.numel()), "num_steps": int(self.steps.sum()),
                "num_samples": self.num_samples,
                "neg_elbo_per_step": self.neg_elbo_per_step, "nll_per_step": self.nll_per_step,
                "neg_elbo_per_sequence": self.neg_elbo_per_sequence,
                "nll_per_sequence": self.nll_per_sequence,
                "nll_per_sequence_sem": self.nll_per_sequence_sem}


def sequence_steps(batch: Any) -> torch.Tensor:
    """The scored steps of each sequence of a collated batch, ``(B,)``: a ``"mask"`` entry
    ``(B, T)`` counts its true entries per row, a ``(B, T, D)`` mask its time points with an
    observed feature; without a mask every sequence has the ``T`` steps of its
    ``(B, T, D)`` tensor (a dict's ``"x"`` or ``"values"``, a tuple's first entry, or the
    batch itself)."""
    if isinstance(batch, dict):
        mask = batch.get("mask")
        if mask is not None:
            observed = mask != 0
            return (observed.any(-1) if observed.dim() == 3 else observed).sum(-1).long()
        x = batch.get("x", batch.get("values"))
    else:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not torch.is_tensor(x) or x.dim() < 2:
        raise ValueError("score_sequences: a collated batch must be a (B, T, D) tensor, a "
                         "tuple starting with one, or a dict with 'mask' or 'x'; pass the "
                         "collate_fn that batches these sequences (e.g. pad_collate)")
    return torch.full((x.shape[0],), x.shape[1], dtype=torch.long)


def score_sequences(model: Callable, guide: Callable, data: Dataset,
                    collate_fn: Callable | None = None, num_samples: int = 100, *,
                    batch_size: int = 16, seed: int = 0, chunk_size: int | None = None,
                    device: str | torch.device = "cpu",
                    batch_plate: str = "data") -> SequenceScores:
    r"""Per-sequence :math:`-\mathrm{ELBO}_n` and :math:`\mathrm{NLL}_n` of ``data`` from
    :math:`K` = ``num_samples`` importance samples each (module docstring), with the scored
    steps of each sequence for the per-step figures.

    :param collate_fn: how to batch ``data``; ``None``: the model's ``collate_fn`` attribute
        (:func:`~pyro_seqlatent.data.sequences.pad_collate` for the VRNN and RNN models).
    :param seed: seed of the importance samples (the global RNG is left as it was).
    :returns: :class:`SequenceScores`.
    """
    if collate_fn is None:
        collate_fn = getattr(model, "collate_fn", None)
    est = evaluate(model, guide, data, num_samples=num_samples, batch_size=batch_size,
                   collate_fn=collate_fn, batch_plate=batch_plate, chunk_size=chunk_size,
                   device=device, seed=seed)
    with torch.random.fork_rng():  # a DataLoader draws its base seed from the global RNG
        steps = torch.cat([sequence_steps(batch) for batch in
                           make_loader(data, batch_size=batch_size, collate_fn=collate_fn)])
    if steps.numel() != est["num_points"]:
        raise ValueError(f"score_sequences: {est['num_points']} sequences scored but "
                         f"{steps.numel()} counted; the batch plate must run over sequences")
    return SequenceScores(neg_elbo=-est["elbo_per_point"], nll=-est["log_marginal_per_point"],
                          steps=steps, num_samples=num_samples)
