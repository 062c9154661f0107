"""Reusable site guides (mean-field and flow) for any named latent site."""

from pyro_seqlatent.guides.site import MeanFieldGuide, SiteGuide

__all__ = ["MeanFieldGuide", "SiteGuide"]
