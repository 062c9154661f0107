"""Reusable site guides (mean-field and flow) for any named latent site."""

from pyro_seqlatent.guides.flow import FlowGuide
from pyro_seqlatent.guides.site import MeanFieldGuide, SiteGuide
from pyro_seqlatent.guides.steps import StepGroup, StepNormal

__all__ = ["FlowGuide", "MeanFieldGuide", "SiteGuide", "StepGroup", "StepNormal"]
