"""Portable weights: a run's parameters as a ``safetensors`` file that any tool reads without
this library (``safetensors.torch.load_file``, or the Rust / NumPy readers), beside the JSON
configuration the run folder already holds (``config.json``, ``train_config.json``).

Tensor names are ``model.<state_dict key>``, ``guide.<state_dict key>`` and
``param_store.<pyro.param name>`` (the unconstrained value, as Pyro's param store keeps it);
the file's metadata holds ``step`` and ``source`` (the
checkpoint it came from). ``safetensors`` stores raw tensors only, so reading it can run no code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pyro_seqlatent.infer.checkpoint import load_checkpoint

WEIGHTS = "weights.safetensors"
SECTIONS = ("model", "guide", "param_store")


def export_weights(source: str | os.PathLike, out: str | os.PathLike | None = None,
                   averaged: bool = True) -> Path:
    """Write the parameters of a checkpoint (``source``: a ``.pt`` file, or a run folder, whose
    ``best.pt`` is used when it exists, else ``checkpoint.pt``) to ``out`` (default: the run
    folder's ``weights.safetensors``). A run trained with parameter averaging exports the
    average (what validation scored) unless ``averaged=False``."""
    from safetensors.torch import save_file

    path = Path(source)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").exists() else path / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    values = ckpt["averaged"] if averaged and ckpt.get("averaged") else ckpt
    tensors = {f"{section}.{name}": value.detach().cpu().contiguous().clone()
               for section in SECTIONS for name, value in (values.get(section) or {}).items()}
    out = Path(out) if out is not None else path.parent / WEIGHTS
    metadata = {"step": str(ckpt.get("state", {}).get("step", "")), "source": path.name}
    save_file(tensors, str(out), metadata=metadata)
    return out


def load_weights(path: str | os.PathLike, model: nn.Module, guide: nn.Module) -> dict:
    """Load a :func:`export_weights` file into ``model`` and ``guide`` (strictly: every key
    must match); returns the file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata() or {}
    for section, module in (("model", model), ("guide", guide)):
        prefix = f"{section}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(state)
    extras = {k[len("param_store."):]: v for k, v in tensors.items()
              if k.startswith("param_store.")}
    if extras:
        import pyro

        store = pyro.get_param_store()
        with torch.no_grad():
            for name, value in extras.items():
                if name in store:
                    store[name].unconstrained().copy_(value)
                else:
                    pyro.param(name, value)
    return metadata
