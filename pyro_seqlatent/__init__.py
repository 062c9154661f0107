"""pyro_seqlatent: deep latent-variable models of sequences and densities for Pyro.

Every system is a Pyro ``model``/``guide`` pair (``nn.Module`` / ``PyroModule``) trained by the
one SVI loop :func:`pyro_seqlatent.infer.train` and scored by the one evaluation path
:func:`pyro_seqlatent.infer.log_marginal`.
"""

__version__ = "0.1.0"
