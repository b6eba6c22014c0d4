"""Any plain-torch model gets exact per-sample gradients and fast clipping, no rewriting.

Tiny HF models built from configs (no download), a GroupNorm ResNet, a transformer encoder
and recurrent classifiers, each through ``torch.func.functional_call``: ``"expanded"`` and
``"auto"`` equal the float64 per-example loop; fast clipping equals the materialising
reference; no torch batching-rule fallback anywhere; nothing materialised where every op
that touches a parameter has a rule.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import psgfunc as pf
import psgfunc.functional as PF
from psgfunc.per_sample._clip import grad_pieces
from tests.oracles import per_example_grads

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

B, T = 2, 5


def close(actual, expected, rtol=1e-10):
    scale = max(float(e.abs().max()) for e in expected.values())
    for k in expected:
        err = float((actual[k] - expected[k]).abs().max())
        ref = max(float(expected[k].abs().max()), 1e-6 * scale)
        assert err <= rtol * ref, f"{k}: relative error {err / ref:.2e}"


def lm_loss(out, y):
    return F.cross_entropy(out.logits[0], y[0])


def hidden_loss(out, y):
    return ((out.last_hidden_state[0] - y[0]) ** 2).sum()


class Recurrent(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.rnn, self.head = cls(4, 6, batch_first=True), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(2, c)
        self.c2, self.n2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(2, c)

    def forward(self, x):
        return F.relu(x + self.n2(self.c2(F.relu(self.n1(self.c1(x))))))


class InPlace(nn.Module):
    """In-place ops on layer outputs, as torchvision-style models write them: an inplace
    ReLU after a Linear on a [N, T, D] input (a view of the layer's product), a residual
    added in place, attention's output changed in place."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.skip = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(4, 6)
        self.attn, self.head = nn.MultiheadAttention(6, 2, batch_first=True), nn.Linear(6, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.b(self.act(self.a(x)))
        h += self.skip(x)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.relu_().mean(1))


def _model(name):
    tr = transformers
    ids = torch.randint(0, 64, (B, T))
    if name == "gpt2":
        config = tr.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
        return tr.GPT2LMHeadModel(config), ids, torch.randint(0, 64, (B, T)), lm_loss, True
    if name == "llama":
        config = tr.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
        return tr.LlamaForCausalLM(config), ids, torch.randint(0, 64, (B, T)), lm_loss, True
    if name == "bert":
        config = tr.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=16)
        return tr.BertModel(config), ids, torch.randn(B, T, 16), hidden_loss, True
    if name == "transformer_encoder":
        model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                              nn.Flatten(), nn.Linear(T * 8, 3))
        return model, torch.randn(B, T, 8), torch.randint(0, 3, (B,)), F.cross_entropy, True
    if name == "inplace":
        return InPlace(), torch.randn(B, T, 4), torch.randint(0, 3, (B,)), F.cross_entropy, True
    if name in ("lstm", "gru"):
        cls = nn.LSTM if name == "lstm" else nn.GRU
        fast = name == "lstm" or hasattr(PF, "gru")
        return Recurrent(cls), torch.randn(B, T, 4), torch.randint(0, 3, (B,)), F.cross_entropy, fast
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), Block(4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return model, torch.randn(B, 3, 6, 6), torch.randint(0, 3, (B,)), F.cross_entropy, hasattr(PF, "group_norm")


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "transformer_encoder", "lstm", "gru", "groupnorm_resnet", "inplace"])
def test_any_model_functional_call(name):
    torch.manual_seed(0)
    model, x, y, loss, fast = _model(name)
    model = model.double().eval()
    x, y = (t.double() if t.is_floating_point() else t for t in (x, y))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fn(p, x, y):
        return loss(functional_call(model, p, (x[None],)), y[None])

    ref = per_example_grads(fn, params, x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for method in ("vmap", "expanded", "auto"):
            close(pf.per_sample_grads(fn, params, x, y, method=method), ref)
        total, norms = pf.dp.clipped_grad_sum(fn, params, x, y, max_norm=0.1)
        pieces = grad_pieces(fn, params, x, y)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "batching rule" in m], messages
    if fast:
        assert pieces.materialized == [], messages
        assert not [m for m in messages if "psgfunc" in m], messages
    ref_total, ref_norms = pf.dp.clipped_grad_sum(fn, params, x, y, max_norm=0.1, method="materialize")
    close(total, ref_total)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=0)


def test_psgfunc_shells_inside_torch_func_transforms():
    import psgfunc.nn as pnn

    torch.manual_seed(0)
    cases = [
        (pnn.Linear(4, 3, 8), torch.randn(B, 5, 4)),
        (pnn.LayerNorm(4, 8), torch.randn(B, 5, 4)),
        (pnn.Embedding(10, 3, 8), torch.randint(0, 10, (B, 5))),
        (pnn.DPLSTM(4, 3, batch_first=True), torch.randn(B, 5, 4)),
    ]
    for shell, x in cases:
        shell = shell.double()
        x = x.double() if x.is_floating_point() else x
        params = {k: v.detach() for k, v in shell.named_parameters()}

        def fn(p, x, shell=shell):
            out = functional_call(shell, p, (x[None],))
            return (out[0] if isinstance(out, tuple) else out).sin().sum()

        ref = per_example_grads(fn, params, x)
        for method in ("vmap", "expanded", "auto"):
            close(pf.per_sample_grads(fn, params, x, method=method), ref)
        grads = torch.func.vmap(torch.func.grad(fn), in_dims=(None, 0))(params, x)
        close(grads, ref)


def _batch_loss(loss, out, y):
    """The sum over examples of ``loss`` on each example's slice of ``out``."""
    if hasattr(out, "logits"):
        return sum(F.cross_entropy(out.logits[b], y[b]) for b in range(B))
    if hasattr(out, "last_hidden_state"):
        return ((out.last_hidden_state - y) ** 2).sum()
    return loss(out, y, reduction="sum")


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "transformer_encoder", "lstm", "gru", "groupnorm_resnet", "inplace"])
@pytest.mark.parametrize("fast", [False, True])
def test_any_model_expand_weights(name, fast):
    """The same models converted in place: ``.grad_sample`` equals the per-example loop, and a
    fast-clipping ``DPOptimizer`` step the clipped loop update. HF BERT's pooler, which the
    loss does not use, gets no gradient: its per-sample gradients are zero (no error)."""
    import copy

    import psgfunc.nn as pnn

    torch.manual_seed(0)
    model, x, y, loss, _ = _model(name)
    model = model.double().eval()
    x, y = (t.double() if t.is_floating_point() else t for t in (x, y))
    ref = copy.deepcopy(model)
    params = {k: v.detach() for k, v in ref.named_parameters()}

    def fn(p, x, y):
        return loss(functional_call(ref, p, (x[None],)), y[None])

    expected = per_example_grads(fn, params, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # custom modules holding buffers (rotary tables)
        pnn.expand_weights(model, B)
    if not fast:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no op fell back, no batching-rule warning
            _batch_loss(loss, model(x), y).backward()
        got = {k: p.grad_sample if getattr(p, "grad_sample", None) is not None else torch.zeros_like(p.expand(B, *p.shape))
               for k, p in model.named_parameters()}
        close(got, expected)
        return
    c = 0.1
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in expected.values()]).norm(dim=0)
    factor = c / norms.clamp_min(c)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = pf.dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), max_norm=c, noise_multiplier=0.0,
                            expected_batch_size=B, fast_clipping=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing materialised
        _batch_loss(loss, model(x), y).backward()
        got = opt.accumulate()
    torch.testing.assert_close(got, norms, rtol=1e-10, atol=0)
    opt.step()
    for k, p in model.named_parameters():
        want = before[k] - torch.einsum("b,b...->...", factor, expected[k]) / B
        torch.testing.assert_close(p.detach(), want, rtol=1e-10, atol=1e-13, msg=k)
