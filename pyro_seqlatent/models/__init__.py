"""Models. Each module registers its systems with :func:`pyro_seqlatent.registry.register_model`
when imported; :func:`pyro_seqlatent.registry.load_builtin_models` imports them all."""
