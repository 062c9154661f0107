"""Reusable site guides (mean-field and flow) for any named latent site, and autoguides for any
model (:class:`AutoFlow`, :class:`AutoAmortized`), and guides whose flow follows the model's
gradient (:class:`HamiltonianGuide`, :class:`LangevinGuide`)."""

from pyro_seqlatent.guides.auto import AutoAmortized, AutoFlow
from pyro_seqlatent.guides.flow import FlowGuide
from pyro_seqlatent.guides.hamiltonian import (
    HamiltonianGuide,
    LangevinGuide,
    ModelFlowGuide,
    model_log_joint,
)
from pyro_seqlatent.guides.site import MeanFieldGuide, SiteGuide
from pyro_seqlatent.guides.steps import StepGroup, StepNormal

__all__ = ["AutoAmortized", "AutoFlow", "FlowGuide", "HamiltonianGuide", "LangevinGuide",
           "MeanFieldGuide", "ModelFlowGuide", "SiteGuide", "StepGroup", "StepNormal",
           "model_log_joint"]
