"""Real-data smoke test: a few SVI steps of the VRNN on 8 JSB chorales lower the loss."""

import pytest
from torch.utils.data import DataLoader

from conftest import require_data
from pyro_seqlatent.data.sequences import pad_collate
from pyro_seqlatent.infer import mean_loss, train
from pyro_seqlatent.infer.elbos import make_elbo
from pyro_seqlatent.models.vrnn import build_vrnn


@pytest.mark.data
def test_vrnn_learns_on_eight_jsb_chorales():
    path = require_data("jsb_chorales/jsb_chorales.pickle")
    from pyro_seqlatent.data.jsb import load_jsb

    data = load_jsb("train", root=path.parent.parent, max_sequences=8)
    model, guide = build_vrnn(88, z_dim=8, h_dim=32, feature_dim=32, hidden_dim=32)
    loader = DataLoader(data, batch_size=8, collate_fn=pad_collate)
    elbo = make_elbo("Trace_ELBO")
    before = mean_loss(model, guide, loader, elbo)
    result = train(model, guide, data, collate_fn=pad_collate, num_steps=25, batch_size=8,
                   lr=1e-2, progress=False)
    after = mean_loss(model, guide, loader, elbo)
    assert result.step == 25
    # per sequence: ~61 steps x 88 keys x log 2 ≈ 3700 nats at the start
    assert after < 0.6 * before, (before, after)
