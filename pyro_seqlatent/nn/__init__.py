"""Neural-network building blocks shared by flows, guides and models."""

from pyro_seqlatent.nn.made import MADE, MaskedLinear
from pyro_seqlatent.nn.mlp import MLP

__all__ = ["MADE", "MLP", "MaskedLinear"]
