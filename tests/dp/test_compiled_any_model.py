"""Compiled fast clipping of plain-torch models: their torch functions are tapped.

Models written with ``torch.nn`` modules and ``torch.nn.functional``, run through
``torch.func.functional_call``: ``compiled_clipped_grad_sum(method="fast")`` equals
``clipped_grad_sum(method="materialize")`` at 1e-10 in float64 and materialises no params
leaf (the plan records none, nothing warns "materialised"), in one graph. A leaf that an op
without a rule uses is materialised and still exact; a torch-function call that the compiler
shows otherwise than the eager planning run falls back to tapping psgfunc layers only. All
graphs use dynamo's eager backend (tracing without Inductor) on tiny models.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import psgfunc.dp as dp
from psgfunc.dp import _compiled
from psgfunc.per_sample import _kinds
from psgfunc.per_sample._api import _prepare
from psgfunc.per_sample._tap import discover, tap_pieces
from psgfunc.per_sample.rules.matmul import TiedTable
from tests.oracles import assert_tree_close

DT = torch.float64
C = 0.05  # below most examples' norms: the clipping acts


def run(model_fn, params, batch, monkeypatch, c=C):
    """``(step, plans, warnings)`` after one compiled step, checked against the
    materialising reference (sums and norms at 1e-10)."""
    plans = []
    honest = _compiled.discover
    monkeypatch.setattr(_compiled, "discover", lambda *a, **k: plans.append(honest(*a, **k)) or plans[-1])
    step = dp.compiled_clipped_grad_sum(model_fn, c, method="fast", backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summed, norms = step(params, *batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference: ops without a rule warn there too
        expected, expected_norms = dp.clipped_grad_sum(model_fn, params, *batch, max_norm=c, method="materialize")
    assert_tree_close(summed, expected, rtol=1e-10)
    torch.testing.assert_close(norms, expected_norms, rtol=1e-10, atol=0)
    assert step.stats["eager_runs"] == 0
    return step, plans, [str(w.message) for w in caught]


def assert_nothing_materialised(step, plans, messages):
    assert [p.materialized for p in plans] == [[]], plans
    assert not [m for m in messages if "materialised" in m], messages
    assert step.stats == {"compiles": 1, "plans": 1, "eager_runs": 0}  # one graph: no break


def through(model, loss):
    """fn of one example through functional_call (the example gets a batch dim of 1)."""

    def fn(p, x, y):
        return loss(functional_call(model, p, (x[None],)), y[None])

    return fn


def leaves(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3)).double()
    x, y = torch.randn(4, 5, dtype=DT), torch.randint(0, 3, (4,))
    return through(model, F.cross_entropy), leaves(model), (x, y)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.fc = nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.norm(self.conv(x))).mean((-2, -1)))


def convnet():
    torch.manual_seed(0)
    model = ConvNet().double()
    x, y = torch.randn(3, 2, 5, 5, dtype=DT), torch.randint(0, 3, (3,))
    return through(model, F.cross_entropy), leaves(model), (x, y)


class Block(nn.Module):
    """A tiny transformer block over a tied embedding: nn.LayerNorm, F.linear, HF-style
    ``Conv1D`` (``torch.addmm`` with a bias), an einsum, a learned position table added
    (``+``) and a hand-written RMSNorm's ``weight * x``, attention, and the head twice: ``F.linear(h, emb.weight)`` (HF's tied
    ``lm_head``) and ``h @ emb.weight.T``."""

    def __init__(self, vocab=13, d=8):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(0.1 * torch.randn(3, d))
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj_w, self.proj_b = nn.Parameter(0.3 * torch.randn(d, d)), nn.Parameter(0.1 * torch.randn(d))
        self.mix = nn.Parameter(0.3 * torch.randn(d, d))
        self.rms = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, ids):
        h = self.emb(ids) + self.pos
        q, k, v = self.qkv(self.ln(h)).chunk(3, -1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        flat = a.reshape(-1, a.shape[-1])
        h = h + torch.addmm(self.proj_b, flat, self.proj_w).view(a.shape)  # HF Conv1D
        h = h + torch.tanh(torch.einsum("btd,ed->bte", h, self.mix))
        h = self.rms * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        h = h * (1.5 - torch.sigmoid(h))  # Tensor.__rsub__: a Python-level method
        return F.linear(h, self.emb.weight) + 0.5 * (h @ self.emb.weight.T)


def lm_loss(logits, y):
    return F.cross_entropy(logits[0], y[0])


def block():
    torch.manual_seed(0)
    model = Block().double()
    x, y = torch.randint(0, 13, (3, 3)), torch.randint(0, 13, (3, 3))
    return through(model, lm_loss), leaves(model), (x, y)


@pytest.mark.parametrize("name", ["mlp-batch-of-one", "convnet", "block"])
def test_plain_torch_model_is_tapped_and_exact(name, monkeypatch):
    fn, params, batch = {"mlp-batch-of-one": mlp, "convnet": convnet, "block": block}[name]()
    if name == "mlp-batch-of-one":
        batch = tuple(t[:1] for t in batch)
    assert_nothing_materialised(*run(fn, params, batch, monkeypatch))


def test_the_tied_table_combines_its_lookup_and_both_heads(monkeypatch):
    """The embedding's rows and the two heads' Outer pieces on ``emb.weight`` (one through
    ``F.linear``, one through ``h @ W.T``: a view read from ``_base``) are one TiedTable."""
    fn, params, batch = block()
    combined = []
    honest = _kinds._combined
    monkeypatch.setattr(_kinds, "_combined", lambda r: combined.append(honest(r)) or combined[-1])
    prep = _prepare(fn, params, batch, None, "different")
    tap_pieces(prep, discover(prep), prep.p_leaves, prep.b_leaves)
    table = combined[sorted(params).index("emb.weight")]
    assert [type(kind) for kind, _ in table] == [TiedTable] * 3


def test_a_leaf_that_an_op_without_a_rule_uses_is_materialised_and_exact(monkeypatch):
    """``torch.sin`` of the first layer's weight (no per-sample rule): that leaf and its
    layer's bias are materialised, the rest stays tapped, the sum is exact."""
    base, params, batch = mlp()

    def fn(p, x, y):
        return base(p, x, y) + 0.1 * torch.sin(p["0.weight"]).sum() * x.sum()

    step, plans, messages = run(fn, params, batch, monkeypatch)
    assert [p.materialized for p in plans] == [[0, 1]]  # 0.bias, 0.weight
    assert [m for m in messages if "2 of 4 parameter leaves" in m], messages


def test_a_call_the_compiler_shows_otherwise_falls_back_to_psgfunc_layers(monkeypatch):
    """The compiled pass makes a tapped call that the eager planning run does not (a stand-in
    for a torch function the compiler shows the mode otherwise): the fresh plan's pass is off
    its plan, the step plans without the torch-function rules (every leaf of this plain-torch
    model materialised, with the warning saying why) and is exact."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    params = leaves(model)
    x, y = torch.randn(4, 5, dtype=DT), torch.randn(4, 3, dtype=DT)

    def fn(p, xi, yi):
        out = functional_call(model, p, (xi,))
        if torch.compiler.is_compiling():
            out = out + 0.0 * (xi @ p["weight"].T)  # one more tapped contraction, compiled only
        return ((out - yi) ** 2).sum()

    step, plans, messages = run(fn, params, (x, y), monkeypatch)
    assert [(p.ops, p.materialized) for p in plans] == [(True, []), (False, [0, 1])]
    assert [m for m in messages if "only psgfunc layers are tapped" in m], messages


def test_a_step_the_compiler_cannot_trace_under_the_rules_falls_back_to_psgfunc_layers(monkeypatch):
    """``Tensor.unflatten`` (a Python-level method) under the torch-function rules' mode makes
    the compiler fail; the step plans without the mode (the leaf materialised) and is exact."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4).double()
    x, y = torch.randn(3, 4, dtype=DT), torch.randn(3, 2, dtype=DT)

    def fn(p, xi, yi):
        return ((functional_call(model, p, (xi,)).unflatten(-1, (2, 2)).sum(-1) - yi) ** 2).sum()

    step, plans, messages = run(fn, leaves(model), (x, y), monkeypatch)
    assert [(p.ops, p.materialized) for p in plans] == [(True, []), (False, [0, 1])]


def test_transformer_encoder_layer_is_tapped_and_exact(monkeypatch):
    """``nn.TransformerEncoderLayer`` (``nn.MultiheadAttention`` inside): in the tapped pass
    torch's attention runs as psgfunc's ``multi_head_attention`` layer, so every leaf is
    tapped, in one graph, with no warning (no materialised leaf, no vmap fallback)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                          nn.Flatten(), nn.Linear(5 * 8, 3)).double()
    x, y = torch.randn(3, 5, 8, dtype=DT), torch.randint(0, 3, (3,))

    def fn(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    step, plans, messages = run(fn, leaves(model), (x, y), monkeypatch)
    assert_nothing_materialised(step, plans, messages)
    assert messages == []


@pytest.mark.skipif(not os.environ.get("PSGFUNC_SLOW_TESTS"), reason="HF GPT-2 compiles in ~20 s: set PSGFUNC_SLOW_TESTS=1")
def test_hf_gpt2(monkeypatch):
    """A tiny HF GPT-2 (Conv1D's addmm, LayerNorm, the tied lm_head, two embeddings): nothing
    materialised."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    x, y = torch.randint(0, 50, (3, 3)), torch.randint(0, 50, (3, 3))

    def fn(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)).logits[0], yi)

    assert_nothing_materialised(*run(fn, leaves(model), (x, y), monkeypatch))
