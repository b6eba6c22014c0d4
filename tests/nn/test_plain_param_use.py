"""A converted model's own forward may use a child's parameter in a plain torch op (a head
tied to the token embedding: ``F.linear(h, self.emb.weight)`` in a root without parameters
of its own). ``expand_weights`` serves every such op that has an op-level rule through the
rules (psgfunc.nn.generic._OutsideShells): ``.grad_sample`` and ``DPOptimizer``'s clipped
step equal the float64 per-example loop; an op without a rule still raises the ValueError
that names the fix (issue 13)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import psgfunc.nn as pnn
from psgfunc import dp
from psgfunc.nn import generic
from tests.oracles import per_example_grads

F64 = torch.float64
V, D, T = 7, 4, 3

HEADS = {
    "F.linear": lambda m, h: F.linear(h, m.emb.weight),
    "@ .T": lambda m, h: h @ m.emb.weight.T,
    "matmul .t()": lambda m, h: torch.matmul(h, m.emb.weight.t()),
    "permute": lambda m, h: h @ m.emb.weight.permute(1, 0),
    "einsum": lambda m, h: torch.einsum("btd,vd->btv", h, m.emb.weight),
    "elementwise": lambda m, h: (m.emb.weight * h.unsqueeze(-2)).sum(-1),
    "F.linear, bias of a shell": lambda m, h: F.linear(h, m.emb.weight, m.out.bias) + m.out(h),
    "einsum, operand list": lambda m, h: torch.einsum("btd,vd->btv", [h, m.emb.weight]),
    "F.layer_norm, weight=": lambda m, h: F.linear(F.layer_norm(h, (D,), weight=m.ln.weight, bias=m.ln.bias),
                                                  m.emb.weight),
}


class TiedLM(nn.Module):
    """No parameters of its own: the head uses the embedding's weight (and maybe ``out``'s
    bias) in a plain op of this forward."""

    def __init__(self, head: str):
        super().__init__()
        torch.manual_seed(0)
        self.head = head
        self.emb = nn.Embedding(V, D, dtype=F64)
        self.mix = nn.Linear(D, D, dtype=F64)
        self.out = nn.Linear(D, V, dtype=F64)
        self.ln = nn.LayerNorm(D, dtype=F64)

    def forward(self, idx):
        h = torch.tanh(self.mix(self.emb(idx)))
        return HEADS[self.head](self, h)


def loss_fn(logits, y):
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="sum")


def data(b, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, T), generator=gen), torch.randint(0, V, (b, T), generator=gen)


def loop(model, idx, y, scale=1.0):
    """float64 per-example gradients of the unconverted model, by name."""
    ref = copy.deepcopy(model)
    params = {k: v.detach().clone() for k, v in ref.named_parameters()}

    def fn(p, i, t):
        return scale * loss_fn(functional_call(ref, p, (i.unsqueeze(0),)), t.unsqueeze(0))

    return per_example_grads(fn, params, idx, y)


def clipped_step(params, grads, max_norm, expected):
    """float64 oracle of one noiseless SGD(lr=1) DP step; also the per-example norms."""
    flat = torch.cat([g.flatten(1) for g in grads], 1)
    norms = flat.norm(dim=1)
    factor = (max_norm / norms).clamp(max=1.0)
    return [p - torch.tensordot(factor, g, 1) / expected for p, g in zip(params, grads)], norms


def used(model):
    """The parameters the model's head reaches (not ``out``'s or ``ln``'s in most)."""
    skip = {"F.linear, bias of a shell": ("ln.",), "F.layer_norm, weight=": ("out.",)}.get(model.head, ("out.", "ln."))
    return {k: p for k, p in model.named_parameters() if not k.startswith(skip)}


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("b", [4, 1])
def test_grad_sample_equals_the_loop(head, b):
    model = TiedLM(head)
    idx, y = data(b)
    want = loop(model, idx, y)
    pnn.expand_weights(model, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no op fell back to a materialised vmap
        loss_fn(model(idx), y).backward()
    for k, p in used(model).items():
        torch.testing.assert_close(p.grad_sample, want[k], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(p.grad, want[k].sum(0), rtol=1e-10, atol=1e-13)
    assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("head", ["F.linear", "@ .T", "elementwise", "F.linear, bias of a shell"])
@pytest.mark.parametrize("fast, b", [(True, 4), (True, 1), (False, 4)])
def test_dp_optimizer_step_equals_the_clipped_loop(head, fast, b):
    model = TiedLM(head)
    idx, y = data(b)
    want = loop(model, idx, y)
    pnn.expand_weights(model, 8)
    params = list(used(model).values())
    before = [p.detach().clone() for p in params]
    opt = dp.DPOptimizer(torch.optim.SGD(params, lr=1.0), max_norm=0.3, noise_multiplier=0.0,
                         expected_batch_size=4.0, fast_clipping=fast)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no materialised fallback, no Gram warning
        loss_fn(model(idx), y).backward()
        if fast:
            assert all(getattr(p, "grad_sample", None) is None for p in params)
        norms = opt.accumulate()
        opt.step()
    expected, want_norms = clipped_step(before, [want[k] for k in used(model)], 0.3, 4.0)
    torch.testing.assert_close(norms, want_norms, rtol=1e-10, atol=0)
    for p, w in zip(params, expected):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("fast", [None, True])
def test_two_backward_passes_of_one_forward_add_up(fast):
    model = TiedLM("@ .T")
    idx, y = data(3)
    want = loop(model, idx, y, scale=2.0)  # the same loss backpropagated twice
    pnn.expand_weights(model, 8)
    params = list(used(model).values())
    before = [p.detach().clone() for p in params]
    opt = None if fast is None else dp.DPOptimizer(
        torch.optim.SGD(params, lr=1.0), max_norm=0.3, noise_multiplier=0.0, expected_batch_size=3.0,
        fast_clipping=fast)
    loss = loss_fn(model(idx), y)
    loss.backward(retain_graph=True)
    loss.backward()
    if opt is None:
        for k, p in used(model).items():
            torch.testing.assert_close(p.grad_sample, want[k], rtol=1e-10, atol=1e-13)
        return
    norms = opt.accumulate()
    opt.step()
    expected, want_norms = clipped_step(before, [want[k] for k in used(model)], 0.3, 3.0)
    torch.testing.assert_close(norms, want_norms, rtol=1e-10, atol=0)
    for p, w in zip(params, expected):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-14)


def test_micro_batches_accumulate_and_the_next_forward_is_a_new_one():
    model = pnn.expand_weights(TiedLM("F.linear"), 8)
    opt = dp.DPOptimizer(torch.optim.SGD(list(used(model).values()), lr=1.0), max_norm=0.3,
                         noise_multiplier=0.0, expected_batch_size=4.0, fast_clipping=True)
    for seed in (1, 2):
        idx, y = data(2, seed)
        loss_fn(model(idx), y).backward()
        assert opt.accumulate().shape == (2,)
    opt.step()
    idx, y = data(2, 3)
    loss_fn(model(idx), y).backward()
    with pytest.raises(ValueError, match="earlier forward pass"):
        loss_fn(model(idx), y).backward()  # rows of a second forward before accumulate()


def pow_head(m, h):
    return h @ torch.pow(m.emb.weight, 1.0).T  # torch.pow has no per-sample rule


def scaled_head(m, h):
    return F.linear(h, m.emb.weight * 2.0)  # a ruled op, but no batched input: not served


def flattened_head(m, h):
    return torch.addmm(m.out.bias, h.flatten(0, 1), m.emb.weight.T)  # rows are not examples


def indexed_head(m, h):
    ids = torch.arange(V).expand(h.shape[0], V)  # an index tensor: the view is not followed
    return (m.emb.weight[ids].unsqueeze(1) * h.unsqueeze(-2)).sum(-1)


@pytest.mark.parametrize("head", [pow_head, scaled_head, flattened_head, indexed_head])
@pytest.mark.parametrize("mode", ["plain", "fast"])
def test_a_use_no_rule_serves_still_raises_the_fix(head, mode, monkeypatch):
    monkeypatch.setitem(HEADS, "custom", head)
    model = pnn.expand_weights(TiedLM("custom"), 8)
    if mode == "fast":
        dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), max_norm=1.0,
                       noise_multiplier=0.0, expected_batch_size=4.0, fast_clipping=True)
    idx, y = data(4)
    with pytest.raises(ValueError, match=r"'weight'.*outside any psgfunc layer.*untie"):
        loss_fn(model(idx), y).backward()


def test_shell_calls_are_not_rerouted_and_no_grad_serves_nothing(monkeypatch):
    calls = []
    real = generic.expanded_call
    monkeypatch.setattr(generic, "expanded_call", lambda layer, *a, **k: calls.append(layer.__name__) or real(layer, *a, **k))
    model = pnn.expand_weights(TiedLM("F.linear, bias of a shell"), 8)
    idx, y = data(2)
    with torch.no_grad():
        plain = model(idx)
    assert calls == []
    out = model(idx)
    assert calls == ["torch.nn.functional.linear"]  # the head only; the shells serve themselves
    torch.testing.assert_close(out, plain, rtol=0, atol=0)


class Boom(Exception):
    pass


class Failing(TiedLM):
    error: type[BaseException] = Boom

    def forward(self, idx):
        super().forward(idx)
        raise self.error("in the forward")


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_an_interrupted_forward_leaves_no_mode_behind(error):
    model = pnn.expand_weights(Failing("F.linear"), 8)
    model.error = error
    idx, y = data(2)
    with pytest.raises(error):
        model(idx)
    if error is KeyboardInterrupt:  # no forward hook ran: the next forward clears it
        model.error = None
        model.__class__ = TiedLM
        model.head = "F.linear"
        loss_fn(model(idx), y).backward()
        assert model.emb.weight.grad_sample.shape == (2, V, D)
    assert torch._C._len_torch_function_stack() == 0


def test_a_converted_model_inside_another_one():
    inner = TiedLM("@ .T")
    idx, y = data(3)
    want = loop(inner, idx, y)
    outer = pnn.expand_weights(nn.Sequential(pnn.expand_weights(inner, 8)), 8)
    loss_fn(outer(idx), y).backward()
    for k, p in used(inner).items():
        torch.testing.assert_close(p.grad_sample, want[k], rtol=1e-10, atol=1e-13)
