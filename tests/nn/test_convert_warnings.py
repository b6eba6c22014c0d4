"""expand_weights: a clear TypeError for a non-module; a warning for custom modules with buffers."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import psgfunc.nn as pnn


class RunningCentre(nn.Module):
    """Subtracts a running mean of the batch: mixes examples, which no library can see."""

    def __init__(self, width):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(width))
        self.register_buffer("scratch", torch.zeros(1), persistent=False)

    def forward(self, h):
        if self.training:
            self.running_mean.mul_(0.9).add_(0.1 * h.detach().mean(0))
        return h - self.running_mean


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), RunningCentre(4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("module", ["fail", None, 3, [nn.Linear(2, 2)]])
def test_a_non_module_is_a_type_error_naming_the_argument(module):
    with pytest.raises(TypeError, match=r"expand_weights: module must be a torch.nn.Module"):
        pnn.expand_weights(module, 64)


def test_custom_module_with_buffers_warns_with_its_name_and_buffers():
    with pytest.warns(UserWarning, match=r"body\.1 \(RunningCentre\): \['running_mean', 'scratch'\]"):
        model = pnn.expand_weights(Net(), 8)
    assert isinstance(model.head, pnn.Linear)  # still converted


def test_custom_root_and_custom_subclass_of_a_torch_layer_warn():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.register_buffer("count", torch.zeros((), dtype=torch.long))

    class Scaled(nn.ReLU):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.ones(1))

    with pytest.warns(UserWarning, match=r"<root> \(Root\): \['count'\]"):
        pnn.expand_weights(Root(), 8)
    with pytest.warns(UserWarning, match=r"0 \(Scaled\): \['scale'\]"):
        pnn.expand_weights(nn.Sequential(Scaled(), nn.Linear(2, 2)), 8)


def test_ordinary_models_do_not_warn():
    models = [
        nn.Sequential(nn.Embedding(5, 3), nn.LayerNorm(3), nn.Linear(3, 2)),
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2), nn.GroupNorm(1, 2, affine=False),
                      nn.Flatten(), nn.Dropout(0.1)),
        nn.LSTM(3, 4),
        nn.Sequential(pnn.Linear(2, 2, max_batch_size=4), pnn.DPLSTM(2, 2)),
        Net().head,
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for model in models:
            pnn.expand_weights(model, 8)
    with pytest.raises(ValueError, match="BatchNorm1d"):  # torch.nn layers with batch buffers: refused
        pnn.expand_weights(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), 8)
