"""The module path (psgfunc.nn shells, expand_weights, DPOptimizer) never merges examples,
never trains on noise alone, never misses a use of a parameter, and its fast-clipping records
belong to one optimizer (psgfunc.per_sample._rows)."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import psgfunc.dp as dp
import psgfunc.nn as pnn
from psgfunc.per_sample import _rows
from tests.oracles import per_example_grads

F64 = torch.float64
MODES = ["plain", "dense", "fast"]  # no optimizer, DPOptimizer, DPOptimizer(fast_clipping=True)


def optimizer(params, mode, *, max_norm=1.0, noise=0.0, expected=4.0, **kw):
    if mode == "plain":
        return None
    return dp.DPOptimizer(torch.optim.SGD(list(params), lr=1.0), max_norm=max_norm,
                          noise_multiplier=noise, expected_batch_size=expected,
                          fast_clipping=mode == "fast", **kw)


def clipped_step(params, per_example, max_norm, expected):
    """float64 oracle of one noiseless SGD(lr=1) DP step from per-example gradients."""
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in per_example], 1)
    norms = flat.norm(dim=1)
    factor = (max_norm / norms).clamp(max=1.0)
    return [p - torch.tensordot(factor, g, 1) / expected for p, g in zip(params, per_example)], norms


# ------------------------------------------------------- layers: one batch x [B, *] -> loss


def linear():
    return pnn.Linear(3, 2, 8, dtype=F64), lambda b: torch.randn(b, 3, dtype=F64)


def embedding():
    return pnn.Embedding(7, 2, 8, dtype=F64), lambda b: torch.randint(0, 7, (b, 3))


def conv():
    return pnn.Conv1d(2, 3, 2, 8, dtype=F64), lambda b: torch.randn(b, 2, 5, dtype=F64)


def layer_norm():
    return pnn.LayerNorm(4, 8).to(F64), lambda b: torch.randn(b, 4, dtype=F64)


def dplstm():
    return pnn.DPLSTM(3, 2, batch_first=True, dtype=F64), lambda b: torch.randn(b, 4, 3, dtype=F64)


def cell():
    return pnn.DPLSTMCell(3, 2, dtype=F64), lambda b: torch.randn(b, 3, dtype=F64)


def lstm_linear():
    return pnn.LSTMLinear(3, 2, dtype=F64), lambda b: torch.randn(b, 3, dtype=F64)


LAYERS = [linear, embedding, conv, layer_norm, dplstm, cell, lstm_linear]


def loss_of(out):
    out = out[0] if isinstance(out, tuple) else out
    return (out.pow(2) * 0.5 + out).sum()


def state(layer, mode, opt):
    """What the layer's parameters hold: grad_sample, or the fast-clipping record."""
    if mode == "fast":
        return [len(opt._logs[id(p)].pieces) for p in layer.parameters()]
    return [p.grad_sample.clone() for p in layer.parameters()]


# ------------------------------------------------------------- item 2: rows are examples


def test_reproducer_two_backward_calls_are_two_examples_or_an_error():
    for fast in (False, True):
        m = pnn.expand_weights(nn.Linear(1, 1, bias=False), 4)
        opt = dp.DPOptimizer(torch.optim.SGD(m.parameters(), lr=1.0), max_norm=1.0,
                             noise_multiplier=0.0, expected_batch_size=2, fast_clipping=fast)
        x = torch.ones(1, 1)
        (m(x) * 10).sum().backward()
        with pytest.raises(ValueError, match=r"another forward pass.*accumulate\(\)"):
            (m(x) * -20).sum().backward()
        # the first batch, alone (norms as clipping used them: certified, at most 1e-4 above)
        torch.testing.assert_close(opt.accumulate(), torch.tensor([10.0]), rtol=1e-4, atol=0)
        (m(x) * -20).sum().backward()  # after accumulate(): a new micro-batch
        torch.testing.assert_close(opt.accumulate(), torch.tensor([20.0]), rtol=1e-4, atol=0)


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("second", [3, 2])
def test_a_second_forward_pass_never_adds_to_the_rows(make, mode, second):
    torch.manual_seed(0)
    layer, batch = make()
    opt = optimizer(layer.parameters(), mode)
    loss_of(layer(batch(3))).backward()
    held = state(layer, mode, opt)
    with pytest.raises(ValueError, match="zero_grad"):
        loss_of(layer(batch(second))).backward()
    for a, b in zip(state(layer, mode, opt), held):  # nothing was added
        assert a == b if mode == "fast" else torch.equal(a, b)
    if opt is None:
        pnn.zero_grad(layer)
    else:
        opt.accumulate()
    loss_of(layer(batch(second))).backward()  # cleared: fine
    if opt is not None:
        assert opt.accumulate().shape == (second,)


def test_rows_set_by_hand_are_not_added_to():
    layer, batch = linear()
    layer.weight.grad_sample = torch.zeros(3, 2, 3, dtype=F64)
    with pytest.raises(ValueError, match="did not build"):
        loss_of(layer(batch(3))).backward()


def two_losses(model_out):
    out = model_out[0] if isinstance(model_out, tuple) else model_out
    return (out.pow(2)).sum(), out.sin().sum()


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("mode", ["dense", "fast"])
def test_several_backward_calls_of_one_forward_pass_add_up(make, mode):
    """l1.backward(retain_graph=True); l2.backward() == (l1 + l2).backward()."""
    results = []
    for split in (False, True):
        torch.manual_seed(0)
        layer, batch = make()
        opt = optimizer(layer.parameters(), mode, max_norm=0.3)
        torch.manual_seed(1)
        l1, l2 = two_losses(layer(batch(3)))
        if split:
            l1.backward(retain_graph=True)
            l2.backward()
        else:
            (l1 + l2).backward()
        norms = opt.accumulate()
        opt.step()
        results.append((norms, [p.detach().clone() for p in layer.parameters()]))
    (n1, p1), (n2, p2) = results
    torch.testing.assert_close(n2, n1, rtol=1e-10, atol=0)
    for a, b in zip(p2, p1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def cell_loop(cell_, xs, lengths=None, per_step=False):
    """Run ``cell_`` over ``xs [T, B, D]`` (packed steps of a shrinking batch with
    ``lengths``); the loss is summed over steps, or backpropagated step by step."""
    steps, size = xs.shape[0], xs.shape[1]
    if lengths is not None:
        packed = pack_padded_sequence(xs, lengths)
        inputs = packed.data.split(packed.batch_sizes.tolist())
        sizes = packed.batch_sizes.tolist()
    else:
        inputs, sizes = list(xs), [size] * steps
    h = c = torch.zeros(size, cell_.hidden_size, dtype=xs.dtype)
    total = 0
    for x_t, n in zip(inputs, sizes):
        h1, c1 = cell_(x_t, h, c, batch_size_t=n)
        h, c = torch.cat([h1, h[n:]]), torch.cat([c1, c[n:]])
        loss = h1.pow(2).sum() + c1.sin().sum()
        if per_step:
            loss.backward(retain_graph=True)
        else:
            total = total + loss
    if not per_step:
        total.backward()


def cell_oracle(cell_, xs, lengths):
    ref = nn.LSTMCell(cell_.input_size, cell_.hidden_size, dtype=F64)
    params = {k: v.detach() for k, v in cell_.named_parameters()}

    def fn(p, xb, n):
        hx, total = None, 0
        for t in range(int(n)):
            hx = functional_call(ref, p, (xb[t].unsqueeze(0), hx))
            total = total + hx[0].pow(2).sum() + hx[1].sin().sum()
        return total

    return list(per_example_grads(fn, params, xs.transpose(0, 1), lengths).values())


@pytest.mark.parametrize("mode", ["dense", "fast"])
@pytest.mark.parametrize("per_step", [False, True])
def test_cell_over_packed_steps_matches_the_float64_loop(mode, per_step):
    """Item 10: shrinking batch_size_t, also with fast clipping, and one backward per step."""
    torch.manual_seed(0)
    c = pnn.DPLSTMCell(3, 4, dtype=F64)
    params = [p.detach().clone() for p in c.parameters()]
    xs = torch.randn(5, 4, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([5, 4, 2, 1])
    want, want_norms = clipped_step(params, cell_oracle(c, xs, lengths), 0.5, 4.0)
    opt = optimizer(c.parameters(), mode, max_norm=0.5, expected=4.0)
    cell_loop(c, xs, lengths, per_step=per_step)
    norms = opt.accumulate()
    opt.step()
    torch.testing.assert_close(norms, want_norms, rtol=1e-10, atol=0)
    for p, w in zip(c.parameters(), want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("make", [cell, lstm_linear])
@pytest.mark.parametrize("mode", MODES)
def test_cell_and_lstm_linear_micro_batches_of_different_sizes_do_not_merge(make, mode):
    layer, batch = make()
    opt = optimizer(layer.parameters(), mode)
    for size in (4, 2):
        if size == 2:
            with pytest.raises(ValueError, match="another forward pass"):
                loss_of(layer(batch(size))).backward()
        else:
            loss_of(layer(batch(size))).backward()
    if opt is not None:
        assert opt.accumulate().shape == (4,)


@pytest.mark.parametrize("mode", ["dense", "fast"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_a_clipped_forward_pass_cannot_deliver_again(mode, reduction):
    layer, batch = linear()
    opt = optimizer(layer.parameters(), mode, loss_reduction=reduction)
    l1, l2 = two_losses(layer(batch(3)))
    l1.backward(retain_graph=True)
    opt.accumulate()
    with pytest.raises(ValueError, match="count those examples twice"):
        l2.backward()


@pytest.mark.parametrize("mode", ["dense", "fast"])
def test_gradients_for_inputs_only_record_nothing(mode):
    """autograd.grad for the inputs first, then backward: the rows of one backward only."""
    results = []
    for first in (False, True):
        torch.manual_seed(0)
        layer, _ = dplstm()
        x = torch.randn(3, 4, 3, dtype=F64, requires_grad=True)
        opt = optimizer(layer.parameters(), mode, max_norm=100.0)
        loss = loss_of(layer(x))
        if first:
            torch.autograd.grad(loss, [x], retain_graph=True)
        loss.backward()
        results.append(opt.accumulate())
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=0)


# ------------------------------------------- item 3: no per-sample gradients, no noise step


@pytest.mark.parametrize("fast", [False, True])
def test_a_model_without_per_sample_gradients_is_refused(fast):
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), max_norm=1.0,
                         noise_multiplier=1.0, expected_batch_size=2, fast_clipping=fast)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(3, 2)).sum().backward()
    with pytest.raises(ValueError, match="expand_weights"):
        opt.step()
    with pytest.raises(ValueError, match="set_grad_sample"):
        opt.accumulate()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


@pytest.mark.parametrize("fast", [False, True])
def test_an_empty_poisson_batch_stays_a_noise_step(fast):
    """No backward at all: pure noise, also after a step left its update in p.grad, and after
    zero_grad(set_to_none=False) left zeros."""
    m = pnn.expand_weights(nn.Linear(2, 2), 4)
    opt = dp.DPOptimizer(torch.optim.SGD(m.parameters(), lr=1.0), max_norm=1.0,
                         noise_multiplier=1.0, expected_batch_size=2, seed=0, fast_clipping=fast)
    m(torch.randn(3, 2)).sum().backward()
    opt.step()
    for clear in (None, "zeros"):
        if clear == "zeros":
            opt.zero_grad(set_to_none=False)
        before = [p.detach().clone() for p in m.parameters()]
        opt.step()  # an empty batch: no forward, no backward
        assert all(not torch.equal(a, b) for a, b in zip(m.parameters(), before))


# ------------------------------------------------- item 4: rows cover every use of a param


class TiedLM(nn.Module):
    """Embedding whose table is also the output head, by a plain op or through a shell."""

    def __init__(self, through_shell):
        super().__init__()
        torch.manual_seed(0)
        self.emb = pnn.Embedding(6, 3, 8, dtype=F64)
        self.head = pnn.Linear(3, 6, 8, bias=False, dtype=F64) if through_shell else None
        if through_shell:
            self.head.weight = self.emb.weight

    def forward(self, idx):
        h = torch.tanh(self.emb(idx))
        return self.head(h) if self.head is not None else h @ self.emb.weight.T


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_a_plain_use_next_to_a_shell_is_refused(mode, reduction):
    """Shells assembled by hand, in a model not passed to expand_weights: nothing serves the
    head's plain op (expand_weights would: see the test below)."""
    model = TiedLM(through_shell=False)
    opt = optimizer(model.parameters(), mode, loss_reduction=reduction) if mode != "plain" else None
    idx, y = torch.randint(0, 6, (4, 2)), torch.randint(0, 6, (4, 2))
    with pytest.raises(ValueError, match=r"'weight'.*outside any psgfunc layer.*untie"):
        F.cross_entropy(model(idx).flatten(0, 1), y.flatten(), reduction=reduction).backward()
    assert getattr(model.emb.weight, "grad_sample", None) is None
    if opt is not None:
        assert opt._logs.get(id(model.emb.weight)) is None or not opt._logs[id(model.emb.weight)].pieces


@pytest.mark.parametrize("mode", MODES)
def test_a_penalty_on_a_shell_weight_is_refused(mode):
    layer, batch = linear()
    optimizer(layer.parameters(), mode)
    with pytest.raises(ValueError, match="weight_decay"):
        (loss_of(layer(batch(3))) + 1e-3 * layer.weight.pow(2).sum()).backward()


@pytest.mark.parametrize("mode", ["dense", "fast"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("tie", ["shell", "plain op, converted"])
def test_tying_through_shells_matches_the_float64_loop(mode, reduction, tie):
    """The fix the error names: both uses through psgfunc layers, exact; or the plain
    ``h @ emb.weight.T`` in a model converted by expand_weights, which serves it through the
    op-level rules. Repeated backward calls of one forward pass raise nothing."""
    model = TiedLM(through_shell=True) if tie == "shell" else pnn.expand_weights(TiedLM(through_shell=False), 8)
    params = [p.detach().clone() for p in model.parameters()]
    opt = optimizer(model.parameters(), mode, max_norm=0.2, expected=4.0, loss_reduction=reduction)
    idx, y = torch.randint(0, 6, (4, 2)), torch.randint(0, 6, (4, 2))
    logits = model(idx).flatten(0, 1)
    scale = 1.0 if reduction == "sum" else 1 / 4  # a mean over the batch's 4 examples
    loss = F.cross_entropy(logits, y.flatten(), reduction="sum") * scale
    loss.backward(retain_graph=True)
    loss.backward()
    norms = opt.accumulate()
    opt.step()

    def fn(p, i, t):  # the plain tied model
        logits = torch.tanh(F.embedding(i, p["emb.weight"])) @ p["emb.weight"].T
        return 2 * F.cross_entropy(logits, t, reduction="sum")

    per_example = list(per_example_grads(fn, {"emb.weight": params[0]}, idx, y).values())
    want, want_norms = clipped_step(params, per_example, 0.2, 4.0)
    torch.testing.assert_close(norms, want_norms, rtol=1e-10, atol=0)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("mode", ["dense", "fast"])
@pytest.mark.parametrize("order", ["shell use first", "plain use first", "plain use before any shell call"])
def test_a_plain_use_backpropagated_separately_is_refused_by_the_optimizer(mode, order):
    """Either order: the plain use's gradient is still in ``p.grad`` when the rows come
    (review: backpropagated first, it went unseen and the step missed it)."""
    model = TiedLM(through_shell=False)
    opt = optimizer(model.parameters(), mode)
    idx = torch.randint(0, 6, (4, 2))
    if order == "plain use before any shell call":
        (torch.randn(4, 2, 3, dtype=F64) @ model.emb.weight.T).sum().backward()
    h = torch.tanh(model.emb(idx))
    if order == "shell use first":
        h.sum().backward(retain_graph=True)  # the shell use
        (h.detach() @ model.emb.weight.T).sum().backward()  # the plain use, on its own
    elif order == "plain use first":
        (h.detach() @ model.emb.weight.T).sum().backward()
        h.sum().backward()
    else:
        h.sum().backward()
    with pytest.raises(ValueError, match=r"#0.*outside any psgfunc layer"):
        opt.accumulate()


@pytest.mark.parametrize("mode", ["dense", "fast"])
@pytest.mark.parametrize("clear", ["opt.zero_grad()", "zeros in p.grad", "model.zero_grad()"])
def test_a_gradient_cleared_before_the_rows_is_no_plain_use(mode, clear):
    """What a plain backward left in ``p.grad`` and was cleared is not counted: the step is
    the one without it."""
    def step(with_plain):
        model = TiedLM(through_shell=False)
        opt = optimizer(model.parameters(), mode)
        idx = torch.randint(0, 6, (4, 2), generator=torch.Generator().manual_seed(0))
        before = model.emb.weight.detach().clone()
        if with_plain:
            (torch.randn(4, 2, 3, dtype=F64) @ model.emb.weight.T).sum().backward()
            if clear == "opt.zero_grad()":
                opt.zero_grad()
            elif clear == "zeros in p.grad":
                model.emb.weight.grad.zero_()
            else:
                model.zero_grad()
        torch.tanh(model.emb(idx)).sum().backward()
        opt.step()
        return model.emb.weight.detach() - before

    torch.testing.assert_close(step(True), step(False), rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", ["dense", "fast"])
def test_the_update_a_step_leaves_in_p_grad_is_no_plain_use(mode):
    """``step()`` leaves its update in ``p.grad``; a next step without ``zero_grad()`` (whose
    backward adds to it) is the same step as with it."""
    def two_steps(zero_grad):
        model = TiedLM(through_shell=False)
        opt = optimizer(model.parameters(), mode)
        idx = torch.randint(0, 6, (4, 2), generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            torch.tanh(model.emb(idx)).pow(2).sum().backward()
            opt.step()
            if zero_grad:
                opt.zero_grad()
        return model.emb.weight.detach()

    torch.testing.assert_close(two_steps(False), two_steps(True), rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", ["dense", "fast"])
@pytest.mark.parametrize("unfreeze", ["requires_grad_", "add_param_group", "without zero_grad"])
def test_gradients_left_by_public_pretraining_are_no_plain_use(mode, unfreeze):
    """Pretrained without DP in the same process (``p.grad`` left filled), converted, the
    backbone frozen while the head trains, then unfrozen (also added with
    ``add_param_group``, or a loop without ``zero_grad``): the leftover is no use of a DP
    step, and the steps run (review: the first after unfreezing was refused)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    backbone, head = model[0], model[2]
    x, y = torch.randn(4, 5, dtype=F64), torch.randint(0, 3, (4,))
    public = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        public.zero_grad()
        F.cross_entropy(model(x), y).backward()
        public.step()
    model = pnn.expand_weights(model, 4)
    backbone.requires_grad_(False)
    opt = optimizer(head.parameters() if unfreeze == "add_param_group" else model.parameters(), mode)
    for unfrozen in (False, True):
        if unfrozen:
            backbone.requires_grad_(True)
            if unfreeze == "add_param_group":
                opt.add_param_group({"params": list(backbone.parameters())})
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if unfreeze != "without zero_grad":
                opt.zero_grad()


@pytest.mark.parametrize("mode", ["dense", "fast"])
def test_a_plain_use_seen_before_add_param_group_stays_refused(mode):
    """``add_param_group`` takes what ``p.grad`` holds as from before the optimizer got
    ``p``, except a plain use a backward pass was seen to bring (review: a weight penalty
    backpropagated on its own, then the group added, trained on rows missing it)."""
    torch.manual_seed(0)
    lin, other = pnn.Linear(3, 2, 4), pnn.Linear(3, 2, 4)
    x = torch.randn(4, 3)
    opt = optimizer(other.parameters(), mode)
    loss = lin(x).sum() + other(x).sum()
    (100 * lin.weight.square().sum()).backward()
    opt.add_param_group({"params": list(lin.parameters())})
    loss.backward()
    with pytest.raises(ValueError, match="outside any psgfunc layer"):
        opt.step()


def test_frozen_parameters_are_not_stepped_with_a_gradient_left_from_before():
    """A frozen parameter in the optimizer's groups keeps a non-private ``p.grad`` from
    before it was frozen: the inner optimizer must not apply it (review: it moved the
    frozen layer by that gradient at every DP step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(4, 3, dtype=F64)
    model(x).pow(2).sum().backward()  # public: p.grad left on every parameter
    model = pnn.expand_weights(model, 4)
    model[0].requires_grad_(False)
    opt = optimizer(model.parameters(), "dense")
    frozen = model[0].weight.detach().clone()
    for _ in range(2):
        model(x).pow(2).sum().backward()
        opt.step()
    assert torch.equal(model[0].weight.detach(), frozen)


def test_a_sum_that_overflows_is_refused_not_compared():
    """float16 rows that are finite but whose per-call sums overflow to +inf and -inf: the
    total is NaN like the rows' sum, and a plain use there cannot be seen. Refused with the
    reason (review: the NaN-equals-NaN rule let the use through)."""
    lin = pnn.Linear(1, 1, 2, bias=False, dtype=torch.float16)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    x = torch.tensor([[200.0], [200.0]], dtype=torch.float16)
    loss = (lin(x) * 200).sum() + (lin(-x) * 200).sum() + 7.0 * lin.weight.sum()
    with pytest.raises(ValueError, match="overflows"):
        loss.backward()


def test_a_non_finite_total_is_left_to_the_optimizer():
    """Rows of +inf and -inf sum to NaN in ``p.grad`` as in the rows' sum: no use outside
    the layers (backward runs), and DPOptimizer refuses the non-finite examples by name."""
    lin = pnn.Linear(1, 1, 2, bias=False)
    x = torch.tensor([[float("inf")], [float("-inf")]])
    lin(x).sum().backward()
    assert lin.weight.grad.isnan().all()
    lin.weight.grad, lin.weight.grad_sample = None, None
    opt = optimizer(lin.parameters(), "dense", expected=2.0)
    lin(x).sum().backward()
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_plain_use_far_below_the_total_is_refused(dtype):
    """The rows' sum and what autograd sends the parameter agree bit for bit, so a plain
    use of any size shows (review: with a tolerance of 16 eps of the total, a use of 12% of
    it passed in bfloat16)."""
    torch.manual_seed(0)
    lin = pnn.Linear(8, 8, 8, dtype=dtype)
    x = torch.randn(8, 8, dtype=dtype)
    with pytest.raises(ValueError, match="outside any psgfunc layer"):
        (lin(x).sum() + 1e-3 * (x @ lin.weight.T).pow(2).sum()).backward()


class _Scaled(nn.Module):
    """A custom layer (``expand_weights`` gives it a generic shell): ``x * w``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=F64))

    def forward(self, x):
        return torch.tanh(x * self.w)


def _checkpointed_models():
    torch.manual_seed(0)
    shell = pnn.Linear(3, 3, 4, dtype=F64)
    torch.manual_seed(0)
    converted = pnn.expand_weights(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).double(), 4)
    custom = pnn.expand_weights(nn.Sequential(_Scaled()), 4)
    return {"shell": shell, "expand_weights": converted, "generic shell": custom}


def _checkpointed_step(model, mode, *, checkpointed, plain_use=None):
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    opt = optimizer(model.parameters(), mode)
    before = [p.detach().clone() for p in model.parameters()]
    w = next(model.parameters())

    def plain(h):  # a per-example use of the first weight outside any psgfunc layer
        return torch.tanh(h @ w) if w.dim() == 2 else torch.tanh(h * w)

    if not checkpointed:
        out = model(x)
    elif plain_use is None or plain_use == "outside the checkpoint":
        out = checkpoint(model, x.clone().requires_grad_(), use_reentrant=True)
    elif plain_use == "in a checkpoint after the layers":
        out = checkpoint(plain, model(x), use_reentrant=True)
    else:  # in a second checkpoint
        out = checkpoint(plain, checkpoint(model, x.clone().requires_grad_(), use_reentrant=True),
                         use_reentrant=True)
    if plain_use == "outside the checkpoint":
        out = plain(out)
    out.pow(2).sum().backward()
    opt.step()
    return [b - p.detach() for p, b in zip(model.parameters(), before)]


@pytest.mark.parametrize("mode", ["dense", "fast"])
@pytest.mark.parametrize("kind", ["shell", "expand_weights", "generic shell"])
def test_a_reentrant_checkpoint_steps_as_without_it(mode, kind):
    """``checkpoint(model, x, use_reentrant=True)``: the forward runs without gradients and
    the backward reruns it; the DP step is the one without the checkpoint."""
    got = _checkpointed_step(_checkpointed_models()[kind], mode, checkpointed=True)
    want = _checkpointed_step(_checkpointed_models()[kind], mode, checkpointed=False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", ["dense", "fast"])
@pytest.mark.parametrize("kind", ["shell", "expand_weights", "generic shell"])
@pytest.mark.parametrize("where", ["outside the checkpoint", "in a checkpoint after the layers",
                                   "in a second checkpoint"])
def test_a_plain_use_and_a_reentrant_checkpoint_are_refused_on_the_first_step(mode, kind, where):
    """A reentrant checkpoint's backward is a backward pass of its own: the rows and a plain
    use of the same parameter come in different passes, in either order. The checkpoint's
    forward (without gradients) watches the parameter, and a plain use's gradient still in
    ``p.grad`` when the rows come flags them: refused on the very first step (review: the
    three were not, the watch came with the rerun, and a plain use before the rows was
    unseen)."""
    with pytest.raises(ValueError, match="outside any psgfunc layer"):
        _checkpointed_step(_checkpointed_models()[kind], mode, checkpointed=True, plain_use=where)


def test_a_parametrized_model_evaluates_without_gradients():
    """A weight-norm parametrization's module takes no input: under ``no_grad`` its generic
    shell runs it as is (it asked for a batch input before)."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    plain = nn.Sequential(weight_norm(nn.Linear(3, 3))).double()
    x = torch.randn(4, 3, dtype=F64)
    want = plain(x)
    model = pnn.expand_weights(plain, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_float32_rows_equal_the_total_bit_for_bit_no_false_positive():
    torch.manual_seed(0)
    lin, emb = pnn.Linear(32, 32, 16), pnn.Embedding(50, 32, 16)
    x = emb(torch.randint(0, 50, (16, 5)))
    for _ in range(6):  # one weight, six uses in one forward pass
        x = torch.tanh(lin(x))
    (x.sum() * 1e3 + emb(torch.randint(0, 50, (16, 2))).pow(2).sum()).backward()
    torch.testing.assert_close(lin.weight.grad_sample.sum(0), lin.weight.grad, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_one_call_sends_its_rows_sum_to_the_parameter(dtype):
    """A shell's expansion sends ``p`` the sum of its rows (what the check of ``p``'s total
    compares with, without summing again): ``grad`` is ``grad_sample.sum(0)`` bit for bit,
    equals the plain layer's, and a repeated backward adds both up."""
    torch.manual_seed(0)
    shell = pnn.Linear(5, 3, 6).to(dtype)
    plain = nn.Linear(5, 3).to(dtype)
    plain.load_state_dict(shell.state_dict())
    x = torch.randn(6, 5, dtype=dtype)
    loss = torch.tanh(shell(x)).pow(2).sum()
    loss.backward(retain_graph=True)
    torch.tanh(plain(x)).pow(2).sum().backward()
    for p, q in zip(shell.parameters(), plain.parameters()):
        assert torch.equal(p.grad, p.grad_sample.sum(0))
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    first = [p.grad_sample.clone() for p in shell.parameters()]
    loss.backward()
    for p, f in zip(shell.parameters(), first):
        torch.testing.assert_close(p.grad_sample, 2 * f, rtol=0, atol=0)


def _in_place_numpy(g):
    g.numpy()[...] += 1.0  # (no version bump)


_HOOKS = {
    "in place": lambda g: g.add_(1.0),
    "a new tensor": lambda g: g * 2,
    "through .data": lambda g: g.data.add_(1.0),  # (no version bump)
    "through numpy": _in_place_numpy,
}


@pytest.mark.parametrize("when, how", [("before the first call", "in place"),
                                       ("before the first call", "a new tensor"),
                                       ("before the first call", "through .data"),
                                       ("before the first call", "through numpy"),
                                       ("after the first call", "in place"),
                                       ("after the first call", "through .data"),
                                       ("after accumulation", "in place"),
                                       ("after accumulation", "through .data")])
def test_a_hook_that_changes_the_total_is_a_use_the_rows_miss(when, how):
    """A hook on the parameter that changes what autograd sends it (in place on the one
    call's sum, also where the version counter does not see it, or returning another
    tensor), registered before the shell's own hook, after it, or after accumulation on
    ``p.grad`` (which is that sum when ``p.grad`` was None): ``p.grad`` is no longer the
    rows' sum, and the backward pass refuses it. (A later hook returning a new tensor, or a
    post-accumulate hook changing a ``p.grad`` the sum was added to, acts after the shell's
    hook saw the total: not seen; it changes ``p.grad`` only, never the rows DP-SGD
    uses.)"""
    torch.manual_seed(0)
    shell = pnn.Linear(3, 2, 4)
    x = torch.randn(4, 3)
    hook = _HOOKS[how]

    def register():
        if when == "after accumulation":
            shell.weight.register_post_accumulate_grad_hook(lambda p: (hook(p.grad), None)[1])
        else:
            shell.weight.register_hook(hook)

    if when == "before the first call":
        register()
    else:
        shell(x).sum().backward()
        shell.zero_grad(set_to_none=True)
        shell.weight.grad_sample = None
        register()
    with pytest.raises(ValueError, match="outside any psgfunc layer"):
        shell(x).sum().backward()


# --------------------------------------------- item 8: fast-clipping records, one owner


@pytest.mark.parametrize("first, second", [("fast", "dense"), ("fast", "fast"), ("dense", "fast")])
def test_the_newest_optimizer_on_a_parameter_wins(first, second):
    """A dense (or another fast) DPOptimizer after a fast one: it gets the per-sample
    gradients and the right update; the old one refuses to be used."""
    def update(model, opt, x):
        before = [p.detach().clone() for p in model.parameters()]
        model(x).pow(2).sum().backward()
        opt.step()
        return [b - p.detach() for p, b in zip(model.parameters(), before)]

    def make(mode):
        torch.manual_seed(0)
        model = pnn.expand_weights(nn.Linear(3, 2).double(), 4)
        return model, optimizer(model.parameters(), mode, expected=2.0)

    model, old = make(first)
    new = optimizer(model.parameters(), second, expected=2.0)
    x = torch.randn(3, 3, dtype=F64)
    got = update(model, new, x)
    assert all(u.abs().max() > 0 for u in got)
    model(x).sum().backward()
    with pytest.raises(ValueError, match="newer DPOptimizer"):
        old.accumulate()
    for a, b in zip(got, update(*make("dense"), x)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_records_die_with_their_optimizer_and_never_pile_up():
    model = pnn.expand_weights(nn.Linear(3, 2).double(), 4)
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0,
                         noise_multiplier=0.0, expected_batch_size=2, fast_clipping=True)
    logs = [opt._logs[id(p)] for p in model.parameters()]
    for _ in range(3):
        model(torch.randn(3, 3, dtype=F64)).sum().backward()
        assert [len(log.pieces) for log in logs] == [1, 1]
        opt.step()
        assert [len(log.pieces) for log in logs] == [0, 0]
        assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    model(torch.randn(3, 3, dtype=F64)).sum().backward()
    opt.zero_grad()
    assert [len(log.pieces) for log in logs] == [0, 0]
    del opt, logs
    gc.collect()
    assert all(_rows.log_of(p) is None for p in model.parameters())
    model(torch.randn(3, 3, dtype=F64)).sum().backward()  # no owner: plain grad_sample again
    assert all(p.grad_sample.shape[0] == 3 for p in model.parameters())


def test_gradient_present_when_the_optimizer_is_built_is_not_a_backward():
    """p.grad left by an earlier optimizer's step is not mistaken for a plain backward; a
    backward after construction that adds to it (in place) still is."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    p.grad = torch.full((3,), 0.5, dtype=torch.float64)  # e.g. an earlier DPOptimizer's update
    kw = dict(max_norm=1.0, noise_multiplier=1.0, expected_batch_size=2, seed=0)
    opt = dp.DPOptimizer(torch.optim.SGD([p], lr=0.1), **kw)
    opt.step()  # empty batch: pure noise, no error
    p.grad = torch.full((3,), 0.5, dtype=torch.float64)
    opt2 = dp.DPOptimizer(torch.optim.SGD([p], lr=0.1), **kw)
    (p * 2).sum().backward()  # a plain backward accumulates into the existing p.grad in place
    with pytest.raises(ValueError, match="no trainable parameter has per-sample gradients"):
        opt2.step()


@pytest.mark.parametrize("fast", [False, True])
def test_layer_the_loss_does_not_use_has_zero_per_sample_gradients(fast):
    """A shell that ran in the forward but that no backward reached (HF BERT's pooler when the
    loss reads the hidden states) has zero per-sample gradients: the step clips the others and
    leaves it where it was; a parameter no psgfunc layer used, without grad_sample, still raises."""
    torch.manual_seed(0)
    body, unused = pnn.Linear(3, 4, 4, dtype=F64), pnn.Linear(4, 2, 4, dtype=F64)
    x = torch.randn(4, 3, dtype=F64)
    before = [p.detach().clone() for p in body.parameters()]
    per_example = per_example_grads(
        lambda p, x: functional_call(body, p, (x[None],)).tanh().sum(),
        {k: v.detach() for k, v in body.named_parameters()}, x)
    want, norms = clipped_step(before, list(per_example.values()), 0.5, 4.0)
    opt = optimizer([*body.parameters(), *unused.parameters()], "fast" if fast else "dense", max_norm=0.5)
    h = body(x)
    unused(h)  # runs, but its output is not in the loss
    h.tanh().sum().backward()
    torch.testing.assert_close(opt.accumulate(), norms, rtol=1e-10, atol=0)
    opt.step()
    for p, w in zip(body.parameters(), want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-13)
    assert all(p.grad is None or not p.grad.any() for p in unused.parameters())

    stray = nn.Parameter(torch.randn(2, dtype=F64))  # never seen by a psgfunc layer
    opt = optimizer([*body.parameters(), stray], "fast" if fast else "dense")
    body(x).sum().backward()
    with pytest.raises(ValueError, match="have no grad_sample while others do"):
        opt.accumulate()


@pytest.mark.parametrize("fast", [False, True])
def test_an_unused_layer_after_zero_grad_to_zeros_still_has_zero_per_sample_gradients(fast):
    """zero_grad(set_to_none=False) zeroes the unused layer's update in place: still no
    gradient that a backward left (before: the next step refused it as unrecorded); a
    backward that does add to the zeros (a use outside psgfunc layers) still raises."""
    torch.manual_seed(0)
    body, unused = pnn.Linear(3, 4, 4, dtype=F64), pnn.Linear(4, 2, 4, dtype=F64)
    x = torch.randn(4, 3, dtype=F64)
    opt = optimizer([*body.parameters(), *unused.parameters()], "fast" if fast else "dense", max_norm=0.5)
    for _ in range(3):
        h = body(x)
        unused(h)  # runs, but its output is not in the loss
        h.tanh().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    h = body(x)
    (h.tanh().sum() + unused.weight.sum()).backward()  # a use no psgfunc layer recorded
    with pytest.raises(ValueError, match="have no grad_sample while others do"):
        opt.step()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", ["linear", "conv", "layer_norm", "rms_norm", "generic"])
def test_a_gradient_penalty_is_refused_not_spread_over_the_rows(mode, layer):
    """Review h16: a loss with a gradient penalty (create_graph=True) on a converted model
    gave grad_sample rows 12% (nn.Linear) to 128% (nn.RMSNorm) off the float64 loop, with
    p.grad right, so the check on the total passed and DPOptimizer clipped wrong norms: the
    rules' backward reads the shared weight, and its second-order gradient reached the
    expanded param through row 0 or an as_strided view spread over the rows. It now reaches
    the parameter directly and the backward raises, naming the vmap route."""

    class Scale(nn.Module):  # no converter: a Generic shell (matmul and mul rules)
        def __init__(self):
            super().__init__()
            self.m, self.w = nn.Parameter(torch.randn(4, 4, dtype=F64)), nn.Parameter(torch.randn(4, dtype=F64))

        def forward(self, x):
            return torch.tanh(x @ self.m) * self.w

    torch.manual_seed(0)
    make = {"linear": (lambda: nn.Linear(4, 3), (4,)), "conv": (lambda: nn.Conv1d(2, 3, 3), (2, 6)),
            "layer_norm": (lambda: nn.LayerNorm(4), (3, 4)), "rms_norm": (lambda: nn.RMSNorm(4), (3, 4)),
            "generic": (Scale, (3, 4))}
    build, shape = make[layer]
    model = pnn.expand_weights(nn.Sequential(build().to(F64)), 8)
    opt = optimizer(model.parameters(), mode)
    x = torch.randn(3, *shape, dtype=F64, requires_grad=True)
    out = torch.sin(model(x)).sum()
    (gx,) = torch.autograd.grad(out, x, create_graph=True)
    with pytest.raises(ValueError, match=r"create_graph=True.*method='vmap'"):
        (out + gx.square().sum()).backward()
    if opt is not None:  # nothing reached the optimizer's rows or records
        assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
        if mode == "fast":
            assert all(not opt._logs[id(p)].pieces for p in model.parameters())


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("when", ["before_step", "between_micro_batches"])
def test_freezing_a_parameter_inside_a_logical_batch_is_refused(fast, when):
    """Review h16: the running clipped sum holds one tensor per trainable parameter in
    order; freezing the first of two Linear(4, 4) layers after accumulate() made step() give
    the second layer the first one's update (dense: moved by 0.285, the first layer's
    gradient norm, against its own 0.637). Now a ValueError; after step() it is fine."""
    torch.manual_seed(0)
    m = pnn.expand_weights(nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)).to(F64), 8)
    opt = optimizer(m.parameters(), "fast" if fast else "dense", max_norm=1e6, expected=1.0)
    x = torch.randn(1, 4, dtype=F64)
    m(x).square().sum().backward()
    opt.accumulate()
    m[0].weight.requires_grad_(False)
    w1 = m[1].weight.detach().clone()
    with pytest.raises(ValueError, match="requires_grad.*changed"):
        if when == "between_micro_batches":
            m(x).square().sum().backward()
            opt.accumulate()
        else:
            opt.step()
    assert torch.equal(m[1].weight.detach(), w1)
    m[0].weight.requires_grad_(True)  # as it was: the logical batch goes on
    opt.zero_grad()
    opt.step()
    m[0].weight.requires_grad_(False)  # after step(): a new logical batch, fine
    ref = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)).to(F64)
    ref.load_state_dict(m.state_dict())
    before = m[1].weight.detach().clone()
    m(x).square().sum().backward()
    opt.step()
    expected = per_example_grads(lambda p, xb: functional_call(ref, p, (xb[None],)).square().sum(),
                                 {"1.weight": before}, x)["1.weight"]
    torch.testing.assert_close(before - m[1].weight.detach(), expected[0], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("first", ["grad_params", "grad_some_params", "grad_input", "backward_inputs"])
def test_rows_follow_grad_not_autograd_grad(mode, first):
    """Rows add up as .grad does (README): autograd.grad returns gradients and adds into
    no .grad, so it delivers no rows. Review h16: autograd.grad(loss, params) and then
    loss.backward() on the same forward pass left grad_sample at twice each example's
    gradient (dense DPOptimizer clipped a norm of 10 for a true 5; with allow_unused the
    fast records doubled too). backward(inputs=...) gives rows to its inputs only."""
    torch.manual_seed(0)
    model = pnn.expand_weights(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64), 8)
    params = list(model.parameters())
    opt = optimizer(params, mode, max_norm=0.5)
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    loss = model(x).sin().sum()
    if first == "grad_params":
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=mode == "fast")
    elif first == "grad_some_params":
        torch.autograd.grad(loss, params[:2], retain_graph=True, allow_unused=mode == "fast")
    elif first == "grad_input":
        torch.autograd.grad(loss, x, retain_graph=True)
    else:  # backward(inputs=[last layer]): rows (and .grad) for those only
        loss.backward(inputs=params[2:], retain_graph=True)
        assert all(p.grad is None and getattr(p, "grad_sample", None) is None for p in params[:2])
        if mode == "plain":
            assert all(getattr(p, "grad_sample", None) is not None for p in params[2:])
        model.zero_grad(set_to_none=True)
        for p in params:
            p.grad_sample = None
        if opt is not None:
            opt.zero_grad()
    loss.backward()

    def fn(p, xb):
        return functional_call(model, p, (xb.unsqueeze(0),)).sin().sum()

    named = {k: v.detach() for k, v in model.named_parameters()}
    exact = per_example_grads(fn, named, x.detach())
    if opt is None:
        for p, g in zip(params, exact.values()):
            torch.testing.assert_close(p.grad_sample, g, rtol=1e-10, atol=1e-12)
        return
    expected, norms = clipped_step([p.detach() for p in params], list(exact.values()), 0.5, 4.0)
    got_norms = opt.accumulate()
    torch.testing.assert_close(got_norms, norms, rtol=1e-6, atol=0)
    opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-9)
