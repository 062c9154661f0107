"""Neural-network building blocks shared by flows, guides and models."""

from pyro_seqlatent.nn.mlp import MLP

__all__ = ["MLP"]
