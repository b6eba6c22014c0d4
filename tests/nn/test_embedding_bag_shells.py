"""EmbeddingBag shell: torch.nn's contract, one bag per example, grad_sample against the float64
loop, expand_weights conversion, and fast-clipping DP-SGD."""

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


def build(seed=0, **kwargs):
    shell = pnn.EmbeddingBag(7, 3, MAX, dtype=F64, **kwargs)
    ref = nn.EmbeddingBag(7, 3, dtype=F64, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        shell.weight.add_(torch.randn(7, 3, dtype=F64, generator=gen))
    ref.load_state_dict(shell.state_dict(), strict=True)
    return shell, ref


def test_state_dict_and_init_match_nn():
    torch.manual_seed(0)
    a = pnn.EmbeddingBag(7, 3, MAX, None, 2.0, False, "sum", False, None, False, 2)
    torch.manual_seed(0)
    b = nn.EmbeddingBag(7, 3, None, 2.0, False, "sum", False, None, False, 2)
    assert list(a.state_dict()) == list(b.state_dict()) and torch.equal(a.weight, b.weight)
    assert (a.mode, a.padding_idx, a.max_batch_size) == ("sum", 2, MAX)
    b.load_state_dict(a.state_dict(), strict=True)
    a.load_state_dict(b.state_dict(), strict=True)
    assert isinstance(a, nn.EmbeddingBag) and repr(a).endswith(f"max_batch_size={MAX})")


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("layout", ["rows", "offsets", "last_offset"])
def test_grad_sample_one_bag_per_example(mode, layout):
    last = layout == "last_offset"
    shell, ref = build(mode=mode, padding_idx=1, include_last_offset=last)
    gen = torch.Generator().manual_seed(1)
    if layout == "rows":
        idx, offsets = torch.randint(0, 7, (4, 3), generator=gen), None
        bags = list(idx)
    else:
        idx = torch.randint(0, 7, (8,), generator=gen)
        starts = [0, 3, 3, 4]
        offsets = torch.tensor(starts + ([8] if last else []))
        bags = [idx[s:e] for s, e in zip(starts, starts[1:] + [8])]  # bag 1 is empty
    psw = torch.randn(idx.shape, dtype=F64, generator=gen) if mode == "sum" else None
    out = shell(idx, offsets, psw)
    torch.testing.assert_close(out, ref(idx, offsets, psw), rtol=1e-12, atol=1e-12)
    torch.sin(1.3 * out).sum().backward()
    assert shell.weight.grad_sample.shape == (4, 7, 3)
    for b, bag in enumerate(bags):  # the float64 loop: each bag alone
        w = ref.weight.detach().clone().requires_grad_(True)
        if layout == "rows":
            sw = None if psw is None else psw[b : b + 1]
            y = F.embedding_bag(bag[None], w, mode=mode, per_sample_weights=sw, padding_idx=1)
        else:
            s = starts[b]
            sw = None if psw is None else psw[s : s + len(bag)]
            y = F.embedding_bag(bag, w, torch.tensor([0]), mode=mode, per_sample_weights=sw, padding_idx=1)
        (g,) = torch.autograd.grad(torch.sin(1.3 * y).sum(), w, allow_unused=True)
        g = torch.zeros_like(w) if g is None else g
        torch.testing.assert_close(shell.weight.grad_sample[b], g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(shell.weight.grad_sample.sum(0), shell.weight.grad, rtol=1e-12, atol=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="max_norm"):
        pnn.EmbeddingBag(7, 3, MAX, max_norm=1.0)
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        pnn.EmbeddingBag(7, 3, MAX, scale_grad_by_freq=True)
    with pytest.raises(ValueError, match="sparse"):
        pnn.EmbeddingBag(7, 3, MAX, sparse=True)
    with pytest.raises(ValueError, match="max_batch_size"):
        pnn.EmbeddingBag(7, 3, 0)
    shell = pnn.EmbeddingBag(7, 3, MAX)
    with pytest.raises(ValueError, match=r"\[B, n\].*unsqueeze"):
        shell(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="with offsets, input must be 1-D"):
        shell(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="max_batch_size=6"):
        shell(torch.zeros(8, dtype=torch.long), torch.arange(8))
    with pytest.raises(ValueError, match=r"0 \(EmbeddingBag\): EmbeddingBag: max_norm=1.0 is not supported"):
        pnn.expand_weights(nn.Sequential(nn.EmbeddingBag(7, 3, max_norm=1.0)), 4)


def test_expand_weights_and_dp_step_equal_the_float64_loop():
    """An EmbeddingBag (per_sample_weights, one bag per example) + linear model, converted by
    expand_weights; a fast-clipping DPOptimizer step equals clipping the per-example loop."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.EmbeddingBag(9, 4, mode="sum", padding_idx=0), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    model = copy.deepcopy(ref)
    weight = model[0].weight
    model = pnn.expand_weights(model, 8)
    assert type(model[0]) is pnn.EmbeddingBag and model[0].weight is weight
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 9, (5, 4), generator=gen)
    idx[0, :2] = 3  # a repeated row
    y = torch.randint(0, 2, (5,), generator=gen)

    def fn(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(ref, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = per_example_grads(fn, {k: v.detach() for k, v in ref.named_parameters()}, idx, y)
    norms = torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)
    c, lr = float(norms.median()), 0.5
    clipped = {k: torch.einsum("b,b...->...", (c / norms).clamp(max=1.0), g) for k, g in grads.items()}
    expected = {k: v.detach() - lr * clipped[k] for k, v in ref.named_parameters()}
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr), max_norm=c, noise_multiplier=0.0,
                         expected_batch_size=1, fast_clipping=True)
    F.cross_entropy(model(idx), y, reduction="sum").backward()
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    torch.testing.assert_close(opt.accumulate(), norms, rtol=1e-10, atol=0)
    opt.step()
    assert_tree_close(dict(model.named_parameters()), expected)
