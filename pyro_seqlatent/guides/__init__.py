"""Reusable site guides (mean-field and flow) for any named latent site, and autoguides for any
model (:class:`AutoFlow`, :class:`AutoAmortized`)."""

from pyro_seqlatent.guides.auto import AutoAmortized, AutoFlow
from pyro_seqlatent.guides.flow import FlowGuide
from pyro_seqlatent.guides.site import MeanFieldGuide, SiteGuide
from pyro_seqlatent.guides.steps import StepGroup, StepNormal

__all__ = ["AutoAmortized", "AutoFlow", "FlowGuide", "MeanFieldGuide", "SiteGuide", "StepGroup",
           "StepNormal"]
