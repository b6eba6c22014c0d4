"""Fast clipping keeps only what the maths needs (issue 15): blocked Grams, released pieces,
a tied table's Gram without its one-hot rows, LayerNorm pieces per example, attention on
the whole batch through torch's own kernel."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import psgfunc.functional as PF
from psgfunc._tree import gamma
from psgfunc.dp import clipped_grad_sum
from psgfunc.per_sample import per_sample_grads
from psgfunc.per_sample._clip import grad_pieces
from psgfunc.per_sample._kinds import GRAM_BLOCK, GRAM_TOLERANCE, SummedRows, gram_of, outer_bound
from psgfunc.per_sample.rules.embedding import per_sample_embedding_grad
from psgfunc.per_sample.rules.matmul import TiedTable
from tests.oracles import assert_tree_close, per_example_grads

F64 = torch.float64


def test_gram_of_long_rows_is_blocked_within_its_bound():
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(2, 6, 1000, generator=gen)
    t[1, 1] = t[1, 0] * (1 + 1e-7)  # near-parallel rows: entries as large as the bound allows
    got, k = gram_of(t)
    assert k == GRAM_BLOCK + math.ceil(1000 / GRAM_BLOCK) and got.dtype == torch.float32
    exact = torch.bmm(t.to(F64), t.to(F64).transpose(1, 2))
    rows = torch.linalg.vector_norm(t.to(F64), dim=2)
    assert bool(((got.to(F64) - exact).abs() <= gamma(k, torch.float32) * rows.unsqueeze(2) * rows.unsqueeze(1)).all())
    short, k_short = gram_of(t[:, :, :200])  # short rows: one product
    assert k_short == 200
    torch.testing.assert_close(short, torch.bmm(t[:, :, :200], t[:, :, :200].transpose(1, 2)))


def test_wide_layer_bound_needs_no_float64_recomputation():
    """An MLP's 3072-wide output gradient: the unblocked float32 Gram's rounding bound was
    ~1e-3 of the norm, above GRAM_TOLERANCE, so every example was recomputed in float64."""
    gen = torch.Generator().manual_seed(1)
    g, x = torch.randn(3, 32, 3072, generator=gen), torch.randn(3, 32, 768, generator=gen)
    bound = outer_bound(g, x, 1, {}, True)
    fine = bound.refine(bound.sq)
    assert bool((fine.hi2 - fine.sq <= GRAM_TOLERANCE * fine.sq).all())
    exact = torch.linalg.vector_norm(torch.bmm(g.to(F64).transpose(1, 2), x.to(F64)), dim=(1, 2)).square()
    assert bool((fine.hi2.to(F64) * bound.hi_scale >= exact).all())  # still an upper bound


def _tied_case(vocab=300, d=8, steps=5, batch=3, padding_idx=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (batch, steps), generator=gen)
    idx[:, 1] = idx[:, 0]  # a repeated token
    ge = torch.randn(batch, steps, d, generator=gen)
    gv = torch.randn(batch, steps, vocab, generator=gen)
    h = torch.randn(batch, steps, d, generator=gen)
    exact = (per_sample_embedding_grad(idx, ge.to(F64), vocab, padding_idx)
             + torch.bmm(gv.to(F64).transpose(1, 2), h.to(F64)))
    return TiedTable(vocab, padding_idx), [("rows", idx, ge), ("outer", gv, h)], exact


def test_tied_table_bound_from_idx_is_an_upper_bound_and_builds_no_one_hot():
    for padding_idx in (None, 3):
        kind, datas, exact = _tied_case(padding_idx=padding_idx)
        made = []

        class Sizes(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None, made=made):
                out = func(*args, **(kwargs or {}))
                if isinstance(out, torch.Tensor):
                    made.append(out.numel())
                return out

        with Sizes():
            bound = kind.bound(datas)
        b, t, v = datas[1][1].shape
        assert max(made) < b * t * v  # nothing as large as a [B, T, V] one-hot
        exact_sq = exact.square().sum((1, 2))
        torch.testing.assert_close(bound.sq.to(F64), exact_sq, rtol=1e-4, atol=0)
        assert bool((bound.hi2.to(F64) * bound.hi_scale >= exact_sq).all())
        fine = bound.refine(bound.sq)  # the finer bound and the float64 recomputation
        assert bool((fine.hi2.to(F64) * fine.hi_scale >= exact_sq).all())
        c = torch.rand(b)
        torch.testing.assert_close(kind.weighted_sum(datas, c).to(F64),
                                   torch.einsum("b,bvd->vd", c.to(F64), exact), rtol=1e-5, atol=1e-5)


def test_tied_table_cancelling_example_gets_float64_grams():
    kind, datas, _ = _tied_case(vocab=50, steps=4, batch=2, seed=3)
    _, idx, ge = datas[0]
    _, gv, h = datas[1]
    # example 0: the head's term cancels the lookup's exactly (up to float32 rounding)
    gv[0] = 0
    gv[0, 0, idx[0, 2]] = 1.0
    h[0, 0] = -ge[0, 2]
    ge[0, :2] = 0
    ge[0, 3] = 0
    bound = kind.bound(datas)
    fine = bound.refine(bound.sq.clamp_min(1e-30))
    assert float(fine.hi2[0]) < 1e-10 < float(fine.hi2[1])


def _mlp_fn(p, x):
    h = PF.layer_norm(p["ln"], PF.linear(p["fc1"], x), (12,))
    return PF.linear(p["fc2"], torch.tanh(h)).square().sum()


def _mlp(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    params = {
        "fc1": {"weight": torch.randn(12, 6, generator=gen), "bias": torch.randn(12, generator=gen)},
        "ln": {"weight": 1 + torch.randn(12, generator=gen) / 4, "bias": torch.randn(12, generator=gen)},
        "fc2": {"weight": torch.randn(3, 12, generator=gen), "bias": torch.randn(3, generator=gen)},
    }
    params = {k: {n: t.to(dtype) for n, t in v.items()} for k, v in params.items()}
    return params, torch.randn(5, 7, 6, generator=gen).to(dtype)


def test_weighted_sums_release_frees_pieces_and_sums_the_same():
    params, x = _mlp()
    kept = grad_pieces(_mlp_fn, params, x)
    freed = grad_pieces(_mlp_fn, params, x)
    c = [torch.rand(5, generator=torch.Generator().manual_seed(i)) for i in range(len(kept.leaves))]
    expected = kept.weighted_sums(c)
    got = freed.weighted_sums(c, release=True)
    assert_tree_close(got, expected, rtol=1e-6)
    assert all(leaf.datas == [] and leaf.bound.refine is None for leaf in freed.leaves)
    assert_tree_close(kept.weighted_sums(c), expected, rtol=0)  # kept: summed again


def test_layer_norm_records_one_row_per_example():
    params, x = _mlp()
    pieces = grad_pieces(_mlp_fn, params, x)
    ln = [leaf for leaf in pieces.leaves if leaf.datas and leaf.datas[0][0].shape[-1] == 12
          and isinstance(leaf.kind, SummedRows) and leaf.datas[0][0].shape[1] == 1]
    assert len(ln) >= 2  # ln.weight and ln.bias: [B, 1, 12] (and [B] rounding bounds), not [B, 7, 12]
    params64 = {k: {n: t.to(F64) for n, t in v.items()} for k, v in params.items()}
    sums, _ = clipped_grad_sum(_mlp_fn, params64, x.to(F64), max_norm=1e9, method="fast")
    expected = per_example_grads(_mlp_fn, params64, x.to(F64))
    assert_tree_close(sums, {k: {n: t.sum(0) for n, t in v.items()} for k, v in expected.items()}, rtol=1e-10)


def _attention_fn(mask_kind):
    def fn(p, x, m):
        qkv = PF.linear(p["qkv"], x)  # [T, 3 * 2 * 4]
        q, k, v = qkv.unflatten(-1, (3, 2, 4)).unbind(-3)
        q, k, v = (t.transpose(-3, -2) for t in (q, k, v))  # [heads, T, 4]
        if mask_kind == "causal":
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif mask_kind == "bool":  # per example [T, T], lower rank than q
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        else:  # float additive mask, shared by the examples, with a key of lower rank
            att = F.scaled_dot_product_attention(q, k[0], v, attn_mask=torch.zeros(q.shape[-2], q.shape[-2]) + 0.5)
        return PF.linear(p["proj"], att.transpose(-3, -2).flatten(-2)).square().sum()

    return fn


def test_attention_runs_on_the_whole_batch_with_torch_kernel():
    gen = torch.Generator().manual_seed(0)
    params = {"qkv": {"weight": torch.randn(24, 8, generator=gen), "bias": torch.randn(24, generator=gen)},
              "proj": {"weight": torch.randn(8, 8, generator=gen)}}
    x = torch.randn(3, 5, 8, generator=gen)
    m = torch.rand(3, 5, 5, generator=gen) > 0.3
    m[:, :, 0] = True  # every query sees a key
    for kind in ("causal", "bool", "float"):
        fn = _attention_fn(kind)
        p64 = {k: {n: t.to(F64) for n, t in v.items()} for k, v in params.items()}
        got = per_sample_grads(fn, p64, x.to(F64), m, method="expanded")
        assert_tree_close(got, per_example_grads(fn, p64, x.to(F64), m), rtol=1e-10)
    softmax = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "softmax" in func.__name__:
                softmax.append(func)
            return func(*args, **(kwargs or {}))

    with Ops():  # float32, causal: torch's fused kernel, not ordinary ops (no softmax)
        per_sample_grads(_attention_fn("causal"), params, x, m, method="expanded")
    assert softmax == []


def test_layer_norm_saves_its_input_not_a_normalised_copy():
    """Like torch's own layer norm, the rule keeps ``x`` (the residual stream, alive anyway)
    and the per-position statistics for its backward, not ``x_hat`` next to the output."""
    from psgfunc.per_sample.rules.layer_norm import LAYER_NORM

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, generator=gen, requires_grad=True)
    w, b = torch.randn(12, generator=gen), torch.randn(12, generator=gen)
    params = {"weight": w.expand(3, 12).requires_grad_(), "bias": b.expand(3, 12).requires_grad_()}
    y = LAYER_NORM.batched(params, x, (12,))
    big = [t for t in y.grad_fn.saved_tensors if t is not None and t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    torch.testing.assert_close(y, F.layer_norm(x, (12,), w, b))
    gx, gw, gb = torch.autograd.grad(y.square().sum(), [x, params["weight"], params["bias"]])
    ref = torch.autograd.grad(F.layer_norm(x, (12,), w, b).square().sum(), x)[0]
    torch.testing.assert_close(gx, ref)


def _dp_mlp_step(release: bool, monkeypatch) -> tuple[list[int], list[torch.Tensor], torch.Tensor]:
    """One fast-clipping ``DPOptimizer.accumulate()`` on a 3-layer MLP:
    how many of the recorded pieces were alive at each weighted sum, the clipped sums, the
    norms. ``release=False``: pieces are never released (the reference numbers)."""
    import weakref

    from torch import nn

    import psgfunc.nn as pnn
    from psgfunc.dp import DPOptimizer
    from psgfunc.per_sample import _kinds

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    pnn.expand_weights(model, 5)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=0.5, noise_multiplier=0.0,
                      expected_batch_size=5, fast_clipping=True)
    x = torch.randn(5, 7, 6)
    model(x).square().sum().backward()
    refs = [weakref.ref(t) for p in model.parameters() for _, data, _ in opt._logs[id(p)].pieces
            for t in data if isinstance(t, torch.Tensor) and t is not x]
    alive: list[int] = []
    sum_of = _kinds.LeafPieces.weighted_sum

    def counted(leaf, c):
        alive.append(sum(r() is not None for r in refs))
        return sum_of(leaf, c)

    monkeypatch.setattr(_kinds.LeafPieces, "weighted_sum", counted)
    if not release:
        monkeypatch.setattr(_kinds.LeafPieces, "release", lambda leaf: None)
    norms = opt.accumulate()
    monkeypatch.undo()
    assert all(r() is None for r in refs)  # nothing left once accumulate() returns
    return alive, [s.clone() for s in opt._summed], norms


def test_dp_optimizer_fast_path_releases_pieces_leaf_by_leaf(monkeypatch):
    """``DPOptimizer(fast_clipping=True).accumulate()`` frees each layer's pieces (its input,
    its output gradient) once that layer's sums are taken, as ``clipped_grad_sum`` does: it
    held them all until the last sum (the logs, the records and the leaves kept them), with
    every sum. The sums are bit-identical to never releasing."""
    alive, sums, norms = _dp_mlp_step(True, monkeypatch)
    kept, ref_sums, ref_norms = _dp_mlp_step(False, monkeypatch)
    assert len(alive) == 6 and len(set(kept)) == 1 and kept[0] > 0  # reference: all alive
    assert alive[0] == kept[0] and alive[-1] < alive[0] / 2  # freed as the sums go
    assert all(a >= b for a, b in zip(alive, alive[1:]))
    assert torch.equal(norms, ref_norms)
    assert all(torch.equal(a, b) for a, b in zip(sums, ref_sums))
