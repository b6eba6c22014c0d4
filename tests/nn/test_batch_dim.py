"""Which dim is the batch: time-major recurrent outputs, shared embedding indices (psgfunc.nn._forward).

A model converted by ``expand_weights`` records each forward pass: a batch-first shell fed a
time-major tensor raises (also when ``T == B``, where the sizes alone would silently mix the
examples' gradient rows), ``[1, T]`` position ids are looked up for every example, so
each example's table gradient is its own, and a constant of the forward (1-D position ids, a
``[T, T]`` mask or table made by torch's factories) is never read as the batch (rule C).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import psgfunc.dp as dp
import psgfunc.nn as pnn
from psgfunc.nn import _forward
from tests.oracles import assert_tree_close, per_example_grads

F64 = torch.float64
TIME_MAJOR = "batch_first=True"


def grad_samples(model):
    return {n: p.grad_sample for n, p in model.named_parameters()}


# ------------------------------------------------------------------ item 5: time-major outputs


class Recurrent(nn.Module):
    """``rnn`` then a head; ``between`` says what happens to the recurrent output."""

    def __init__(self, rnn, width, between):
        super().__init__()
        self.rnn, self.between = rnn, between
        self.fc = nn.Linear(width, 2)

    def forward(self, x):
        out = self.rnn(x)[0]
        if self.between == "dropout-relu":
            out = torch.relu(F.dropout(out, 0.5, training=self.training))
        elif self.between == "transpose":
            out = out.transpose(0, 1)
        elif self.between == "transpose-tanh":
            out = torch.tanh(out.transpose(0, 1))
        elif self.between == "transpose-contiguous":
            out = out.transpose(0, 1).contiguous()
        elif self.between == "last":
            out = out[-1]
        return self.fc(out)


def rnn_for(kind):
    """A time-major recurrent layer and its output width."""
    if kind == "nn.LSTM":  # converted by expand_weights
        return nn.LSTM(3, 4), 4
    if kind == "DPLSTM":
        return pnn.DPLSTM(3, 4, num_layers=2, dropout=0.3), 4
    if kind == "DPLSTMLayer":
        return pnn.DPLSTMLayer(3, 4), 4
    return pnn.BidirectionalDPLSTMLayer(3, 4), 8


KINDS = ["nn.LSTM", "DPLSTM", "DPLSTMLayer", "BidirectionalDPLSTMLayer"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("between", ["none", "dropout-relu"])
@pytest.mark.parametrize("steps", [5, 3])
def test_time_major_output_into_a_batch_first_layer_raises(kind, between, steps):
    torch.manual_seed(0)
    rnn, width = rnn_for(kind)
    model = pnn.expand_weights(Recurrent(rnn, width, between), 8).double()
    x = torch.randn(steps, 5, 3, dtype=F64)  # [T, B, D] with B = 5: T == B, then T != B
    with pytest.raises(ValueError, match=TIME_MAJOR) as info:
        model(x)
    message = str(info.value)
    assert "'fc'" in message and "'rnn'" in message and "transpose(0, 1)" in message
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    assert _forward.current() is None  # the record is closed after a forward that raised


@pytest.mark.parametrize("steps", [5, 3])
def test_transposed_contiguous_copy_is_followed_and_refused_only_without_gradients(steps):
    """The forward follows the transpose through .contiguous(): exact; a forward the mode
    does not follow (no gradients) falls back on sizes and layout, and refuses at T == B."""
    torch.manual_seed(3)
    ref = Recurrent(nn.LSTM(3, 4), 4, "transpose-contiguous").double()
    model = pnn.expand_weights(copy.deepcopy(ref), 8)
    x = torch.randn(5, steps, 3, dtype=F64)  # [B, T, D]
    model(x.transpose(0, 1)).pow(2).sum().backward()
    assert_tree_close(grad_samples(model), oracle(ref, x, batch_first=False), rtol=1e-10)
    with torch.no_grad():
        if steps == 5:
            with pytest.raises(ValueError, match="cannot tell whether the input was transposed"):
                model(x.transpose(0, 1))
        else:
            model(x.transpose(0, 1))


def oracle(ref, x, batch_first):
    """Per-example gradients of ``ref(x_b).sum()`` by the float64 loop; ``x`` ``[B, T, D]``."""

    def fn(params, xb):
        xb = xb.unsqueeze(0 if batch_first else 1)
        return functional_call(ref, params, (xb,)).pow(2).sum()

    return per_example_grads(fn, {n: p.detach() for n, p in ref.named_parameters()}, x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("between", ["transpose", "transpose-tanh", "last"])
def test_transposed_time_major_output_gives_exact_grads_when_t_equals_b(kind, between):
    torch.manual_seed(1)
    rnn, width = rnn_for(kind)
    ref = Recurrent(rnn, width, between).double().eval()  # eval: DPLSTM's dropout off
    model = pnn.expand_weights(copy.deepcopy(ref), 8)
    x = torch.randn(4, 4, 3, dtype=F64)  # [B, T, D], T == B
    model(x.transpose(0, 1)).pow(2).sum().backward()
    assert_tree_close(grad_samples(model), oracle(ref, x, batch_first=False), rtol=1e-10)


def test_batch_first_lstm_and_a_chain_after_the_transpose_are_not_refused():
    torch.manual_seed(2)

    class Chain(nn.Module):
        def __init__(self, batch_first):
            super().__init__()
            self.batch_first = batch_first
            self.lstm = nn.LSTM(3, 4, batch_first=batch_first)
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)  # same width as the LSTM

        def forward(self, x):
            out = self.lstm(x)[0]
            out = out if self.batch_first else out.transpose(0, 1)
            return self.b(torch.relu(self.a(out)))

    x = torch.randn(4, 4, 3, dtype=F64)  # [B, T, D], T == B
    for batch_first in (True, False):
        ref = Chain(batch_first).double()
        model = pnn.expand_weights(copy.deepcopy(ref), 8)
        model(x if batch_first else x.transpose(0, 1)).pow(2).sum().backward()
        assert_tree_close(grad_samples(model), oracle(ref, x, batch_first), rtol=1e-10)


class WordLM(nn.Module):
    """Embedding -> LSTM -> decoder, time-major (torch's word_language_model layout)."""

    def __init__(self, fixed):
        super().__init__()
        self.fixed = fixed
        self.emb, self.lstm, self.dec = nn.Embedding(11, 3), nn.LSTM(3, 4), nn.Linear(4, 11)

    def forward(self, ids):
        if self.fixed:  # ids [B, T]: embed batch-first, run time-major, decode batch-first
            out = self.lstm(F.dropout(self.emb(ids), 0.0).transpose(0, 1))[0]
            return self.dec(out.transpose(0, 1))
        return self.dec(self.lstm(self.emb(ids))[0])  # ids [T, B]


@pytest.mark.parametrize("steps", [5, 3])
def test_time_major_ids_into_an_embedding_are_refused_at_the_lstm(steps):
    model = pnn.expand_weights(WordLM(fixed=False), 8)
    ids = torch.randint(0, 11, (steps, 5))  # [T, B]
    with pytest.raises(ValueError, match=TIME_MAJOR) as info:
        model(ids)
    assert "'emb'" in str(info.value) and "'lstm'" in str(info.value)


def test_batch_first_ids_transposed_into_a_time_major_lstm_give_exact_grads():
    torch.manual_seed(3)
    ref = WordLM(fixed=True).double()
    model = pnn.expand_weights(copy.deepcopy(ref), 8)
    ids = torch.randint(0, 11, (5, 5))  # [B, T], T == B
    model(ids).pow(2).sum().backward()

    def fn(params, ids_b):
        return functional_call(ref, params, (ids_b[None],)).pow(2).sum()

    expected = per_example_grads(fn, {n: p.detach() for n, p in ref.named_parameters()}, ids)
    assert_tree_close(grad_samples(model), expected, rtol=1e-10)


def test_a_layer_reading_another_batch_size_raises():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Parameter(torch.randn(1, 3), requires_grad=False)
            self.proj, self.fc = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):  # a learned query shared by the batch, projected once
            return self.fc(x) + self.proj(self.query).sum()

    model = pnn.expand_weights(Shared(), 8)
    with pytest.raises(ValueError, match=r"reads a batch of 1 examples.*x.expand\(B") as info:
        model(torch.randn(4, 3))
    assert "'proj'" in str(info.value) and "'fc'" in str(info.value)
    model(torch.randn(1, 3)).sum().backward()  # a batch of one is one example everywhere


def test_record_scope_nesting_and_hooks_installed_once():
    inner = pnn.expand_weights(nn.Sequential(nn.Linear(3, 3)), 8)
    outer = pnn.expand_weights(nn.Sequential(inner, nn.Linear(3, 2)), 8)
    outer = pnn.expand_weights(outer, 8)
    assert list(outer._forward_pre_hooks.values()).count(_forward._open) == 1
    seen = []
    outer[1].register_forward_pre_hook(lambda m, a: seen.append(_forward.current()))
    outer(torch.randn(4, 3))
    assert seen[0] is not None and seen[0].batch == 4 and _forward.current() is None
    with pytest.raises(ValueError, match="reads a batch of 2"):
        outer[1].register_forward_pre_hook(lambda m, a: (a[0][:2],))
        outer(torch.randn(4, 3))
    assert _forward.current() is None


@pytest.mark.parametrize("kind", ["DPLSTM", "DPLSTMLayer", "BidirectionalDPLSTMLayer"])
@pytest.mark.parametrize("steps", [5, 3])
def test_shells_outside_a_converted_model_refuse_a_time_major_output_as_is(kind, steps):
    rnn, width = rnn_for(kind)
    fc = pnn.Linear(width, 2, max_batch_size=8)
    out = rnn(torch.randn(steps, 5, 3))[0]
    for x in (out, out[:, :, :2].unsqueeze(-1)[..., 0], out[1:]):  # itself, views
        fc = pnn.Linear(x.shape[-1], 2, max_batch_size=8)
        if x.shape[:2] == out.shape[:2]:
            with pytest.raises(ValueError, match=TIME_MAJOR):
                fc(x)
    fc = pnn.Linear(width, 2, max_batch_size=8)
    fc(out.transpose(0, 1)).sum().backward()  # transposed: fine
    assert fc.weight.grad_sample.shape[0] == 5
    fc(torch.relu(out.transpose(0, 1).contiguous()))  # a new tensor: not seen without a record
    del out
    fc(torch.randn(steps, 5, width))  # unrelated batch-first data after the output is gone


# --------------------------------------------------------- item 10a: shared position ids


class Positions(nn.Module):
    """Token + position embeddings (position ids shared by the batch) and a linear head."""

    def __init__(self, pos_first=True, flat_positions=False):
        super().__init__()
        self.pos_first, self.flat = pos_first, flat_positions
        self.tok, self.pos, self.head = nn.Embedding(7, 3), nn.Embedding(6, 3), nn.Linear(3, 2)

    def forward(self, ids):
        positions = torch.arange(ids.shape[-1])
        positions = positions if self.flat else positions[None]
        if self.pos_first:
            h = self.pos(positions) + self.tok(ids)
        else:
            h = self.tok(ids) + self.pos(positions)
        return self.head(torch.tanh(h))


def position_oracle(ref, ids, y):
    def fn(params, ids_b, y_b):
        logits = functional_call(ref, params, (ids_b[None],))[0]
        return F.cross_entropy(logits, y_b, reduction="sum")

    return per_example_grads(fn, {n: p.detach() for n, p in ref.named_parameters()}, ids, y)


@pytest.mark.parametrize("pos_first", [True, False])
@pytest.mark.parametrize("size,steps", [(5, 4), (1, 4), (4, 4), (6, 1)])
def test_shared_position_ids_give_exact_per_example_grads(pos_first, size, steps):
    torch.manual_seed(4)
    ref = Positions(pos_first).double()
    model = pnn.expand_weights(copy.deepcopy(ref), 8)
    ids, y = torch.randint(0, 7, (size, steps)), torch.randint(0, 2, (size, steps))
    out = model(ids)
    torch.testing.assert_close(out, ref(ids), rtol=0, atol=0)
    F.cross_entropy(out.transpose(1, 2), y, reduction="sum").backward()
    expected = position_oracle(ref, ids, y)
    assert_tree_close(grad_samples(model), expected, rtol=1e-10)
    for name, p in model.named_parameters():  # .grad is still the ordinary gradient
        torch.testing.assert_close(p.grad, expected[name].sum(0), rtol=1e-10, atol=1e-12)


def test_shared_position_ids_on_an_empty_batch():
    model = pnn.expand_weights(Positions().double(), 8)
    out = model(torch.zeros(0, 4, dtype=torch.long))
    assert out.shape == (0, 4, 2)
    out.sum().backward()
    assert model.pos.weight.grad_sample.shape == (0, 6, 3)


@pytest.mark.parametrize("fast", [False, True])
def test_shared_position_ids_under_dp_optimizer(fast):
    torch.manual_seed(5)
    ref = Positions().double()
    model = pnn.expand_weights(copy.deepcopy(ref), 8)
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), max_norm=0.3,
                         noise_multiplier=0.0, expected_batch_size=5, fast_clipping=fast)
    ids, y = torch.randint(0, 7, (5, 4)), torch.randint(0, 2, (5, 4))
    F.cross_entropy(model(ids).transpose(1, 2), y, reduction="sum").backward()
    norms = opt.accumulate()
    expected = position_oracle(ref, ids, y)
    exp_norms = torch.cat([g.flatten(1) for g in expected.values()], 1).norm(dim=1)
    torch.testing.assert_close(norms, exp_norms, rtol=1e-10, atol=0)
    scale = (0.3 / exp_norms).clamp(max=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        clipped = (expected[name] * scale.view(-1, *[1] * (expected[name].dim() - 1))).sum(0)
        torch.testing.assert_close(before[name] - p.detach(), clipped / 5, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("batch", [5, 4, 1])
def test_flat_position_ids_are_refused_as_shared(batch):
    """1-D position ids arange(T) (nanoGPT) are a constant of the forward: their dim 0 is not
    the batch, also when T == B (where shapes alone would pass and each example would get
    the position rows of all examples)."""
    model = pnn.expand_weights(Positions(pos_first=False, flat_positions=True), 8)
    ids = torch.randint(0, 7, (batch, 4))
    with pytest.raises(ValueError, match=r"Embedding 'pos' reads dim 0 of its input \(4,\) .* constant of the forward"):
        model(ids)


def test_shared_ids_outside_a_converted_model_are_one_example():
    pos = pnn.Embedding(6, 3, max_batch_size=8)
    out = pos(torch.arange(4)[None])
    assert out.shape == (1, 4, 3)
    out.sum().backward()
    assert pos.weight.grad_sample.shape == (1, 6, 3)


def test_a_record_left_open_by_an_interrupted_forward_ends_at_the_next_call():
    model = pnn.expand_weights(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), 8)

    def interrupt(module, args):
        raise KeyboardInterrupt  # torch runs no forward hook after it

    handle = model[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(torch.randn(4, 3))
    handle.remove()
    assert _forward.current() is not None and _forward.current().batch == 4
    model(torch.randn(2, 3)).sum().backward()  # a new record: batch 2, no stale mismatch
    assert model[0].weight.grad_sample.shape[0] == 2 and _forward.current() is None


# ------------------------------------------- rule C: constants of the forward are not the batch


class MaskedMix(nn.Module):
    """A module with a parameter and no converter (a generic shell) that also takes a [T, T]
    mask shared by every example."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) * 0.3)

    def forward(self, x, mask):  # x [B, T, D], mask [T, T]
        h = x @ self.w
        return torch.softmax(h @ h.transpose(-1, -2) + mask, -1) @ h


class Masked(nn.Module):
    def __init__(self, d=3):
        super().__init__()
        self.mix, self.head = MaskedMix(d), nn.Linear(d, 2)

    def forward(self, x):
        steps = x.shape[1]
        mask = torch.triu(torch.full((steps, steps), -1e9, dtype=x.dtype), 1)  # no data of x
        return self.head(self.mix(x, mask).mean(1))


def loop_oracle(ref, inputs, y):
    def fn(params, x_b, y_b):
        return F.cross_entropy(functional_call(ref, params, (x_b[None],)), y_b[None], reduction="sum")

    return per_example_grads(fn, {n: p.detach() for n, p in ref.named_parameters()}, inputs, y)


@pytest.mark.parametrize("size,steps", [(3, 5), (4, 4)])
def test_a_generic_shell_gives_a_shared_mask_to_every_example(size, steps):
    """With T == B the mask's dim 0 has the batch's size; it is a constant (torch.full), so
    every example gets all of it (before: example b got row b, and the output changed)."""
    torch.manual_seed(0)
    ref = Masked().double()
    model = pnn.expand_weights(copy.deepcopy(ref), 8)
    x, y = torch.randn(size, steps, 3, dtype=F64), torch.randint(0, 2, (size,))
    out = model(x)
    torch.testing.assert_close(out, ref(x), rtol=1e-12, atol=1e-12)
    F.cross_entropy(out, y, reduction="sum").backward()
    assert_tree_close(grad_samples(model), loop_oracle(ref, x, y), rtol=1e-10)


class TableBias(nn.Module):
    """A [T, T] relative-position table looked up by an Embedding (T5's relative bias)."""

    def __init__(self):
        super().__init__()
        self.tok, self.rel, self.head = nn.Embedding(7, 3), nn.Embedding(9, 1), nn.Linear(3, 2)

    def forward(self, ids):
        steps = ids.shape[1]
        pos = torch.arange(steps)
        bias = self.rel(pos[None, :] - pos[:, None] + 4)[..., 0]  # [T, T], no data of ids
        h = self.tok(ids)
        return self.head(torch.softmax(h @ h.transpose(1, 2) + bias, -1) @ h)


@pytest.mark.parametrize("fast", [None, False, True])
def test_a_shared_table_lookup_is_refused_also_when_t_equals_b(fast):
    model = pnn.expand_weights(TableBias().double(), 8)
    for size, steps in ((3, 5), (4, 4)):
        ids = torch.randint(0, 7, (size, steps))
        with pytest.raises(ValueError, match=r"Embedding 'rel' reads dim 0 of its input \(%d, %d\)" % (steps, steps)):
            if fast is None:
                model(ids)
            else:
                opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), max_norm=1.0,
                                     noise_multiplier=0.0, expected_batch_size=size, fast_clipping=fast)
                model(ids).sum().backward()
                opt.step()


class MadeFromSizes(nn.Module):
    """Shell inputs that are constants with all rows equal (built for the batch from sizes:
    taken as batched) or constants overwritten in place with the input (no longer constant)."""

    def __init__(self):
        super().__init__()
        self.tok, self.typ, self.state = nn.Embedding(7, 3), nn.Embedding(2, 3), nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, ids):
        types = torch.zeros(ids.shape, dtype=torch.long)  # HF's default token_type_ids
        table = torch.arange(ids.numel()).view(ids.shape) % 7  # distinct rows, then overwritten
        table.copy_(ids)
        h0 = ids.new_zeros(ids.shape[0], 3).to(torch.float64)
        h = self.tok(table) + self.typ(types) + self.state(h0)[:, None]
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("size,steps", [(4, 4), (3, 5)])
def test_inputs_made_for_the_batch_or_from_the_input_are_batched(size, steps):
    torch.manual_seed(1)
    ref = MadeFromSizes().double()
    model = pnn.expand_weights(copy.deepcopy(ref), 8)
    ids, y = torch.randint(0, 7, (size, steps)), torch.randint(0, 2, (size, steps))
    F.cross_entropy(model(ids).transpose(1, 2), y, reduction="sum").backward()
    assert_tree_close(grad_samples(model), position_oracle(ref, ids, y), rtol=1e-10)


class ConstantThroughTiedHead(nn.Module):
    """A plain op outside shells (``F.linear`` on an embedding's weight) whose only tensor
    input with the batch's size is a constant [T, D] table."""

    def __init__(self):
        super().__init__()
        self.tok, self.head = nn.Embedding(5, 3), nn.Linear(3, 5)

    def forward(self, ids):
        table = torch.linspace(-1, 1, 12, dtype=torch.float64).view(4, 3)
        return self.head(torch.tanh(self.tok(ids))) + F.linear(table, self.tok.weight)


def test_a_plain_op_on_a_parameter_does_not_take_a_constant_for_the_batch():
    model = pnn.expand_weights(ConstantThroughTiedHead().double(), 8)
    out = model(torch.randint(0, 5, (4, 4)))  # T == B == 4: the table has the batch's size
    with pytest.raises(ValueError, match="used outside any psgfunc layer"):
        out.sum().backward()


class Positions1D(nn.Module):
    """nanoGPT's position ids, made in one of several ways; ``hook``: added by a forward
    pre-hook registered before the conversion."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.tok, self.pos, self.head = nn.Embedding(7, 3), nn.Embedding(6, 3), nn.Linear(3, 2)
        if how == "hook":
            self.register_forward_pre_hook(lambda m, args: (args[0], torch.arange(args[0].shape[1])))

    def forward(self, ids, pos=None):
        steps = ids.shape[1]
        if self.how == "type_as":
            pos = torch.arange(steps).type_as(ids)
        elif self.how == "to":
            pos = torch.arange(steps).to(ids)
        elif self.how == "new_ones":
            pos = ids.new_ones(steps).cumsum(0) - 1
        elif self.how == "in-place":  # (T5's buckets are added in place: relative_buckets +=)
            pos = torch.arange(steps)
            pos += 1
            pos.clamp_(max=5)
        elif self.how == "empty-copy":
            pos = torch.empty(steps, dtype=torch.long).copy_(torch.arange(steps))
        return self.head(torch.tanh(self.tok(ids) + self.pos(pos)))


@pytest.mark.parametrize("how", ["type_as", "to", "new_ones", "hook", "in-place", "empty-copy"])
def test_constants_through_metadata_ops_and_pre_hooks_are_refused(how):
    """Ops that take only a dtype, device or shape from the input (type_as, to, new_*) keep a
    constant constant; a pre-hook registered before the conversion runs inside the followed
    forward."""
    model = pnn.expand_weights(Positions1D(how), 8)
    with pytest.raises(ValueError, match="constant of the forward"):
        model(torch.randint(0, 7, (4, 4)))


class Unfollowed(nn.Module):
    """Per-example tensors made where the forward cannot follow them, or from the inputs in
    a container: read as batched, as before."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.tok, self.len, self.head = nn.Embedding(7, 3), nn.Embedding(8, 3), nn.Linear(3, 2)

    def forward(self, batch):
        ids = batch["ids"] if self.how == "mapping" else batch
        if self.how == "tolist":
            lengths = torch.tensor([sum(v > 2 for v in row) for row in ids.tolist()])
        elif self.how == "vmap":
            lengths = torch.vmap(lambda row: (row > 2).sum())(ids)
        else:
            lengths = (ids > 2).sum(1)
        return self.head(torch.tanh(self.tok(ids) + self.len(lengths)[:, None]))


class Box(dict):  # an input container optree does not flatten
    pass


@pytest.mark.parametrize("how", ["tolist", "vmap", "mapping"])
def test_what_the_forward_cannot_follow_is_read_as_before(how):
    torch.manual_seed(2)
    ref = Unfollowed(how).double()
    model = pnn.expand_weights(copy.deepcopy(ref), 8)
    ids, y = torch.randint(0, 7, (4, 4)), torch.randint(0, 2, (4, 4))
    batch = Box(ids=ids) if how == "mapping" else ids
    F.cross_entropy(model(batch).transpose(1, 2), y, reduction="sum").backward()

    def fn(params, ids_b, y_b):
        one = Box(ids=ids_b[None]) if how == "mapping" else ids_b[None]
        return F.cross_entropy(functional_call(ref, params, (one,)).transpose(1, 2), y_b[None], reduction="sum")

    expected = per_example_grads(fn, {n: p.detach() for n, p in ref.named_parameters()}, ids, y)
    assert_tree_close(grad_samples(model), expected, rtol=1e-10)


def test_random_per_example_tensors_are_batched():
    """Diffusion timesteps drawn in the forward, one per example: random draws may hold the
    examples (not constants), so an Embedding reads them as the batch."""

    class Timesteps(nn.Module):
        def __init__(self):
            super().__init__()
            self.temb, self.head = nn.Embedding(10, 3), nn.Linear(3, 2)

        def forward(self, x):
            t = torch.randint(0, 10, (x.shape[0],))
            return self.head(x + self.temb(t))

    model = pnn.expand_weights(Timesteps().double(), 8)
    for size in (3, 4):
        model(torch.randn(size, 3, dtype=F64)).sum().backward()
        assert model.temb.weight.grad_sample.shape == (size, 10, 3)
        pnn.zero_grad(model)


def test_attention_refuses_a_constant_memory_as_key_and_value():
    """Key and value are checked too: a constant [B, S, E] memory of distinct rows could be
    one memory per example (example b attends to mem[b]) or a table that merely has B rows;
    shapes cannot tell, so it is refused (the message says how to build a per-example one)."""

    class Memory(nn.Module):
        def __init__(self):
            super().__init__()
            self.att, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            mem = torch.linspace(-1, 1, x.shape[0] * 12).view(x.shape[0], 3, 4)
            return self.head(self.att(x, mem, mem)[0].mean(1))

    model = pnn.expand_weights(Memory(), 8)
    with pytest.raises(ValueError, match=r"DPMultiheadAttention 'att' reads dim 0 of its input \(4, 3, 4\)"):
        model(torch.randn(4, 5, 4))


class WrittenConstants(nn.Module):
    """Constants that the examples' data reach through a view, a Python index or a random
    draw (Beta, as in mixup): not constants any more, read as batched."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.tok, self.len, self.head = nn.Embedding(7, 3), nn.Embedding(8, 3), nn.Linear(3, 2)
        self.register_buffer("alpha", torch.tensor(0.4))

    def forward(self, ids):
        size = ids.shape[0]
        table = torch.arange(size * 2).view(size, 2) % 8  # a constant of distinct rows ...
        if self.how == "view":
            table[:, :1].copy_(ids[:, :1])  # ... written through a view
        elif self.how == "python-index":
            for i, n in enumerate((ids > 2).sum(1).tolist()):  # ... through Python numbers
                table[i, 0] = n
        else:  # ... or a per-example random draw
            lam = torch.distributions.Beta(self.alpha, self.alpha).sample((size,))
            table = table + (lam[:, None] > 2).long()
        return self.head(torch.tanh(self.tok(ids) + self.len(table).sum(1)[:, None]))


@pytest.mark.filterwarnings("ignore:expand_weights. custom module")  # (the alpha buffer)
@pytest.mark.parametrize("how", ["view", "python-index", "beta"])
def test_constants_written_with_data_are_batched(how):
    model = pnn.expand_weights(WrittenConstants(how).double(), 8)
    for size in (4, 3):  # (4: T == B)
        model(torch.randint(0, 7, (size, 4))).sum().backward()
        assert model.len.weight.grad_sample.shape == (size, 8, 3)
        pnn.zero_grad(model)


class EqualSlots(nn.Module):
    """M equal constant slots read by a layer before the examples are: M != B is refused
    (once a layer reads the examples' batch), naming the layer that read the slots;
    ``contract``: the slots summed over in a product with the examples, which leaves no
    batch dim to trust (refused at the layer reading the product)."""

    def __init__(self, contract):
        super().__init__()
        self.contract = contract
        self.q, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        slots = self.q(torch.ones(5, 3, dtype=x.dtype))  # [M, 3], M = 5
        if self.contract:
            return self.head(x @ slots.T @ slots)
        return self.head(x) * slots.mean()


def test_equal_constant_slots_are_checked_once_the_batch_is_known():
    model = pnn.expand_weights(EqualSlots(contract=False).double(), 8)
    with pytest.raises(ValueError, match=r"Linear 'q' read a batch of 5 examples .* constant of the forward .* batch has 4"):
        model(torch.randn(4, 3, dtype=F64))
    model = pnn.expand_weights(EqualSlots(contract=True).double(), 8)
    with pytest.raises(ValueError, match=r"Linear 'head' reads dim 0 .* output of Linear 'q' .* no batch dim"):
        model(torch.randn(4, 3, dtype=F64))


def test_a_pre_hook_that_reshapes_the_input_gives_the_batch_hint():
    """The forward's batch before any layer reads it comes from the arguments the pre-hooks
    registered before the conversion leave (here: a [T, B] input made batch-first), so a
    [1, T] position lookup is expanded to B, not T."""
    module = Positions()
    module.register_forward_pre_hook(lambda m, args: (args[0].T,))
    ref = copy.deepcopy(module)
    model = pnn.expand_weights(module, 8)
    ids = torch.randint(0, 7, (5, 3))  # [T, B]: T = 5, B = 3
    out = model(ids)
    assert out.shape == (3, 5, 2)
    torch.testing.assert_close(out, ref(ids))
    out.sum().backward()
    assert model.pos.weight.grad_sample.shape[0] == 3


@pytest.mark.filterwarnings("ignore:expand_weights. custom module")
def test_an_inference_tensor_buffer_is_followed_without_a_version():
    """A buffer made under torch.inference_mode has no version counter: the forward still
    follows it (before: the first forward raised torch's RuntimeError)."""

    class WithInferenceBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            with torch.inference_mode():
                table = torch.arange(4)
            self.register_buffer("pos", table)

        def forward(self, x):
            return self.lin(x) + self.pos[:2].float()

    model = pnn.expand_weights(WithInferenceBuffer(), 8)
    model(torch.randn(4, 3)).sum().backward()
    assert model.lin.weight.grad_sample.shape == (4, 2, 3)


# ------------------------------------------------- rule B, followed: where a shell output's batch goes


class Moved(nn.Module):
    """A batch-first Linear's output ``[B, T, 4]`` moved by ``how`` before the next Linear
    (HF Longformer: ``hidden.transpose(0, 1)`` into its query projection)."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.q, self.o = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        how = self.how
        if how == "transpose":
            h = h.transpose(0, 1)
        elif how == "transpose-contiguous-relu":
            h = torch.relu(h.transpose(0, 1).contiguous())
        elif how == "permute":
            h = h.permute(1, 0, 2)
        elif how == "movedim":
            h = torch.movedim(h, 1, 0)
        elif how == "einsum":
            h = torch.einsum("btd->tbd", h)
        elif how == "einsum-ellipsis":
            h = torch.einsum("bt...->tb...", h)
        elif how == "swap-add":
            h = x.new_zeros(()) + h.swapaxes(0, 1)
        elif how == "there-and-back":
            h = h.transpose(0, 1).contiguous().permute(1, 0, 2) * 2.0
        elif how == "einsum-back":
            h = torch.einsum("tbd->btd", h.transpose(0, 1).contiguous())
        elif how == "mixed":
            h = h + h.transpose(0, 1)
        elif how == "stack-slices":  # [T, B, 4] from the time slices
            h = torch.stack([h[:, t] for t in range(h.shape[1])])
        elif how == "unbind-stack":
            h = torch.stack(h.unbind(1), dim=0)
        elif how == "index-unsqueeze-cat":
            h = torch.cat([h[None, :, t].squeeze(0).unsqueeze(0) for t in range(h.shape[1])])
        elif how == "stack-slices-back":
            h = torch.stack([h[:, t] for t in range(h.shape[1])], dim=1)
        elif how == "setitem":  # a time-major buffer filled with the batch-first time slices
            buf = torch.zeros(h.shape[1], h.shape[0], h.shape[2], dtype=h.dtype)
            for t in range(h.shape[1]):
                buf[t] = h[:, t]
            h = buf
        elif how == "copy":
            h = torch.empty(h.shape[1], h.shape[0], h.shape[2], dtype=h.dtype).copy_(h.transpose(0, 1))
        elif how == "setitem-back":
            buf = torch.zeros_like(h)
            for t in range(h.shape[1]):
                buf[:, t] = h[:, t]
            h = buf
        elif how == "view4d":  # a heads idiom that transposes the batch on the way
            h = h.view(h.shape[0], h.shape[1], 2, 2).permute(1, 0, 2, 3).reshape(h.shape[1], h.shape[0], 4)
        elif how == "heads-back":
            b, t = h.shape[:2]
            h = h.view(b, t, 2, 2).transpose(1, 2).contiguous().transpose(1, 2).reshape(b, t, 4)
        elif how == "rot90":
            h = torch.rot90(h, 1, (0, 1))
        elif how == "as_strided":
            h = h.contiguous().as_strided(h.shape, (h.shape[2], h.shape[0] * h.shape[2], 1))
        elif how == "gather":
            h = torch.gather(h, 0, torch.arange(h.shape[0]).flip(0)[:, None, None].expand_as(h))
        elif how == "merge-split":  # the time-major view merged and split again
            t_, b_ = h.shape[1], h.shape[0]
            h = h.transpose(0, 1).reshape(t_ * b_, 4).reshape(t_, b_, 4)
        elif how == "cat-view":
            h = torch.cat([h[:, t] for t in range(h.shape[1])], 0).view(h.shape[1], h.shape[0], 4)
        elif how == "merge-split-back":
            b_, t_ = h.shape[:2]
            h = torch.relu(h.reshape(b_ * t_, 4)).view(b_, t_, 4)
        elif how == "cat-view-back":
            h = torch.cat([h[:, t] for t in range(h.shape[1])], 0).view(h.shape[1], h.shape[0], 4).transpose(0, 1)
        elif how == "transpose-kw":
            h = torch.transpose(input=h, dim0=0, dim1=1)
        elif how == "permute-kw":
            h = torch.permute(input=h, dims=(1, 0, 2))
        elif how == "einsum-implicit":  # the output is the letters in order: 'tbd' -> 'bdt'
            h = torch.einsum("tbd", h).permute(0, 2, 1)  # [T, B, 4]... read batch-first
        elif how == "flatten-merge":
            t_, b_ = h.shape[1], h.shape[0]
            h = h.transpose(0, 1).flatten(0, 1).view(t_, b_, 4)
        elif how == "stack-ints":  # the examples one by one, in order: a batch again
            h = torch.stack([h[i] for i in range(h.shape[0])])
        elif how == "iterate":
            h = torch.stack([r * 1.0 for r in h])
        elif how == "numpy-index":
            import numpy as np
            h = h[np.arange(h.shape[0])][:, range(h.shape[1])]
        elif how == "unbind-stack-back":
            h = torch.stack(h.transpose(0, 1).unbind(0), dim=1)[..., None].flatten(2)
        return self.o(self.q(h))


@pytest.mark.parametrize("how", ["transpose", "transpose-contiguous-relu", "permute", "movedim", "einsum",
                                 "swap-add", "mixed", "stack-slices", "unbind-stack", "index-unsqueeze-cat",
                                 "setitem", "copy", "view4d", "rot90", "as_strided", "gather", "einsum-ellipsis",
                                 "merge-split", "cat-view", "transpose-kw", "permute-kw", "einsum-implicit",
                                 "flatten-merge"])
def test_a_batch_first_output_moved_off_dim_0_is_refused_also_when_t_equals_b(how):
    """Before, at T == B the sizes and layout checks saw only time-major outputs: the Linear
    took the time steps for examples (0.88 off the loop for HF Longformer's pattern)."""
    model = pnn.expand_weights(Moved(how).double(), 8)
    with pytest.raises(ValueError, match=r"Linear 'q' reads dim 0 .* derives from the output of Linear 'a'"):
        model(torch.randn(4, 4, 3, dtype=F64))
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


@pytest.mark.parametrize("how", ["there-and-back", "einsum-back", "none", "stack-slices-back", "unbind-stack-back",
                                 "setitem-back", "heads-back", "merge-split-back", "cat-view-back",
                                 "stack-ints", "iterate", "numpy-index"])
def test_a_batch_first_output_moved_back_gives_exact_grads(how):
    torch.manual_seed(4)
    assert_exact_at_t_equals_b(Moved(how).double())


def assert_exact_at_t_equals_b(ref):
    """``ref`` converted gives the float64 loop's per-example gradients on ``[4, 4, 3]``."""
    model = pnn.expand_weights(copy.deepcopy(ref), 8)
    x = torch.randn(4, 4, 3, dtype=F64)
    model(x).pow(2).sum().backward()
    assert_tree_close(grad_samples(model), oracle(ref, x, batch_first=True), rtol=1e-10)


@pytest.mark.parametrize("order", ["out+x", "x+out"])
def test_a_time_major_attention_output_into_a_batch_first_layer_is_refused_in_any_add_order(order):
    """Before, the layout check read ``attention_out + x`` (which takes the attention
    output's layout) as a transposed tensor and let a batch-first Linear take L for B."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.att, self.fc = nn.MultiheadAttention(4, 2), nn.Linear(4, 2)

        def forward(self, x):  # [L, B, E]
            a = self.att(x, x, x, need_weights=False)[0]
            return self.fc(a + x if order == "out+x" else x + a)

    model = pnn.expand_weights(Block().double(), 8)
    with pytest.raises(ValueError, match=r"Linear 'fc' reads dim 0 .*MultiheadAttention 'att'.* at dim 1"):
        model(torch.randn(3, 3, 4, dtype=F64))


# ------------------------------------------------------------------ frozen layers; generic shells


class FrozenPositions(nn.Module):
    """HF Whisper's encoder: a frozen position table looked up with ``arange(T)`` (1-D, a
    constant of the forward) and added to every example."""

    def __init__(self, frozen_q=False):
        super().__init__()
        self.emb, self.pos, self.q = nn.Embedding(7, 3), nn.Embedding(6, 3), nn.Linear(3, 2)
        self.pos.weight.requires_grad_(False)
        self.q.requires_grad_(not frozen_q)
        self.frozen_q = frozen_q

    def forward(self, ids):
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.q(h.transpose(0, 1) if self.frozen_q else h)


@pytest.mark.parametrize("size", [4, 3])
def test_a_frozen_layer_is_not_checked_and_needs_no_max_batch_size(size):
    """Before, the frozen table was refused as reading a constant at T == B and its T = 5
    positions exceeded max_batch_size=3: a layer with nothing to train reads no batch."""
    torch.manual_seed(5)
    ref = FrozenPositions().double()
    model = pnn.expand_weights(copy.deepcopy(ref), 4)
    ids = torch.randint(0, 7, (size, 4 if size == 4 else 5))

    def fn(params, row):
        return functional_call(ref, params, (row[None],)).pow(2).sum()

    model(ids).pow(2).sum().backward()
    want = per_example_grads(fn, {n: p.detach() for n, p in ref.named_parameters() if p.requires_grad}, ids)
    assert_tree_close({n: p.grad_sample for n, p in model.named_parameters() if p.requires_grad}, want, rtol=1e-10)
    assert getattr(model.pos.weight, "grad_sample", None) is None


@pytest.mark.parametrize("kind", ["Linear", "DPLSTM", "converted"])
def test_evaluation_without_gradients_takes_any_batch(kind):
    """``max_batch_size`` bounds the batches whose per-sample gradients are taken: under
    ``no_grad`` (evaluation, ``generate()`` with beams, which multiplies the batch) a larger
    batch runs as the torch layer; with gradients it is refused."""
    torch.manual_seed(0)
    if kind == "Linear":
        model, x = pnn.Linear(3, 2, 2), torch.randn(5, 3)
    elif kind == "DPLSTM":
        model, x = pnn.DPLSTM(3, 2, batch_first=True, max_batch_size=2), torch.randn(5, 4, 3)
    else:
        model, x = pnn.expand_weights(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), 2), torch.randn(5, 3)
    with torch.no_grad():
        out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape[0] == 5
    with pytest.raises(ValueError, match="max_batch_size"):
        model(x)


class FrozenBackbone(nn.Module):
    """A frozen time-major LSTM (a backbone: only the head trains) fed the input transposed:
    its output ``[T, B, H]`` into a batch-first head is read T for B."""

    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(3, 5), nn.Linear(5, 2)
        self.lstm.requires_grad_(False)

    def forward(self, x):  # [B, T, 3]
        return self.head(self.lstm(x.transpose(0, 1))[0]).transpose(0, 1)


@pytest.mark.parametrize("steps", [4, 3])
def test_a_frozen_layer_given_the_examples_keeps_its_checks(steps):
    """Only a frozen layer on constants is a constant op; one given the examples reads them
    as any layer (a first version skipped it: the head's grad_sample had T rows, silent)."""
    model = pnn.expand_weights(FrozenBackbone().double(), 8)
    with pytest.raises(ValueError, match=r"Linear 'head' reads dim 0 .*DPLSTM 'lstm'"):
        model(torch.randn(4, steps, 3, dtype=F64))


class FrozenDecoder(nn.Module):
    """A frozen batch-first LSTM whose initial state ``[1, B, H]`` (batch at dim 1) comes from
    a trainable layer."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec, self.head = nn.Linear(3, 5), nn.LSTM(3, 5, batch_first=True), nn.Linear(5, 2)
        self.dec.requires_grad_(False)

    def forward(self, x):
        h0 = self.enc(x[:, 0]).unsqueeze(0)
        return self.head(self.dec(x, (h0, torch.zeros_like(h0)))[0])


@pytest.mark.parametrize("steps", [4, 3])
def test_a_frozen_layer_with_a_state_from_a_trainable_one_gives_exact_grads(steps):
    torch.manual_seed(7)
    ref = FrozenDecoder().double()
    model = pnn.expand_weights(copy.deepcopy(ref), 8)
    x = torch.randn(4, steps, 3, dtype=F64)
    model(x).pow(2).sum().backward()
    want = oracle(ref, x, batch_first=True)
    assert_tree_close({n: p.grad_sample for n, p in model.named_parameters() if p.requires_grad},
                      {n: g for n, g in want.items() if not n.startswith("dec.")}, rtol=1e-10)


def test_shared_ids_inside_a_generic_shell_are_looked_up_per_example_call():
    """HF CLIP's vision embeddings: a module with its own parameter (a generic shell) whose
    child Embedding looks up ``[1, T]`` position ids. The generic shell runs each example
    as a batch of one, so the ids stay ``[1, T]`` there (before: expanded to the forward's
    batch inside the per-example call, refused)."""

    class Embeddings(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = nn.Parameter(torch.randn(3))
            self.pos = nn.Embedding(5, 3)
            self.register_buffer("ids", torch.arange(4)[None], persistent=False)

        def forward(self, x):  # [B, 4, 3]
            return x * self.cls + self.pos(self.ids)

    torch.manual_seed(6)
    ref = nn.Sequential(Embeddings(), nn.Linear(3, 2)).double()
    with pytest.warns(UserWarning, match="hold buffers"):  # (the ids buffer: constant)
        model = pnn.expand_weights(copy.deepcopy(ref), 8)
    x = torch.randn(4, 4, 3, dtype=F64)
    model(x).pow(2).sum().backward()
    assert_tree_close(grad_samples(model), oracle(ref, x, batch_first=True), rtol=1e-10)


class Reordered(nn.Module):
    """A Linear whose output's examples are reordered by ``how`` before the next Linear."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h, how = self.a(x), self.how
        order = torch.tensor([2, 0, 3, 1])[: h.shape[0]] if h.shape[0] == 4 else torch.arange(h.shape[0]).flip(0)
        if how == "flip":
            h = h.flip(0)
        elif how == "roll":
            h = torch.roll(h, 1, 0)
        elif how == "index_select":
            h = h.index_select(0, order)
        elif how == "index":
            h = h[order]
        elif how == "split-cat":
            first, second = h.split([1, h.shape[0] - 1])
            h = torch.cat([second, first])
        elif how == "sort-unsort":  # reorder, work, restore: in order again
            h = torch.tanh(h[order])[torch.argsort(order)]
        elif how == "concat":
            h = torch.concat([h[1:], h[:1]])
        elif how == "vsplit-vstack":
            h = torch.vstack(torch.vsplit(h, [1])[::-1])
        elif how == "stack-ints-reversed":
            h = torch.stack([h[i] for i in reversed(range(h.shape[0]))])
        elif how == "iterate-reversed":
            h = torch.stack(list(h)[::-1])
        elif how == "split-cat-back":
            first, second = h.split([1, h.shape[0] - 1])
            h = torch.cat([first, second * 1.0])
        elif how == "pick-positions":  # one position per example, HF's pooled-token idiom
            h = h[torch.arange(h.shape[0]), torch.zeros(h.shape[0], dtype=torch.long)]
        return self.b(h)


@pytest.mark.parametrize("how", ["flip", "roll", "index_select", "index", "split-cat", "concat", "vsplit-vstack",
                                 "stack-ints-reversed", "iterate-reversed"])
@pytest.mark.parametrize("steps", [4, 3])
def test_examples_reordered_between_layers_are_refused_at_any_sizes(how, steps):
    """Row b of the next layer's per-sample gradients would belong to another example than
    row b of the first's: clipping rows would bound no example (silent before, any sizes)."""
    model = pnn.expand_weights(Reordered(how).double(), 8)
    with pytest.raises(ValueError, match=r"Linear 'b' .* reordered or picked its examples"):
        model(torch.randn(4, steps, 3, dtype=F64))


@pytest.mark.parametrize("how", ["sort-unsort", "split-cat-back", "pick-positions"])
def test_examples_restored_to_their_order_give_exact_grads(how):
    torch.manual_seed(8)
    assert_exact_at_t_equals_b(Reordered(how).double())


class Packed(nn.Module):
    """Embedding -> packed LSTM -> head, the batch sorted by length in one of several ways."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.e, self.lstm, self.o = nn.Embedding(9, 3), nn.LSTM(3, 3, batch_first=True), nn.Linear(3, 2)

    def forward(self, ids):
        lengths = torch.tensor([2, ids.shape[1], 3, 1][: ids.shape[0]])
        how = self.how
        if how == "unsorted":  # torch sorts and restores the order itself
            packed = pack_padded_sequence(self.e(ids), lengths, batch_first=True, enforce_sorted=False)
            out = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=ids.shape[1])[0]
            return self.o(out)
        ls, order = lengths.sort(descending=True)
        if how == "sorted-input":  # every layer sees the sorted batch: its rows agree
            packed = pack_padded_sequence(self.e(ids[order]), ls, batch_first=True)
            return self.o(pad_packed_sequence(self.lstm(packed)[0], batch_first=True)[0])
        if how == "sorted-between":  # the LSTM's rows are sorted, the others' are not
            packed = pack_padded_sequence(self.e(ids)[order], ls, batch_first=True)
            out = pad_packed_sequence(self.lstm(packed)[0], batch_first=True)[0]
            return self.o(out[order.argsort()])
        packed = pack_padded_sequence(self.e(ids[order]), ls, batch_first=True)  # "unsorted-after"
        out = pad_packed_sequence(self.lstm(packed)[0], batch_first=True)[0]
        return self.o(out[order.argsort()])  # the head's rows unsorted, the others' sorted


@pytest.mark.parametrize("how", ["sorted-between", "unsorted-after"])
@pytest.mark.parametrize("steps", [4, 5])
def test_a_batch_sorted_for_packing_between_layers_is_refused(how, steps):
    """Before, a PackedSequence's order was not followed: the LSTM's grad_sample rows were
    the sorted examples' (1.8-1.9 off the loop, any sizes)."""
    model = pnn.expand_weights(Packed(how).double(), 8)
    with pytest.raises(ValueError, match="reordered or picked its examples"):
        model(torch.randint(0, 9, (4, steps)))


@pytest.mark.parametrize("how", ["unsorted", "sorted-input"])
def test_a_packed_batch_in_one_order_gives_exact_grads(how):
    torch.manual_seed(9)
    ref = Packed(how).double()
    model = pnn.expand_weights(copy.deepcopy(ref), 8)
    ids = torch.randint(0, 9, (4, 4))
    model(ids).pow(2).sum().backward()

    def fn(params, row):
        # the loss of output row ``row``, the batch run whole: no layer mixes examples, so
        # this is the gradient of the example in that row (for "sorted-input", the row-th
        # example in sorted order, as every layer's row is)
        return functional_call(ref, params, (ids,))[row].pow(2).sum()

    want = per_example_grads(fn, {n: p.detach() for n, p in ref.named_parameters()}, torch.arange(4))
    assert_tree_close(grad_samples(model), want, rtol=1e-10)


def test_an_empty_batch_through_followed_reshapes():
    model = pnn.expand_weights(Moved("merge-split-back").double(), 8)
    model(torch.randn(0, 4, 3, dtype=F64)).sum().backward()
    assert model.q.weight.grad_sample.shape == (0, 4, 4)


class Loops(nn.Module):
    """Per-example Python loops between two Linears (``how``)."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):  # [B, T, 3]
        h, how, n = self.a(x), self.how, x.shape[0]
        if how == "pool":
            return self.b(torch.stack([h[i, :2].mean(0) for i in range(n)]))
        if how == "unsqueeze-cat":
            return self.b(torch.cat([torch.tanh(h[i]).unsqueeze(0) for i in range(n)]))
        if how == "fill":
            out = torch.zeros_like(h)
            for i in range(n):
                out[i] = h[i] * 2.0
            return self.b(out)
        if how == "nested-iteration":
            return self.b(torch.stack([torch.stack([e for e in r]) for r in h]))
        if how == "row-stack-view":
            return self.b(torch.row_stack([h[i] for i in range(n)]).view(h.shape))
        if how == "last-token":
            return self.b(h[torch.arange(n), -1])
        if how == "other-example":  # example i scaled by example i + 1: mixes examples
            return self.b(torch.stack([h[i] * h[(i + 1) % n].sum() for i in range(n)]))
        if how == "fill-reversed":
            out = torch.zeros_like(h)
            for i in range(n):
                out[n - 1 - i] = h[i]
            return self.b(out)
        if how == "fill-add":  # out[i] += h[i] into zeros: each row written once, in order
            out = torch.zeros(h.shape, dtype=h.dtype)
            for i in range(n):
                out[i] += h[i]
            return self.b(out)
        if how == "fill-colon":
            out = torch.zeros(h.shape, dtype=h.dtype)
            for i in range(n):
                out[torch.tensor(i), :] = h[i]
            return self.b(out)
        if how == "copy-in-order":
            out = torch.zeros_like(h)
            for i in range(n):
                out[i].copy_(h[i])
            return self.b(out)
        if how == "chunked-fill":  # micro-batches written into a buffer in order
            out = torch.empty_like(h)
            for i in range(0, n, 2):
                out[i:i + 2] = torch.tanh(h[i:i + 2])
            return self.b(out)
        if how == "time-major-std":  # a reduction over dim 0 with std's positional unbiased
            return self.b(h.transpose(0, 1).std(0, True)[:, None])
        if how == "shifted-fill":  # each example gets the one before it
            out = torch.zeros_like(h)
            out[1:] = h[:-1]
            return self.b(out)
        if how == "index-fill":  # written through an index tensor, in order
            out = torch.zeros_like(h)
            out[torch.arange(n)] = h
            return self.b(out)
        if how == "pad-loop":  # a manual pad: each example written into part of its row
            out = h.new_zeros(h.shape)
            for i in range(n):  # (the same length for each: the loop over examples agrees)
                out[i, : h.shape[1] - 1] = h[i, : h.shape[1] - 1]
            return self.b(out)
        if how == "diag-embed-flip":  # an op that adds a dim (not followed before) then a flip
            return self.b(torch.diag_embed(h).flip(0).sum(-1))
        if how == "unfold-flip":
            return self.b(h.unfold(0, 1, 1)[..., 0].flip(0))
        if how == "partial-overwrite":  # rows swapped, then half of each row written back in order
            out = torch.stack([h[1], h[0], *h[2:]])
            for i in range(2):
                out[i, :2] = h[i, :2]
            return self.b(out)
        if how == "shifted-view-write":  # a view through a reshape starting one row in
            out = torch.zeros(n, n, 3, dtype=h.dtype)
            out.view(n * n, 3)[1:n + 1].copy_(h[:, 0])
            return self.b(out.transpose(0, 1))
        perm = torch.arange(n).roll(1)
        if how == "broadcast-one":  # example 0 added to every example
            return self.b(h + h[0][None])
        if how == "batch-mean":
            return self.b(h - h.mean(0, keepdim=True))
        if how == "batch-max":
            return self.b(h * h.max(0, keepdim=True).values)
        if how == "sort-batch":
            return self.b(torch.sort(h, dim=0).values)
        if how == "pool-then-flip":
            return self.b(h.mean(1).flip(0))
        if how == "copy-through-view":
            out = torch.zeros_like(h)
            for i in range(n):
                out[int(perm[i])].copy_(h[i])
            return self.b(out)
        if how == "add-through-view":
            out = torch.zeros_like(h)
            for i in range(n):
                out[int(perm[i])].add_(h[i])
            return self.b(out)
        if how == "narrow-copy":
            out = torch.zeros_like(h)
            for i in range(n):
                out.narrow(0, int(perm[i]), 1).copy_(h[i:i + 1])
            return self.b(out)
        if how == "ragged-cat":
            return self.b(torch.cat([h[i, : 2 + 2 * (i % 2)] for i in range(n)]).view(n, -1, 3))
        return torch.stack([self.b(h[i]) for i in range(n)])  # "layer-per-example"


@pytest.mark.parametrize("how", ["pool", "unsqueeze-cat", "fill", "nested-iteration", "row-stack-view", "last-token",
                                 "fill-add", "fill-colon", "copy-in-order", "chunked-fill", "time-major-std",
                                 "index-fill", "pad-loop"])
def test_per_example_loops_in_order_give_exact_grads(how):
    """Before, any op on one picked example (a mean, an unsqueeze, a write into a buffer)
    left no batch dim to trust, and the loop was refused."""
    torch.manual_seed(10)
    assert_exact_at_t_equals_b(Loops(how).double())


@pytest.mark.parametrize("how", ["other-example", "fill-reversed", "layer-per-example", "broadcast-one", "batch-mean",
                                 "batch-max", "sort-batch", "pool-then-flip", "copy-through-view",
                                 "add-through-view", "narrow-copy", "ragged-cat", "shifted-fill",
                                 "diag-embed-flip", "unfold-flip", "shifted-view-write", "partial-overwrite"])
def test_per_example_loops_that_mix_or_misread_examples_are_refused(how):
    """A layer called on one example reads its time steps as a batch (an IndexError
    inside the check before; now the check's ValueError). From a fourth review, silent
    before (0.6-7 off the loop, and DPOptimizer's steps with them): one example broadcast
    over the batch, reductions over the batch with keepdim (h - h.mean(0, keepdim=True)),
    sorting along the batch (max/sort return named tuples, which were not followed),
    reordering after a pooling reduction, writes through views of a buffer in another
    order, and examples of different lengths concatenated as if a batch."""
    model = pnn.expand_weights(Loops(how).double(), 8)
    with pytest.raises(ValueError, match="Linear 'b' reads dim 0"):
        model(torch.randn(4, 5, 3, dtype=F64))


class Reshaped(nn.Module):
    """A time-major LSTM's output [T, B, H] reshaped (not transposed) to [B, T, H]."""

    def __init__(self):
        super().__init__()
        self.lstm, self.o = nn.LSTM(3, 3), nn.Linear(3, 2)

    def forward(self, x):  # [B, T, 3]
        out = self.lstm(x.transpose(0, 1))[0]
        return self.o(out.reshape(x.shape[0], x.shape[1], 3))


@pytest.mark.parametrize("steps", [4, 5, 6, 8])
def test_a_time_major_output_reshaped_instead_of_transposed_is_refused(steps):
    """Before, refused only when T was a multiple of B (0.36-1.03 off the loop at T = 5, 6):
    a reshape that scatters the batch leaves none to trust, so the sizes are not asked."""
    model = pnn.expand_weights(Reshaped().double(), 8)
    with pytest.raises(ValueError, match="Linear 'o' reads dim 0 .*DPLSTM 'lstm'"):
        model(torch.randn(4, steps, 3, dtype=F64))
