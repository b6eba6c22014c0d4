"""ConvTranspose1d/2d/3d shells: torch.nn's contract, grad_sample against the float64 loop,
expand_weights conversion, and fast-clipping DP-SGD on a small decoder."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import psgfunc.dp as dp
import psgfunc.nn as pnn
from tests.oracles import assert_tree_close, per_example_grads

F64 = torch.float64
MAX = 6
SHELLS = {1: pnn.ConvTranspose1d, 2: pnn.ConvTranspose2d, 3: pnn.ConvTranspose3d}
MODULES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
SPATIAL = {1: (5,), 2: (3, 4), 3: (2, 3, 2)}
# (dim, positional args after (in, out, kernel), keywords)
CONFIGS = [
    (1, (2, 1, 1), {}),  # stride, padding, output_padding
    (1, (), {"groups": 2, "bias": False, "dilation": 2}),
    (2, ((2, 1), 1, (1, 0)), {}),
    (2, (1, 0, 0, 2), {}),  # groups positional
    (3, (), {"stride": 2, "output_padding": 1}),
]


def build(cfg, seed=0):
    dim, args, kwargs = cfg
    shell = SHELLS[dim](4, 6, 3 if dim != 3 else 2, MAX, *args, dtype=F64, **kwargs)
    ref = MODULES[dim](4, 6, 3 if dim != 3 else 2, *args, dtype=F64, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in shell.parameters():
            p.add_(torch.randn(p.shape, dtype=p.dtype, generator=gen))
    ref.load_state_dict(shell.state_dict(), strict=True)
    return shell, ref, torch.randn(4, 4, *SPATIAL[dim], dtype=F64, generator=gen)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_state_dict_init_output_and_grad_sample(cfg):
    dim, args, kwargs = cfg
    torch.manual_seed(0)
    a = SHELLS[dim](4, 6, 3, MAX, *args, **kwargs)
    torch.manual_seed(0)
    b = MODULES[dim](4, 6, 3, *args, **kwargs)
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    b.load_state_dict(a.state_dict(), strict=True)
    a.load_state_dict(b.state_dict(), strict=True)
    assert isinstance(a, MODULES[dim]) and repr(a).endswith(f"max_batch_size={MAX})")

    shell, ref, x = build(cfg)
    out = shell(x)
    torch.testing.assert_close(out, ref(x), rtol=1e-12, atol=1e-12)
    torch.sin(out).sum().backward()

    def fn(p, xi):
        return torch.sin(torch.func.functional_call(ref, p, (xi.unsqueeze(0),))).sum()

    expected = per_example_grads(fn, {k: v.detach() for k, v in ref.named_parameters()}, x)
    assert_tree_close({k: p.grad_sample for k, p in shell.named_parameters()}, expected)
    for p in shell.parameters():
        torch.testing.assert_close(p.grad_sample.sum(0), p.grad, rtol=1e-12, atol=1e-12)


def test_output_size_and_errors():
    shell, ref, x = build((2, ((2, 2),), {}))
    for size in ([7, 9], [8, 10], None):
        torch.testing.assert_close(shell(x, size), ref(x, size), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"batch dim.*unsqueeze\(0\)"):
        shell(x[0])
    with pytest.raises(ValueError, match="max_batch_size=6"):
        shell(torch.cat([x, x]))
    with pytest.raises(ValueError, match="max_batch_size"):
        pnn.ConvTranspose2d(4, 6, 3, 0)
    with pytest.raises(ValueError, match="zeros. padding mode"):  # torch.nn's own refusal
        pnn.ConvTranspose2d(4, 6, 3, MAX, padding_mode="reflect")




def test_expand_weights_and_dp_step_equal_the_float64_loop():
    """expand_weights converts ConvTranspose1d/2d/3d (same Parameter objects); DPOptimizer with
    fast clipping steps as clipping the per-example loop's gradients."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.t2 = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1)
            self.t1 = nn.ConvTranspose1d(3, 3, 2, groups=3)
            self.t3 = nn.ConvTranspose3d(1, 1, (1, 2, 1), bias=False)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            h = torch.tanh(self.t2(x))  # [B, 3, 4, 4]
            h = torch.tanh(self.t1(h.flatten(2)))  # [B, 3, 17]
            h3 = self.t3(h[:, :1, :16].reshape(-1, 1, 2, 2, 4))  # [B, 1, 2, 3, 4]
            return self.fc(h.mean(2) + h3.mean((1, 2, 3, 4)).unsqueeze(1))

    ref = Net().to(F64)
    model = copy.deepcopy(ref)
    params = [model.t2.weight, model.t1.weight, model.t3.weight]
    model = pnn.expand_weights(model, 8)
    assert [type(model.t2), type(model.t1), type(model.t3)] == [pnn.ConvTranspose2d, pnn.ConvTranspose1d,
                                                                pnn.ConvTranspose3d]
    assert [model.t2.weight, model.t1.weight, model.t3.weight] == params
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 2, 2, dtype=F64, generator=gen)
    y = torch.randint(0, 2, (5,), generator=gen)

    def fn(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(ref, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = per_example_grads(fn, {k: v.detach() for k, v in ref.named_parameters()}, x, y)
    norms = torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)
    c, lr = float(norms.median()), 0.5
    clipped = {k: torch.einsum("b,b...->...", (c / norms).clamp(max=1.0), g) for k, g in grads.items()}
    expected = {k: v.detach() - lr * clipped[k] for k, v in ref.named_parameters()}
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr), max_norm=c, noise_multiplier=0.0,
                         expected_batch_size=1, fast_clipping=True)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    torch.testing.assert_close(opt.accumulate(), norms, rtol=1e-10, atol=0)
    opt.step()
    assert_tree_close(dict(model.named_parameters()), expected)
