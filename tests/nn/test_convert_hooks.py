"""``expand_weights`` moves the module hooks of the layers it replaces to their shells:
forward, forward pre- (with kwargs too), full backward and state-dict hooks run on the shell,
their handles still remove them, and the replaced layer keeps none."""

from __future__ import annotations

import torch
import torch.nn as nn

import psgfunc.nn as pnn
from psgfunc.nn.convert import _HOOKS


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.LSTM(2, 3, batch_first=True))


def test_hooks_run_on_the_shells_and_handles_remove_them():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    first, last = model[0], model[2]
    calls = []
    handles = [
        first.register_forward_pre_hook(lambda m, args, kwargs: calls.append(("pre", m)), with_kwargs=True),
        first.register_forward_hook(lambda m, args, out: calls.append(("fwd", m, out.detach().clone()))),
        last.register_full_backward_hook(lambda m, gin, gout: calls.append(("bwd", m, gout[0].detach().clone()))),
    ]
    x = torch.randn(5, 3)
    with torch.no_grad():
        expected = first(x)
    calls.clear()
    pnn.expand_weights(model, 8)
    assert isinstance(model[0], pnn.Linear) and isinstance(model[2], pnn.Linear)
    model(x).sum().backward()
    kinds = [c[0] for c in calls]
    assert kinds == ["pre", "fwd", "bwd"]
    assert calls[0][1] is model[0] and calls[1][1] is model[0] and calls[2][1] is model[2]
    torch.testing.assert_close(calls[1][2], expected)
    torch.testing.assert_close(calls[2][2], torch.ones(5, 2))
    assert model[0].weight.grad_sample.shape == (5, 4, 3)  # per-sample gradients as ever
    for name in _HOOKS:  # the replaced layers keep nothing
        assert not getattr(first, name) and not getattr(last, name)
    for h in handles:
        h.remove()
    pnn.zero_grad(model)
    calls.clear()
    model(x).sum().backward()
    assert calls == []


def test_root_layer_and_a_layer_used_twice():
    calls = []
    root = nn.Linear(3, 3)
    root.register_forward_hook(lambda m, a, o: calls.append(m))
    shell = pnn.expand_weights(root, 4)
    shell(torch.randn(2, 3))
    assert calls == [shell]

    shared = nn.Linear(3, 3)
    shared.register_forward_hook(lambda m, a, o: calls.append(m))
    model = nn.Sequential(shared, nn.Tanh(), shared)
    calls.clear()
    pnn.expand_weights(model, 4)
    assert model[0] is model[2]
    model(torch.randn(2, 3))
    assert calls == [model[0], model[0]]  # moved once, runs at each use


def test_state_dict_hooks_and_other_layer_types():
    model = _model()
    seen = []
    model[4].register_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    model[2].register_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    model[0]._register_state_dict_hook(lambda m, sd, prefix, local: seen.append("sd"))
    keys = list(model.state_dict())
    seen.clear()
    pnn.expand_weights(model, 8)
    assert list(model.state_dict()) == keys and seen == ["sd"]
    seen.clear()
    x = torch.randn(4, 3)

    def forward(x):
        h = model[1](model[0](x)).unsqueeze(1)  # [B, 1, 4]
        h = model[3](model[2](h)).reshape(x.shape[0], 2, 2)  # [B, 2 steps, 2]
        return model[4](h)[0]

    forward(x)
    assert seen == [type(model[2]).__name__, type(model[4]).__name__]
