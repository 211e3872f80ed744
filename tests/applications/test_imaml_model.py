"""The network options (blocks, padding, initialisation) and the outer learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from applications.imaml.configs import PEER_NETWORK, ExperimentConfig
from applications.imaml.model import ConvNet, init_params


@pytest.mark.parametrize("blocks, padding, features", [(4, 1, 64), (3, 0, 64), (2, 0, 64 * 5 * 5), (2, 1, 64 * 7 * 7)])
def test_network_shapes(blocks, padding, features):
    net = ConvNet(5, blocks=blocks, padding=padding)
    assert net.head.in_features == features
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 5)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == blocks


def test_network_errors():
    with pytest.raises(ValueError, match="too small for 4 blocks with padding 0"):
        ConvNet(5, blocks=4, padding=0)
    with pytest.raises(ValueError, match="padding must be 0 or 1"):
        ConvNet(5, padding=2)
    with pytest.raises(ValueError, match="blocks must be a positive int"):
        ConvNet(5, blocks=0)
    with pytest.raises(ValueError, match="unknown init scheme 'xavier'; available: he, torch"):
        init_params(ConvNet(5), scheme="xavier")


def test_torch_init_matches_pytorch_default_bounds_and_is_seeded():
    net = ConvNet(5, blocks=3, padding=0)
    a, b = init_params(net, seed=3, scheme="torch"), init_params(net, seed=3, scheme="torch")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name, p in net.named_parameters():
        value = a[name].detach()
        if name.endswith("weight") and p.dim() > 1 or (name.endswith("bias") and name.rsplit(".", 1)[0] + ".weight"
                                                         in dict(net.named_parameters())
                                                         and dict(net.named_parameters())[
                                                             name.rsplit(".", 1)[0] + ".weight"].dim() > 1):
            fan_in = dict(net.named_parameters())[name.rsplit(".", 1)[0] + ".weight"][0].numel()
            bound = 1 / math.sqrt(fan_in)
            assert float(value.abs().max()) <= bound and float(value.abs().max()) > 0.8 * bound, name
        elif name.endswith("weight"):  # batch-norm scale
            assert torch.equal(value, torch.ones_like(value))
    he = init_params(net, seed=3, scheme="he")
    conv = "features.4.weight"
    assert float(he[conv].abs().max()) > 2 * float(a[conv].abs().max())  # sqrt(6) times the torch bound


def test_cosine_schedule_is_a_function_of_the_step():
    c = ExperimentConfig(meta_steps=100, outer_lr=1e-3, lr_schedule="cosine")
    assert c.learning_rate(0) == pytest.approx(1e-3)
    assert c.learning_rate(50) == pytest.approx(5e-4)
    assert c.learning_rate(100) == pytest.approx(0.0, abs=1e-12)
    lrs = [c.learning_rate(t) for t in range(101)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))
    assert ExperimentConfig(outer_lr=3e-3).learning_rate(10 ** 6) == 3e-3
    with pytest.raises(ValueError, match="lr_schedule must be one of 'constant', 'cosine', got 'step'"):
        ExperimentConfig(lr_schedule="step")


def test_network_field_merges_on_replace():
    c = ExperimentConfig().replace(network={"blocks": 3})
    assert c.network == {"blocks": 3, "padding": 1, "hidden": 64, "init": "torch"}
    assert ExperimentConfig().replace(network=PEER_NETWORK).network == PEER_NETWORK
