"""One place for the defaults: build_vrnn, VRNNCore and the registered vrnn agree (issue 28
item 4)."""

from pyro_seqlatent.models.vrnn import NETWORK_DEFAULTS, TRAIN_DEFAULTS, build_vrnn
from pyro_seqlatent.registry import get_model


def sizes(model):
    core = model.core
    return {"z_dim": core.z_dim, "h_dim": core.h_dim, "feature_dim": core.feature_dim,
            "hidden_dim": core.phi_x[0].net[0].out_features}


def test_build_vrnn_and_the_registered_vrnn_build_the_same_networks():
    spec = get_model("vrnn")
    registered, _ = spec.build(spec.options())
    direct, _ = build_vrnn(88)
    assert sizes(registered) == sizes(direct) == NETWORK_DEFAULTS
    shapes = {name: p.shape for name, p in direct.named_parameters()}
    assert {name: p.shape for name, p in registered.named_parameters()} == shapes
    assert {k: spec.train_defaults[k] for k in TRAIN_DEFAULTS} == TRAIN_DEFAULTS
