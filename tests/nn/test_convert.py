"""expand_weights: a torch.nn model converted in place keeps its outputs and weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import psgfunc.nn as pnn
from psgfunc.nn.convert import CONVERTERS, adopt_parameters
from tests.oracles import assert_tree_close, per_example_grads

F64 = torch.float64


class Net(nn.Module):
    """A small CNN + MLP with one of every convertible layer and parameter-free ones."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding="same", padding_mode="reflect", groups=2),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.seq = nn.Conv1d(4, 4, 2, padding=1, padding_mode="circular", bias=False)
        self.vol = nn.Conv3d(1, 2, 2)
        self.emb = nn.Embedding(11, 4, padding_idx=0)
        self.head = nn.Sequential(
            nn.Linear(32 + 4 + 2, 16), nn.LayerNorm(16), nn.Tanh(), nn.Dropout(0.0), nn.Linear(16, 5)
        )

    def forward(self, x, tokens, vol):
        e = self.seq(self.emb(tokens).transpose(1, 2)).mean(-1)  # [B, 4]
        v = self.vol(vol).mean(dim=(2, 3, 4))  # [B, 2]
        return self.head(torch.cat([self.features(x), e, v], dim=1))


def batch(size=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(size, 3, 8, 8, dtype=F64, generator=gen),
        torch.randint(0, 11, (size, 6), generator=gen),
        torch.randn(size, 1, 3, 3, 3, dtype=F64, generator=gen),
        torch.randint(0, 5, (size,), generator=gen),
    )


def test_cnn_mlp_converted_in_place():
    torch.manual_seed(0)
    model = Net().double()
    ref = Net().double()
    ref.load_state_dict(model.state_dict())
    params_before = [(n, p) for n, p in model.named_parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built BEFORE the conversion
    rng = torch.get_rng_state()
    out = pnn.expand_weights(model, max_batch_size=8)
    assert out is model
    assert torch.equal(torch.get_rng_state(), rng)  # conversion draws no random numbers
    # same Parameter objects under the same names, state_dict unchanged
    assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in params_before]
    assert list(model.state_dict()) == list(ref.state_dict())
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert isinstance(module, pnn.ExpandedModule), name
    assert type(model.features[0]) is pnn.Conv2d and type(model.seq) is pnn.Conv1d
    assert type(model.vol) is pnn.Conv3d and type(model.emb) is pnn.Embedding
    assert type(model.head[1]) is pnn.LayerNorm and type(model.head[4]) is pnn.Linear
    assert model.features[3].padding_mode == "reflect" and model.emb.padding_idx == 0
    assert isinstance(model.features[1], nn.ReLU)

    x, tokens, vol, y = batch()
    assert torch.equal(model(x, tokens, vol), ref(x, tokens, vol))
    F.cross_entropy(model(x, tokens, vol), y).backward()
    F.cross_entropy(ref(x, tokens, vol), y).backward()

    def fn(p, xi, ti, vi, yi):
        logits = torch.func.functional_call(ref, p, (xi[None], ti[None], vi[None]))
        return F.cross_entropy(logits, yi[None])

    expected = per_example_grads(fn, {k: v.detach() for k, v in ref.named_parameters()}, x, tokens, vol, y)
    # mean loss over B = 5: each example's gradient is scaled by 1/5
    assert_tree_close({k: p.grad_sample * 5 for k, p in model.named_parameters()}, expected)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)

    before = model.head[4].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.head[4].weight, before)


def test_batchnorm_names_the_layer_and_converts_nothing():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    with pytest.raises(ValueError) as info:
        pnn.expand_weights(model, 4)
    message = str(info.value)
    assert "1.1 (BatchNorm2d)" in message and "GroupNorm" in message and "LayerNorm" in message
    assert "nothing was converted" in message
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Linear  # untouched
    assert isinstance(model[1][1], nn.BatchNorm2d)  # never swapped for Identity
    frozen = nn.Sequential(nn.BatchNorm1d(3, affine=False))  # no parameters: still refused
    with pytest.raises(ValueError, match="0 \\(BatchNorm1d\\)"):
        pnn.expand_weights(frozen, 4)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.gain


def test_unsupported_parameter_layers_are_listed():
    model = nn.Sequential(
        nn.Linear(3, 3),
        Scale(),
        nn.Sequential(nn.Bilinear(3, 3, 3), nn.PReLU(3)),
        nn.Embedding(4, 3, max_norm=1.0),
        nn.InstanceNorm1d(3, track_running_stats=True),
        nn.InstanceNorm1d(3),  # no parameters, no running stats: fine
    )
    with pytest.raises(ValueError) as info:
        pnn.expand_weights(model, 4)
    message = str(info.value)
    assert message.startswith("expand_weights: 2 layer(s)")
    # layers with parameters and no converter become generic shells (tests/nn/test_generic_shell.py)
    assert "Scale" not in message and "Bilinear" not in message and "PReLU" not in message
    assert "3 (Embedding)" in message and "max_norm" in message
    assert "4 (InstanceNorm1d)" in message and "track_running_stats=False" in message
    assert type(model[0]) is nn.Linear and type(model[1]) is Scale  # nothing converted


def test_frozen_unsupported_layer_and_parameter_free_layers_are_kept():
    scale = Scale().requires_grad_(False)
    model = nn.Sequential(nn.Linear(3, 3), scale, nn.Dropout(0.1), nn.ReLU(), nn.Linear(3, 2))
    pnn.expand_weights(model, 4)
    assert model[1] is scale and type(model[0]) is pnn.Linear
    model(torch.randn(4, 3)).sum().backward()
    assert model[0].weight.grad_sample.shape == (4, 3, 3)
    assert getattr(scale.gain, "grad_sample", None) is None


def test_root_layer_shared_layer_and_reconversion():
    shell = pnn.expand_weights(nn.Linear(3, 2), 4)
    assert type(shell) is pnn.Linear and shell.max_batch_size == 4

    shared = nn.Linear(3, 3, dtype=F64)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    ref = nn.Sequential(nn.Linear(3, 3, dtype=F64))
    ref.load_state_dict(model[:1].state_dict())
    pnn.expand_weights(model, 4)
    assert model[0] is model[2] and type(model[0]) is pnn.Linear
    x = torch.randn(4, 3, dtype=F64)
    model(x).sum().backward()  # the two uses add up in grad_sample

    def fn(p, xi):
        h = torch.func.functional_call(ref, p, (xi[None],))
        return torch.func.functional_call(ref, p, (torch.tanh(h),)).sum()

    expected = per_example_grads(fn, {k: v.detach() for k, v in ref.named_parameters()}, x)
    assert_tree_close({k: p.grad_sample for k, p in model[0].named_parameters()},
                      {k.split(".")[-1]: v for k, v in expected.items()})

    assert pnn.expand_weights(model, 16) is model  # already converted: new max_batch_size
    assert model[0].max_batch_size == 16
    with pytest.raises(ValueError, match="max_batch_size"):
        pnn.expand_weights(model, 0)


def test_converters_registry_is_the_extension_point(monkeypatch):
    class Affine(nn.Linear):
        pass

    generic = pnn.expand_weights(nn.Sequential(Affine(3, 2)), 4)
    # a subclass is not taken for the layer: it runs its own forward in a generic shell
    assert isinstance(generic[0], pnn.Generic) and isinstance(generic[0], Affine)
    model = nn.Sequential(Affine(3, 2))

    def convert(layer, max_batch_size):
        shell = pnn.Linear(layer.in_features, layer.out_features, max_batch_size, device="meta")
        return adopt_parameters(shell, layer)

    monkeypatch.setitem(CONVERTERS, Affine, convert)
    weight = model[0].weight
    pnn.expand_weights(model, 4)
    assert type(model[0]) is pnn.Linear and model[0].weight is weight


def test_layer_norm_without_bias_and_without_affine():
    model = nn.Sequential(nn.LayerNorm(4, bias=False), nn.LayerNorm(4, elementwise_affine=False))
    pnn.expand_weights(model, 3)
    assert model[0].bias is None and model[1].weight is None
    assert list(model.state_dict()) == ["0.weight"]
    x = torch.randn(3, 4)
    model(x).pow(2).sum().backward()
    assert model[0].weight.grad_sample.shape == (3, 4)
