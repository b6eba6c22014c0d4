"""Clear ValueErrors from every per-sample method (and clipped_grad_sum), not torch's errors.

A forgotten batch dim, a BatchNorm in training mode and an out-of-range token id used to
give raw torch RuntimeErrors/IndexErrors under ``method="vmap"`` (and partly under
``"expanded"``); each must be a ValueError naming the argument or layer and the fix, whatever
the method, with torch's error kept as its cause.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import psgfunc.functional as PF
from psgfunc import per_sample_grads
from psgfunc.dp import clipped_grad_sum
from tests.oracles import assert_tree_close, per_example_grads

pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop"),
    pytest.mark.filterwarnings("ignore:psgfunc fast clipping"),
]

F64 = torch.float64
METHODS = ["vmap", "expanded", "auto"]
CLIP_METHODS = ["fast", "materialize", "auto"]


def _calls(fn, params, *batch, chunk_size=None):
    """Every entry point, as zero-argument callables: (name, call)."""
    out = [
        (m, lambda m=m: per_sample_grads(fn, params, *batch, method=m, chunk_size=chunk_size))
        for m in METHODS
    ]
    if chunk_size is None:
        out += [
            (f"clip-{m}", lambda m=m: clipped_grad_sum(fn, params, *batch, max_norm=1.0, method=m))
            for m in CLIP_METHODS
        ]
    return out


def _raises_everywhere(match, fn, params, *batch, chunk_size=None, cause=None):
    for name, call in _calls(fn, params, *batch, chunk_size=chunk_size):
        with pytest.raises(ValueError, match=match) as info:
            call()
        if cause is not None:
            assert isinstance(info.value.__cause__, cause), (name, repr(info.value.__cause__))


# --- the batch structure ---------------------------------------------------------------------


def _linear_fn(p, x, y):
    return ((PF.linear(p, x) - y) ** 2).sum()


def test_mismatched_leading_sizes_and_zero_dim_leaves_everywhere():
    params = PF.init_linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    _raises_everywhere("batch\\[1\\] has 3", _linear_fn, params, x, y[:3])
    _raises_everywhere("batch\\[1\\] is a 0-dim tensor", _linear_fn, params, x, torch.tensor(1.0))
    _raises_everywhere("has 3", lambda p, b: _linear_fn(p, b["x"], b["y"]), params, {"x": x, "y": y[:3]})


@pytest.mark.parametrize("layer", ["psgfunc", "torch"])
def test_one_example_passed_without_its_batch_dim(layer):
    # x [3] is one example: B becomes 3 and fn gets 0-dim inputs
    params = PF.init_linear(3, 2)

    def fn(p, x):
        if layer == "psgfunc":
            return PF.linear(p, x).sum()
        return F.linear(x, p["weight"], p["bias"]).sum()

    for name, call in _calls(fn, params, torch.randn(3)):
        with pytest.raises(ValueError, match="batch") as info:
            call()
        message = str(info.value)
        assert "unsqueeze(0)" in message or "[B, ..., 3]" in message, (name, message)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_fn_that_expects_a_batch_dim(chunk_size):
    params = PF.init_linear(3, 2)
    x = torch.randn(5, 3)

    def indexes_the_batch(p, x):
        return PF.linear(p, x[:, :3]).sum()  # one example is [3]: too many indices

    _raises_everywhere(
        r"fails on a single example.*batch\[0\] \(5, 3\) -> \(3,\).*unsqueeze\(0\)",
        indexes_the_batch, params, x, chunk_size=chunk_size, cause=IndexError,
    )

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    conv_params = {k: v.detach() for k, v in model.named_parameters()}

    def flattens_the_batch(p, img):
        return torch.func.functional_call(model, p, (img,)).sum()  # [1, 4, 4]: no batch dim

    _raises_everywhere(
        r"fails on a single example.*\(1, 4, 4\)", flattens_the_batch, conv_params,
        torch.randn(3, 1, 4, 4), chunk_size=chunk_size, cause=RuntimeError,
    )


def test_errors_only_vmap_raises_are_left_alone():
    # randomness="error" fails under vmap only: one example runs, so torch's error stands
    params = PF.init_linear(3, 2)

    def fn(p, x):
        return F.dropout(PF.linear(p, x), 0.5).sum()

    for method in METHODS:
        with pytest.raises(RuntimeError, match="randomness"):
            per_sample_grads(fn, params, torch.randn(4, 3), method=method, randomness="error")


# --- BatchNorm and InstanceNorm --------------------------------------------------------------


def test_functional_batch_norm_in_training_mode_with_running_stats():
    params = {"w": torch.randn(3), "b": torch.randn(3)}
    mean, var = torch.zeros(3), torch.ones(3)

    def fn(p, x):  # one example [T, C]
        return F.batch_norm(x, mean, var, p["w"], p["b"], training=True).sum()

    _raises_everywhere(r"F\.batch_norm\(training=True\).*running.*eval\(\)", fn, params, torch.randn(4, 5, 3))
    assert torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.ones(3))


@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_batch_norm_module_in_training_mode(kind):
    if kind == "1d":
        model, x = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), torch.randn(4, 3)
    else:
        model, x = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), torch.randn(4, 1, 5, 5)
    model.train()
    params = {k: v.detach() for k, v in model.named_parameters()}
    stats = {k: v.clone() for k, v in model.named_buffers() if "running" in k}

    def fn(p, x):
        return torch.func.functional_call(model, p, (x.unsqueeze(0),)).sum()

    _raises_everywhere(r"BatchNorm.*GroupNorm", fn, params, x)
    for k, v in stats.items():  # refused before torch updates them
        assert torch.equal(model.get_buffer(k), v), k
    # without running statistics a one-example batch has one value per channel
    bn = nn.BatchNorm1d(3, track_running_stats=False)
    bn_params = {k: v.detach() for k, v in bn.named_parameters()}
    _raises_everywhere(
        r"one value per channel",
        lambda p, x: torch.func.functional_call(bn, p, (x.unsqueeze(0),)).sum(), bn_params, torch.randn(4, 3),
    )


@pytest.mark.filterwarnings("ignore:psgfunc. .* has no per-sample rule:UserWarning")  # expected vmap fallback
def test_batch_norm_that_is_per_example_still_works():
    # eval mode (fixed statistics), and training mode without running statistics over the
    # example's own positions: both are per-example functions
    params = {"w": torch.randn(3, dtype=F64), "b": torch.randn(3, dtype=F64)}
    mean, var = torch.randn(3, dtype=F64), torch.rand(3, dtype=F64) + 0.5
    x = torch.randn(4, 5, 3, dtype=F64)

    def fn(p, x):
        fixed = F.batch_norm(x, mean, var, p["w"], p["b"], training=False)
        own = F.batch_norm(x, None, None, p["w"], p["b"], training=True)
        return (fixed**2).sum() + (own * x).sum()

    expected = per_example_grads(fn, params, x)
    for method in METHODS:
        assert_tree_close(per_sample_grads(fn, params, x, method=method), expected, F64)


def test_instance_norm_with_running_stats():
    layer = nn.InstanceNorm1d(3, affine=True, track_running_stats=True)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    _raises_everywhere(
        r"F\.instance_norm.*track_running_stats=False",
        lambda p, x: torch.func.functional_call(layer, p, (x,)).sum(), params, torch.randn(4, 3, 5),
    )


# --- token ids outside the table -------------------------------------------------------------


@pytest.mark.parametrize("bad", [7, 12, -1])
@pytest.mark.parametrize("layer", ["psgfunc", "F.embedding", "nn.Embedding", "F.embedding_bag"])
def test_out_of_range_token_ids(layer, bad):
    emb = nn.Embedding(7, 3)
    params = {"weight": emb.weight.detach()}
    ids = torch.tensor([[0, 1, 2], [3, 4, 5], [6, bad, 1]])  # the bad id in the LAST example

    def fn(p, i):
        if layer == "psgfunc":
            return PF.embedding(p, i).sum()
        if layer == "F.embedding":
            return F.embedding(i, p["weight"]).sum()
        if layer == "nn.Embedding":
            return torch.func.functional_call(emb, p, (i,)).sum()
        return F.embedding_bag(i, p["weight"], torch.tensor([0, 1])).sum()

    _raises_everywhere(rf"embedding.*{bad}.*outside \[0, 7\)", fn, params, ids)
