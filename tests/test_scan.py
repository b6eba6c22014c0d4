"""``scan`` against the reference Python loop of its docstring (ARCHITECTURE.md rule 4)."""

from __future__ import annotations

from collections import namedtuple

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import psgfunc
from psgfunc.scan import ScanStructureError, scan

# ------------------------------------------------------------------------------- the oracle


def reference_scan(f, init, xs=None, length=None, reverse=False):
    """The loop in ``scan``'s docstring, written as plainly as possible (needs T >= 1)."""
    if xs is None:
        n = length
        slices = [None] * n
    else:
        n = optree.tree_leaves(xs)[0].shape[0] if optree.tree_leaves(xs) else length
        slices = [optree.tree_map(lambda leaf, t=t: leaf[t], xs) for t in range(n)]
    carry, ys = init, []
    for t in reversed(range(n)) if reverse else range(n):
        carry, y = f(carry, slices[t])
        ys.append(y)
    if reverse:
        ys = ys[::-1]
    return carry, optree.tree_map(lambda *leaves: torch.stack(leaves), *ys)


def assert_same(actual, expected, tol=0.0):
    a_leaves, a_spec = optree.tree_flatten(actual)
    e_leaves, e_spec = optree.tree_flatten(expected)
    assert a_spec == e_spec, f"{a_spec} != {e_spec}"
    for a, e in zip(a_leaves, e_leaves):
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, e.shape, a.dtype, e.dtype)
        assert (a - e).abs().max().item() <= tol if a.numel() else True


Pair = namedtuple("Pair", ["h", "c"])


def rnn_step(w):
    """A nonlinear step over pytrees: carry Pair(h [3], c [3]), x {"u": [3], "v": [2, 3]}."""

    def f(carry, x):
        h = torch.tanh(carry.h @ w + x["u"] + x["v"].sum(0))
        c = carry.c * torch.sigmoid(h) + x["v"][0]
        y = {"h": h, "norm": (h * c).sum(), "nothing": None, "pair": (c, h.mean())}
        return Pair(h, c), y

    return f


def make_inputs(n, dtype=torch.float64, batch=()):
    g = torch.Generator().manual_seed(n)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    w = rnd(3, 3) * 0.5
    init = Pair(rnd(*batch, 3), rnd(*batch, 3))
    xs = {"u": rnd(*batch[:1], n, 3) if batch else rnd(n, 3),
          "v": rnd(*batch[:1], n, 2, 3) if batch else rnd(n, 2, 3)}
    return w, init, xs


# ----------------------------------------------------------------------------------- values


def test_docstring_example():
    carry, ys = scan(lambda c, x: (c + x, c + x), torch.tensor(0.0), torch.arange(4.0))
    assert carry.item() == 6.0 and ys.tolist() == [0.0, 1.0, 3.0, 6.0]


@pytest.mark.parametrize("reverse", [False, True])
def test_cumsum_by_hand(reverse):
    xs = torch.tensor([1.0, 2.0, 3.0, 4.0])
    carry, ys = scan(lambda c, x: (c + x, c), torch.tensor(0.0), xs, reverse=reverse)
    assert carry.item() == 10.0
    # ys[t] is the carry seen by the step that consumed xs[t]
    assert ys.tolist() == ([9.0, 7.0, 4.0, 0.0] if reverse else [0.0, 1.0, 3.0, 6.0])


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_pytrees_match_reference(n, reverse):
    w, init, xs = make_inputs(n)
    carry, ys = scan(rnn_step(w), init, xs, reverse=reverse)
    ref_carry, ref_ys = reference_scan(rnn_step(w), init, xs, reverse=reverse)
    assert isinstance(carry, Pair)
    assert ys["nothing"] is None
    assert ys["h"].shape == (n, 3) and ys["norm"].shape == (n,) and ys["pair"][1].shape == (n,)
    assert_same(carry, ref_carry)
    assert_same(ys, ref_ys)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    feat=st.integers(1, 4),
    reverse=st.booleans(),
    with_length=st.booleans(),
)
def test_random_shapes_match_reference(n, feat, reverse, with_length):
    g = torch.Generator().manual_seed(n * 10 + feat)
    xs = (torch.randn(n, feat, generator=g), [torch.randn(n, generator=g)])
    init = {"a": torch.randn(feat, generator=g), "k": torch.zeros((), dtype=torch.int64)}

    def f(carry, x):
        a = torch.sin(carry["a"] * x[1][0] + x[0])
        return {"a": a, "k": carry["k"] + 1}, (a.sum(), [x[0] * 2])

    length = n if with_length else None
    out = scan(f, init, xs, length=length, reverse=reverse)
    ref = reference_scan(f, init, xs, reverse=reverse)
    assert out[0]["k"].item() == n
    assert_same(out, ref)


def test_xs_none_uses_length_and_f_sees_none():
    seen = []

    def f(c, x):
        seen.append(x)
        return c * 2, c

    carry, ys = scan(f, torch.tensor(1.0), length=4)
    assert seen == [None] * 4
    assert carry.item() == 16.0 and ys.tolist() == [1.0, 2.0, 4.0, 8.0]
    ref = reference_scan(f, torch.tensor(1.0), None, length=4)
    assert_same((carry, ys), ref)


def test_xs_without_leaves_needs_length_and_keeps_its_structure():
    seen = []

    def f(c, x):
        seen.append(x)
        return c + 1, None

    carry, ys = scan(f, torch.tensor(0), {"a": None, "b": ()}, length=3)
    assert carry.item() == 3 and ys is None
    assert seen == [{"a": None, "b": ()}] * 3


def test_y_none_and_python_number_outputs():
    carry, ys = scan(lambda c, x: (c + x, None), torch.tensor(0.0), torch.ones(3))
    assert ys is None and carry.item() == 3.0
    _, ys = scan(lambda c, x: (c, (1.5, None)), torch.tensor(0.0), torch.ones(3))
    assert ys[1] is None and ys[0].tolist() == [1.5, 1.5, 1.5]


def test_carry_may_be_none_or_hold_python_numbers():
    carry, ys = scan(lambda c, x: (c, x * 2), None, torch.arange(3.0))
    assert carry is None and ys.tolist() == [0.0, 2.0, 4.0]
    carry, _ = scan(lambda c, x: ((c[0] + 1, c[1]), x), (0, "tag"), torch.arange(3.0))
    assert carry[1] == "tag"  # a non-numeric leaf is carried as it is
    assert isinstance(carry[0], torch.Tensor) and carry[0].dtype == torch.int64
    assert carry[0].item() == 3


# ------------------------------------------------------- Python scalar carry (JAX weak types)


@pytest.mark.parametrize("reverse", [False, True])
def test_python_scalar_carry_is_promoted_like_jax(reverse):
    # the example: an int init with float xs gives a float carry, as in JAX
    xs = torch.arange(4.0)
    carry, ys = scan(lambda c, x: (c + x, c + x), 0, xs, reverse=reverse)
    ref_carry, ref_ys = reference_scan(lambda c, x: (c + x, c + x), torch.tensor(0.0), xs, reverse=reverse)
    assert_same((carry, ys), (ref_carry, ref_ys))
    assert carry.dtype == torch.float32 and carry.dim() == 0


def test_python_scalar_carry_keeps_its_own_dtype_when_f_does():
    carry, ys = scan(lambda c, x: (c + x, c), 0, torch.arange(4))  # int stays int64
    assert carry.dtype == torch.int64 and carry.item() == 6 and ys.tolist() == [0, 0, 1, 3]
    carry, _ = scan(lambda c, x: (c * x, None), 1.0, torch.arange(1.0, 4.0, dtype=torch.float64))
    assert carry.dtype == torch.float64 and carry.item() == 6.0  # float32 promotes to float64
    carry, _ = scan(lambda c, x: (c | (x > 1), None), False, torch.arange(3))
    assert carry.dtype == torch.bool and carry.item() is True
    carry, _ = scan(lambda c, x: ({k: v + 1 for k, v in c.items()}, None), {"n": 0, "s": 0.5}, length=3)
    assert carry["n"].item() == 3 and carry["s"].item() == 3.5


def test_python_float_carry_promoted_to_float64_keeps_its_exact_value():
    # JAX: a weakly typed 0.1 scanned with float64 xs is the float64 0.1; the first step
    # read it as float32 (0.10000000149011612) and carried that rounding into every number
    calls = []

    def f(c, x):
        calls.append(c.dtype)
        return c + x, c + x

    xs = torch.tensor([0.0, 0.25], dtype=torch.float64)
    carry, ys = scan(f, 0.1, xs)
    assert carry.dtype == torch.float64 and carry.item() == 0.35 == 0.1 + 0.25
    assert ys.tolist() == [0.1, 0.35]
    assert calls == [torch.float32, torch.float64, torch.float64]  # step 0 again, exactly
    carry, ys = scan(f, 0.1, xs[:0])  # length 0: init in the probe's dtype, exactly
    assert carry.dtype == torch.float64 and carry.item() == 0.1 and ys.shape == (0,)
    calls.clear()
    carry, _ = scan(f, 0.5, xs)  # 0.5 is exact in float32: step 0 runs once
    assert carry.item() == 0.75 and calls == [torch.float32, torch.float64]


def test_python_scalar_carry_with_length_zero_takes_the_probes_dtype():
    carry, ys = scan(lambda c, x: (c + x, c + x), 0, torch.zeros(0))
    assert carry.dtype == torch.float32 and carry.item() == 0.0 and ys.shape == (0,)


def test_python_number_returned_for_a_scalar_tensor_carry():
    # f may return a Python number for a 0-dim carry leaf whose dtype holds it
    carry, _ = scan(lambda c, x: (1.5, None), torch.zeros((), dtype=torch.float64), length=2)
    assert carry.dtype == torch.float64 and carry.item() == 1.5
    carry, _ = scan(lambda c, x: (c.item() + 1 if c.item() < 2 else 7, None), 0, length=3)
    assert carry.dtype == torch.int64 and carry.item() == 7


def test_error_python_scalar_carry_demoted_or_reshaped():
    # the first step may promote a scalar carry's dtype, never demote it or change its shape,
    # and after the first step the dtype is fixed
    with pytest.raises(ScanStructureError, match=r"carry changed at step t=0.*torch.float32.*torch.int64"):
        scan(lambda c, x: (c.long(), None), 0.5, length=2)
    with pytest.raises(ScanStructureError, match=r"carry changed at step t=0.*shape \(\).*shape \(2,\)"):
        scan(lambda c, x: (c + torch.zeros(2), None), 0.0, length=2)
    def promote_then_change(c, x):  # step 0 promotes int64 -> float32; step 1 -> float64
        return (c + x if c.dtype == torch.int64 else (c + x).double()), None

    with pytest.raises(ScanStructureError, match=r"carry changed at step t=1.*float32.*float64"):
        scan(promote_then_change, 0, torch.tensor([1.0, 2.0]))
    with pytest.raises(ScanStructureError, match="keep its type"):
        scan(lambda c, x: (1.5, None), torch.zeros((), dtype=torch.int64), length=2)


# -------------------------------------------------------------------------------- length 0


def test_length_zero_returns_init_and_empty_ys():
    w, init, xs = make_inputs(3)
    xs = optree.tree_map(lambda leaf: leaf[:0], xs)
    calls = []

    def f(carry, x):
        calls.append(torch.is_grad_enabled())
        return rnn_step(w)(carry, x)

    carry, ys = scan(f, init, xs)
    assert carry is init
    assert calls == [False]  # f ran once, as a probe, without recording a graph
    assert ys["nothing"] is None
    shapes = {k: ys[k].shape for k in ("h", "norm")}
    assert shapes == {"h": (0, 3), "norm": (0,)}
    assert ys["pair"][0].shape == (0, 3) and ys["pair"][0].dtype == torch.float64


def test_length_zero_with_xs_none_and_reverse():
    carry, ys = scan(lambda c, x: (c + 1, {"y": c * 2.0}), torch.tensor(5.0), length=0,
                     reverse=True)
    assert carry.item() == 5.0 and ys["y"].shape == (0,)


def test_length_zero_probe_still_checks_carry():
    with pytest.raises(ValueError, match="probe"):
        scan(lambda c, x: (c.double(), None), torch.zeros(2), torch.zeros(0, 2))


def test_length_zero_under_vmap_and_grad():
    def fn(p, xs):
        carry, ys = scan(lambda c, x: (torch.tanh(c * p + x), c), torch.zeros(3), xs)
        return carry.sum() + ys.sum()

    xs = torch.zeros(4, 0, 3)
    grads = torch.func.vmap(torch.func.grad(fn), in_dims=(None, 0))(torch.tensor(0.3), xs)
    assert grads.shape == (4,) and torch.all(grads == 0)
    carry, ys = torch.func.vmap(
        lambda xs: scan(lambda c, x: (c + x, c * x), torch.zeros(3), xs)
    )(xs)
    assert carry.shape == (4, 3) and ys.shape == (4, 0, 3)


# ------------------------------------------------------------------------------- gradients


def loss_of(scan_fn, reverse):
    def loss(w, init, xs):
        carry, ys = scan_fn(rnn_step(w), init, xs, reverse=reverse)
        return (
            (carry.h * carry.c).sum() + ys["h"].pow(2).sum() + ys["norm"].sum()
            + ys["pair"][0].sin().sum() + ys["pair"][1].sum()
        )

    return loss


@pytest.mark.parametrize("reverse", [False, True])
def test_autograd_matches_reference(reverse):
    w, init, xs = make_inputs(4)
    leaves = [w, *init, xs["u"], xs["v"]]

    def grads(scan_fn):
        ts = [t.clone().requires_grad_(True) for t in leaves]
        loss = loss_of(scan_fn, reverse)(ts[0], Pair(ts[1], ts[2]), {"u": ts[3], "v": ts[4]})
        return torch.autograd.grad(loss, ts)

    assert_same(grads(scan), grads(reference_scan), tol=1e-14)


@pytest.mark.parametrize("reverse", [False, True])
def test_func_grad_matches_reference(reverse):
    w, init, xs = make_inputs(4)
    got = torch.func.grad(loss_of(scan, reverse), argnums=(0, 1, 2))(w, init, xs)
    ref = torch.func.grad(loss_of(reference_scan, reverse), argnums=(0, 1, 2))(w, init, xs)
    assert_same(got, ref, tol=1e-14)


# ------------------------------------------------------------------------------------ vmap


@pytest.mark.parametrize("reverse", [False, True])
def test_vmap_matches_per_example_reference(reverse):
    batch = 3
    w, init, xs = make_inputs(5, batch=(batch,))

    def run(scan_fn):
        def go(i, x):
            carry, ys = scan_fn(rnn_step(w), i, x, reverse=reverse)
            del ys["nothing"]  # torch.func.vmap refuses None among its outputs
            return carry, ys

        return go

    got = torch.func.vmap(run(scan))(init, xs)
    rows = [
        run(reference_scan)(optree.tree_map(lambda t, b=b: t[b], init),
                            optree.tree_map(lambda t, b=b: t[b], xs))
        for b in range(batch)
    ]
    expected = optree.tree_map(lambda *leaves: torch.stack(leaves), *rows)
    assert_same(got, expected, tol=1e-14)


@pytest.mark.parametrize("reverse", [False, True])
def test_vmap_of_grad_is_per_example_gradient(reverse):
    batch = 3
    w, init, xs = make_inputs(4, batch=(batch,))
    loss = loss_of(scan, reverse)
    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(w, init, xs)
    ref_loss = loss_of(reference_scan, reverse)
    for b in range(batch):
        wb = w.clone().requires_grad_(True)
        value = ref_loss(wb, optree.tree_map(lambda t, b=b: t[b], init),
                         optree.tree_map(lambda t, b=b: t[b], xs))
        (expected,) = torch.autograd.grad(value, wb)
        assert (got[b] - expected).abs().max().item() <= 1e-13


def test_functional_call_of_a_module_inside_scan():
    torch.manual_seed(0)
    cell = torch.nn.Linear(4, 3).double()
    params = {k: v.detach() for k, v in cell.named_parameters()}
    xs = torch.randn(6, 3, dtype=torch.float64)

    def loss(p, xs):
        def f(h, x):
            h = torch.tanh(torch.func.functional_call(cell, p, (torch.cat([h, x[:1]]),)))
            return h, h.sum()

        h, ys = scan(f, torch.zeros(3, dtype=torch.float64), xs)
        return h.sum() + ys.sum()

    got = torch.func.grad(loss)(params, xs)
    value = loss(dict(cell.named_parameters()), xs)
    expected = dict(zip(params, torch.autograd.grad(value, list(cell.parameters()))))
    for k in params:
        assert (got[k] - expected[k]).abs().max().item() <= 1e-14


# ---------------------------------------------------------------------------------- errors


def test_error_xs_lengths_disagree():
    with pytest.raises(ValueError, match=r"disagree.*xs\['a'\].*xs\['b'\]|disagree"):
        scan(lambda c, x: (c, None), None, {"a": torch.zeros(3), "b": torch.zeros(4, 2)})


def test_error_length_contradicts_xs():
    with pytest.raises(ValueError, match="length=5 contradicts"):
        scan(lambda c, x: (c, None), None, torch.zeros(3), length=5)


def test_error_neither_xs_nor_length():
    with pytest.raises(ValueError, match="length"):
        scan(lambda c, x: (c, None), None)
    with pytest.raises(ValueError, match="length"):
        scan(lambda c, x: (c, None), None, {"a": None})


@pytest.mark.parametrize("length", [-1, 2.0, True])
def test_error_bad_length(length):
    with pytest.raises(ValueError, match="length must be an int"):
        scan(lambda c, x: (c, None), None, length=length)


def test_error_xs_leaf_not_a_sequence():
    with pytest.raises(ValueError, match=r"xs\['a'\] is a 0-dim tensor"):
        scan(lambda c, x: (c, None), None, {"a": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"xs\[0\] is a float, not a tensor"):
        scan(lambda c, x: (c, None), None, [1.0])


def test_error_carry_structure_changes():
    with pytest.raises(ValueError, match="structure of the carry at step t=0"):
        scan(lambda c, x: ((c, c), None), torch.zeros(2), torch.zeros(3))


def test_error_carry_shape_changes_names_leaf_and_shapes():
    def f(c, x):
        return {"h": torch.cat([c["h"], x[None]]), "c": c["c"]}, None

    with pytest.raises(ValueError, match=r"carry\['h'\].*shape \(2,\).*shape \(3,\)"):
        scan(f, {"h": torch.zeros(2), "c": torch.zeros(1)}, torch.zeros(3))


def test_error_carry_dtype_changes_names_both_dtypes():
    with pytest.raises(ValueError, match=r"carry\[1\].*torch.float32.*torch.float64"):
        scan(lambda c, x: ((c[0], c[1].double()), None), (torch.zeros(2), torch.zeros(2)),
             torch.zeros(3))


def test_error_carry_shape_change_at_a_later_step():
    def f(c, x):
        return (c if x.item() < 1 else c[:1]), None

    with pytest.raises(ValueError, match="step t=1"):
        scan(f, torch.zeros(2), torch.arange(3.0))


def test_error_carry_tensor_becomes_number():
    with pytest.raises(ValueError, match=r"shape \(3,\).*float 1.0.*keep its type"):
        scan(lambda c, x: (1.0, None), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="keep its type"):
        scan(lambda c, x: ("done", None), torch.zeros(()), torch.zeros(3))


def test_structure_errors_are_value_and_type_errors():
    # jax.lax.scan raises TypeError for these, scan used to raise ValueError: both work
    assert issubclass(ScanStructureError, ValueError) and issubclass(ScanStructureError, TypeError)
    assert psgfunc.ScanStructureError is ScanStructureError
    bad = [
        lambda: scan(lambda c, x: ((c,), None), torch.zeros(()), torch.zeros(3)),  # structure
        lambda: scan(lambda c, x: (c[None], None), torch.zeros(()), torch.zeros(3)),  # shape
        lambda: scan(lambda c, x: (c.double(), None), torch.zeros(()), torch.zeros(3)),  # dtype
        lambda: scan(lambda c, x: (c, x if x.item() < 1 else (x,)), None, torch.arange(3.0)),  # y
        lambda: scan(lambda c, x: c, torch.zeros(()), torch.zeros(3)),  # not a pair
    ]
    for call in bad:
        for cls in (TypeError, ValueError, ScanStructureError):
            with pytest.raises(cls):
                call()


# -------------------------------------------------------------------------------- unroll


@pytest.mark.parametrize("unroll", [1, 2, 3, 7, True, False])
def test_unroll_is_accepted_and_changes_nothing(unroll):
    w, init, xs = make_inputs(5)
    expected = scan(rnn_step(w), init, xs)
    assert_same(scan(rnn_step(w), init, xs, unroll=unroll), expected)
    assert_same(scan(rnn_step(w), init, xs, reverse=True, unroll=unroll), scan(rnn_step(w), init, xs, reverse=True))


@pytest.mark.parametrize("unroll,error,match", [
    (0, ValueError, "unroll must be an int >= 1 or a bool.*got 0"),
    (-2, ValueError, "unroll must be an int >= 1"),
    (2.0, TypeError, "unroll must be an int >= 1 or a bool.*got float 2.0"),
    ("2", TypeError, "got str '2'"),
    (None, TypeError, "got NoneType None"),
])
def test_error_bad_unroll(unroll, error, match):
    with pytest.raises(error, match=match):
        scan(lambda c, x: (c, x), None, torch.zeros(3), unroll=unroll)


def test_error_y_changes():
    with pytest.raises(ValueError, match="output y at step t=1"):
        scan(lambda c, x: (c, x if x.item() < 1 else (x,)), None, torch.arange(3.0))
    with pytest.raises(ValueError, match=r"y changed at step t=1.*shape \(\).*shape \(1,\)"):
        scan(lambda c, x: (c, x if x.item() < 1 else x[None]), None, torch.arange(3.0))


def test_error_f_must_return_a_pair():
    with pytest.raises(ValueError, match="pair"):
        scan(lambda c, x: c, torch.zeros(()), torch.zeros(3))
