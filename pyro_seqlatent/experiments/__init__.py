"""Experiment drivers: where models, data and inference meet."""
