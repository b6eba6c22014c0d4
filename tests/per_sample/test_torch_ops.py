"""Op-level per-sample rules for plain torch code (psgfunc.per_sample._torch_ops).

Every op that takes a parameter gets exact per-sample gradients under ``"expanded"`` and
``"auto"`` (against the float64 per-example loop at 1e-10), and fast clipping equals the
materialising reference with nothing materialised and no torch batching-rule fallback.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import psgfunc as pf
from psgfunc.per_sample import _torch_ops
from psgfunc.per_sample._clip import grad_pieces
from tests.oracles import per_example_grads

B = 3


def close(actual, expected, rtol=1e-10):
    """Leaf by leaf, relative to the largest gradient of the whole tree (exact zeros stay
    comparable: an attention key bias has a zero gradient up to rounding)."""
    scale = max(float(e.abs().max()) for e in expected.values() if e.numel())
    for k in expected:
        err = float((actual[k] - expected[k]).abs().max()) if expected[k].numel() else 0.0
        ref = max(float(expected[k].abs().max()), 1e-6 * scale) if expected[k].numel() else 1.0
        assert err <= rtol * ref, f"{k}: relative error {err / ref:.2e}"


def check(fn, params, *batch, fast=True):
    """expanded/auto == loop; fast clipping == materialise; no materialising, no fallbacks."""
    ref = per_example_grads(fn, params, *batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for method in ("expanded", "auto"):
            close(pf.per_sample_grads(fn, params, *batch, method=method), ref)
        total, norms = pf.dp.clipped_grad_sum(fn, params, *batch, max_norm=0.5, method="fast")
        pieces = grad_pieces(fn, params, *batch)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "batching rule" in m or "psgfunc" in m], messages
    if fast:
        assert pieces.materialized == []
    ref_total, ref_norms = pf.dp.clipped_grad_sum(fn, params, *batch, max_norm=0.5, method="materialize")
    close(total, ref_total)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=0)


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


OPS = {
    # HF Conv1D: addmm(bias, x.view(-1, nx), weight) with weight [nx, nf]
    "addmm": (lambda p, x: torch.addmm(p["b"], x.view(-1, 4), p["w"]).tanh().sum(),
              {"w": rand(4, 5), "b": rand(5)}, rand(B, 6, 4)),
    "x@W": (lambda p, x: (x @ p["w"]).sin().sum(), {"w": rand(4, 5)}, rand(B, 2, 6, 4)),
    "W@x": (lambda p, x: torch.matmul(p["w"], x).sin().sum(), {"w": rand(5, 4)}, rand(B, 4, 3)),
    "W@v": (lambda p, x: (p["w"] @ x).sin().sum(), {"w": rand(5, 4)}, rand(B, 4)),
    "x@W.T": (lambda p, x: (x @ p["w"].T).sin().sum(), {"w": rand(5, 4)}, rand(B, 6, 4)),
    "mm": (lambda p, x: torch.mm(x, p["w"].t()).sin().sum(), {"w": rand(5, 4)}, rand(B, 6, 4)),
    "linear(W.t())": (lambda p, x: F.linear(x, p["w"].t()).sin().sum(), {"w": rand(4, 5)}, rand(B, 6, 4)),
    "einsum": (lambda p, x: torch.einsum("td,hde->the", x, p["w"]).sin().sum(),
               {"w": rand(2, 4, 3)}, rand(B, 5, 4)),
    "einsum interleaved": (lambda p, x: torch.einsum("...d,ehd->...he", x, p["w"]).sin().sum(),
                           {"w": rand(3, 2, 4)}, rand(B, 5, 4)),
    "mul (RMSNorm)": (lambda p, x: (p["w"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))).sin().sum(),
                      {"w": rand(4)}, rand(B, 5, 4)),
    "LayerScale": (lambda p, x: (x + p["g"] * x.tanh()).pow(2).sum(), {"g": rand(4)}, rand(B, 5, 4)),
    "channel bias": (lambda p, x: (x + p["b"]).relu().pow(2).sum(), {"b": rand(3, 1, 1)}, rand(B, 3, 4, 4)),
    "div": (lambda p, x: (x / p["s"] - p["s"] / (x.abs() + 1)).sin().sum(), {"s": rand(4).abs() + 1}, rand(B, 2, 4)),
    "radd/rmul": (lambda p, x: (2.0 * p["w"] + x).sin().sum() + (1 - p["w"]).sum(), {"w": rand(4)}, rand(B, 4)),
    "conv2d": (lambda p, x: F.conv2d(x[None], p["w"], p["b"], padding=1).tanh().sum(),
               {"w": rand(2, 3, 3, 3), "b": rand(2)}, rand(B, 3, 5, 5)),
    "layer_norm": (lambda p, x: F.layer_norm(x, (4,), p["w"], p["b"]).sin().sum(),
                   {"w": rand(4), "b": rand(4)}, rand(B, 5, 4)),
}


@pytest.mark.parametrize("name", list(OPS))
def test_op_rules_exact_and_fast(name):
    fn, params, x = OPS[name]
    check(fn, params, x)


def test_weight_used_by_two_contractions_and_a_linear():
    params = {"w": rand(4, 4)}

    def fn(p, x):
        h = torch.tanh(x @ p["w"])
        h = torch.tanh(F.linear(h, p["w"]))
        return torch.einsum("ti,oi->to", h, p["w"]).pow(2).sum()

    check(fn, params, rand(B, 5, 4), fast=False)  # Outer pieces of two layouts: correct


def test_tied_embedding_and_head_combine_without_materialising():
    torch.manual_seed(0)
    params = {"E": rand(40, 6), "P": rand(8, 6)}

    def fn(p, idx, y):
        pos = torch.arange(idx.shape[-1])[None]  # [1, T]: shared by every example
        h = torch.tanh(F.embedding(idx[None], p["E"], padding_idx=2) + F.embedding(pos, p["P"]))
        return F.cross_entropy(F.linear(h, p["E"])[0], y)

    idx = torch.randint(0, 40, (B, 5))
    idx[0, 1] = 2
    check(fn, params, idx, torch.randint(0, 40, (B, 5)))
    kinds = [type(leaf.kind).__name__ for leaf in grad_pieces(fn, params, idx, torch.randint(0, 40, (B, 5))).leaves]
    assert kinds[0] == "TiedTable"


@pytest.mark.parametrize("mode", ["gru", "rnn_tanh", "rnn_relu", "lstm"])
def test_fused_recurrent_ops_every_method(mode):
    torch.manual_seed(0)
    cls = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}.get(mode, torch.nn.RNN)
    kwargs = {} if cls is not torch.nn.RNN else {"nonlinearity": mode[4:]}
    layer = cls(3, 4, num_layers=2 if mode == "lstm" else 1, bidirectional=True, batch_first=True, **kwargs).double()
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def fn(p, x):
        out = torch.func.functional_call(layer, p, (x[None],))[0]
        return out.sin().sum()

    x = rand(B, 5, 3)
    ref = per_example_grads(fn, params, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for method in ("vmap", "expanded", "auto"):
            close(pf.per_sample_grads(fn, params, x, method=method), ref)
    assert not [w for w in caught if "batching rule" in str(w.message)]
    if mode == "lstm":
        check(fn, params, x)


def test_unbatched_fused_gru_matches_torch():
    torch.manual_seed(0)
    layer = torch.nn.GRU(3, 4).double()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    fn = lambda p, x: torch.func.functional_call(layer, p, (x,))[0].sin().sum()  # noqa: E731
    x = rand(B, 5, 3)
    close(pf.per_sample_grads(fn, params, x, method="auto"), per_example_grads(fn, params, x))


def test_op_without_rule_falls_back_and_warns_once_naming_it():
    _torch_ops._WARNED.discard("torch.cumsum")
    params = {"w": rand(4), "v": rand(4, 4)}
    fn = lambda p, x: (torch.cumsum(p["w"], 0) * x).sum() + (x @ p["v"]).sum()  # noqa: E731
    x = rand(B, 4)
    ref = per_example_grads(fn, params, x)
    with pytest.warns(UserWarning, match=r"torch\.cumsum takes a parameter") as caught:
        close(pf.per_sample_grads(fn, params, x, method="expanded"), ref)
        close(pf.per_sample_grads(fn, params, x, method="expanded"), ref)
    assert sum("torch.cumsum" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert grad_pieces(fn, params, x).materialized == [1]  # "w" (optree sorts keys) only


@pytest.mark.parametrize("which", ["all", "query"])
def test_sdpa_refuses_one_dim_examples(which):
    """torch refuses 1-D q/k/v; on the stacked batch ``[B, E]`` would read as a sequence of
    the B examples, so each example's result would depend on the others: refused."""
    params = {"w": rand(3, 3)}
    x = rand(B, 2, 3)

    def fn(p, xe):
        q = xe[0] @ p["w"]
        kv = xe[1] if which == "all" else xe[1:]
        return F.scaled_dot_product_attention(q, kv, kv).sin().sum()

    for run in (lambda: pf.per_sample_grads(fn, params, x, method="expanded"),
                lambda: pf.per_sample_grads(fn, params, x, method="auto"),
                lambda: pf.dp.clipped_grad_sum(fn, params, x, max_norm=1.0, method="fast")):
        with pytest.raises(ValueError, match="query must be at least 2-D"):
            run()


def test_sdpa_under_transforms_has_no_fallback():
    params = {"w": rand(4, 12)}
    mask = torch.rand(5, 5, generator=torch.Generator().manual_seed(0)) > 0.3
    mask.fill_diagonal_(True)

    def fn(p, x):
        q, k, v = (t[None] for t in (x @ p["w"]).chunk(3, -1))  # [1, T, 4] each
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        b = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        return (a + b).sin().sum()

    x = rand(B, 5, 4)
    ref = per_example_grads(fn, params, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for method in ("vmap", "expanded"):
            close(pf.per_sample_grads(fn, params, x, method=method), ref)
    assert not [w for w in caught if "batching rule" in str(w.message)]


def test_sdpa_refuses_one_dim_key_and_value():
    params = {"w": rand(3, 3)}
    x = rand(B, 2, 3)

    def fn(p, xe):
        return F.scaled_dot_product_attention((xe @ p["w"])[None], xe[1], xe[1]).sin().sum()

    with pytest.raises(ValueError, match="key must be at least 2-D"):
        pf.per_sample_grads(fn, params, x, method="expanded")
