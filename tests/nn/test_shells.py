"""psgfunc.nn shells: the torch.nn contract (values, state_dict) plus .grad_sample."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair, _single, _triple

import psgfunc.functional as PF
import psgfunc.nn as pnn
from tests.oracles import assert_tree_close, per_example_grads

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
F64 = torch.float64
MAX = 6


def _idx(shape, high):
    return lambda gen: torch.randint(0, high, shape, generator=gen)


def _x(*shape):
    return lambda gen: torch.randn(shape, dtype=F64, generator=gen)


# name -> (shell factory, torch.nn factory, input maker for a batch of B=4)
LAYERS = {
    "linear": (lambda: pnn.Linear(5, 3, MAX, dtype=F64), lambda: nn.Linear(5, 3, dtype=F64), _x(4, 5)),
    "linear_seq_nobias": (lambda: pnn.Linear(5, 3, MAX, bias=False, dtype=F64),
                          lambda: nn.Linear(5, 3, bias=False, dtype=F64), _x(4, 2, 3, 5)),
    "convlinear": (lambda: pnn.ConvLinear(5, 3, MAX, dtype=F64), lambda: nn.Linear(5, 3, dtype=F64), _x(4, 7, 5)),
    "conv1d": (lambda: pnn.Conv1d(4, 6, 3, MAX, stride=2, padding=1, groups=2, dtype=F64),
               lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2, dtype=F64), _x(4, 4, 9)),
    "conv2d_reflect_same": (
        lambda: pnn.Conv2d(3, 4, (2, 3), MAX, padding="same", padding_mode="reflect", dilation=(2, 1), dtype=F64),
        lambda: nn.Conv2d(3, 4, (2, 3), padding="same", padding_mode="reflect", dilation=(2, 1), dtype=F64),
        _x(4, 3, 7, 6)),
    "conv2d_circular_nobias": (
        lambda: pnn.Conv2d(2, 2, 3, MAX, padding=(1, 2), padding_mode="circular", bias=False, dtype=F64),
        lambda: nn.Conv2d(2, 2, 3, padding=(1, 2), padding_mode="circular", bias=False, dtype=F64),
        _x(4, 2, 5, 5)),
    "conv3d": (lambda: pnn.Conv3d(2, 4, 2, MAX, stride=(1, 2, 1), padding="valid", dtype=F64),
               lambda: nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding="valid", dtype=F64), _x(4, 2, 4, 5, 3)),
    "conv3d_replicate": (lambda: pnn.Conv3d(2, 2, 3, MAX, padding=1, padding_mode="replicate", dtype=F64),
                         lambda: nn.Conv3d(2, 2, 3, padding=1, padding_mode="replicate", dtype=F64),
                         _x(4, 2, 3, 4, 3)),
    # V = 9 != max_batch_size: BastionLab offset copies by max_batch_size
    "embedding": (lambda: pnn.Embedding(9, 3, MAX, dtype=F64), lambda: nn.Embedding(9, 3, dtype=F64), _idx((4, 5), 9)),
    "embedding_pad": (lambda: pnn.Embedding(9, 3, MAX, padding_idx=2, dtype=F64),
                      lambda: nn.Embedding(9, 3, padding_idx=2, dtype=F64), _idx((4,), 9)),
    "layernorm": (lambda: pnn.LayerNorm(5, MAX, dtype=F64), lambda: nn.LayerNorm(5, dtype=F64), _x(4, 3, 5)),
    "layernorm_2d_nobias": (lambda: pnn.LayerNorm([2, 3], MAX, eps=1e-3, dtype=F64, bias=False),
                            lambda: nn.LayerNorm([2, 3], eps=1e-3, bias=False, dtype=F64), _x(4, 2, 3)),
    "layernorm_noaffine": (lambda: pnn.LayerNorm(5, MAX, elementwise_affine=False, dtype=F64),
                           lambda: nn.LayerNorm(5, elementwise_affine=False, dtype=F64), _x(4, 5)),
}
NAMES = list(LAYERS)


def build(name, seed=0):
    """(shell, nn module with the same perturbed weights, batch input)."""
    make_shell, make_nn, make_x = LAYERS[name]
    torch.manual_seed(seed)
    shell, ref = make_shell(), make_nn()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in shell.parameters():
            p.add_(torch.randn(p.shape, dtype=p.dtype, generator=gen))
    ref.load_state_dict(shell.state_dict(), strict=True)
    return shell, ref, make_x(gen)


def loss_of(out):
    return torch.sin(out * 1.3).sum()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_matches_nn_both_ways(name):
    shell, ref, _ = build(name)
    fresh = LAYERS[name][1]()
    assert [(k, v.shape) for k, v in shell.state_dict().items()] == [
        (k, v.shape) for k, v in fresh.state_dict().items()
    ]
    fresh.load_state_dict(shell.state_dict(), strict=True)
    other = LAYERS[name][0]()
    other.load_state_dict(fresh.state_dict(), strict=True)
    for (k, a), (_, b) in zip(other.state_dict().items(), shell.state_dict().items()):
        assert torch.equal(a, b), k
    assert all(type(p) is nn.Parameter for p in shell.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_output_grad_and_grad_sample(name):
    shell, ref, x = build(name)
    out = shell(x)
    assert torch.equal(out, ref(x))  # the same ops as torch.nn, bit for bit
    params = dict(ref.named_parameters())
    if not params:
        return
    loss_of(out).backward()
    loss_of(ref(x)).backward()
    for (k, p), q in zip(shell.named_parameters(), params.values()):
        assert p.grad_sample.shape == (x.shape[0], *p.shape), k
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(p.grad_sample.sum(0), p.grad, rtol=1e-12, atol=1e-12)

    def fn(p, xi):
        return loss_of(torch.func.functional_call(ref, p, (xi.unsqueeze(0),)))

    expected = per_example_grads(fn, {k: v.detach() for k, v in params.items()}, x)
    assert_tree_close({k: p.grad_sample for k, p in shell.named_parameters()}, expected)


def test_mean_loss_scales_grad_sample_by_one_over_b():
    shell, _, x = build("conv1d")
    shell(x).sum().backward()
    summed = shell.weight.grad_sample.clone()
    shell.zero_grad()
    shell(x).sum(dim=(1, 2)).mean().backward()
    torch.testing.assert_close(shell.weight.grad_sample, summed / x.shape[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_batch_larger_than_max_batch_size(name):
    shell, _, _ = build(name)
    make_x = LAYERS[name][2]
    gen = torch.Generator().manual_seed(0)
    x = make_x(gen)
    big = torch.cat([x, x])  # 8 > MAX = 6
    with pytest.raises(ValueError, match=r"8 examples.*max_batch_size=6.*chunks"):
        shell(big)
    shell(big[:MAX])  # exactly max_batch_size is fine


@pytest.mark.parametrize(
    "shell,x",
    [
        (pnn.Linear(5, 3, MAX), torch.randn(5)),
        (pnn.ConvLinear(5, 3, MAX), torch.randn(5)),
        (pnn.Conv1d(2, 3, 3, MAX), torch.randn(2, 7)),
        (pnn.Conv2d(2, 3, 3, MAX), torch.randn(2, 7, 7)),
        (pnn.Conv3d(2, 3, 3, MAX), torch.randn(2, 5, 5, 5)),
        (pnn.Conv2d(2, 3, 3, MAX), torch.randn(1, 1, 2, 7, 7)),  # too many dims
        (pnn.Embedding(5, 3, MAX), torch.tensor(2)),
        (pnn.LayerNorm(5, MAX), torch.randn(5)),
        (pnn.LayerNorm((2, 5), MAX), torch.randn(2, 5)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(tuple(v.shape)),
)
def test_missing_batch_dim(shell, x):
    with pytest.raises(ValueError, match=r"batch dim.*unsqueeze\(0\)"):
        shell(x)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, None])
def test_max_batch_size_must_be_positive_int(bad):
    for make in (lambda: pnn.Linear(2, 2, bad), lambda: pnn.Conv2d(1, 1, 1, bad),
                 lambda: pnn.Embedding(3, 2, bad), lambda: pnn.LayerNorm(2, bad)):
        with pytest.raises(ValueError, match="max_batch_size"):
            make()


def test_grad_sample_accumulates_and_zero_grad_clears():
    model = nn.Sequential(pnn.Linear(3, 4, MAX), nn.Tanh(), pnn.Linear(4, 2, MAX))
    x = torch.randn(5, 3)
    loss = model(x).sum()
    loss.backward(retain_graph=True)
    first = [p.grad_sample.clone() for p in model.parameters()]
    loss.backward()  # a second backward of the same forward pass adds up, as .grad
    for p, g in zip(model.parameters(), first):
        torch.testing.assert_close(p.grad_sample, 2 * g)
        torch.testing.assert_close(p.grad, 2 * g.sum(0))
    # another forward pass (same or other batch size) without clearing: refused, fix named
    for batch in (x, x[:3]):
        with pytest.raises(ValueError, match="zero_grad"):
            model(batch).sum().backward()

    model[0].zero_grad()  # a shell's own zero_grad clears both
    assert model[0].weight.grad is None and model[0].weight.grad_sample is None
    assert model[2].weight.grad_sample is not None
    pnn.zero_grad(model, set_to_none=False)  # any module: .grad zeroed, .grad_sample None
    for p in model.parameters():
        assert p.grad_sample is None
        assert p.grad is None or p.grad.abs().max() == 0
    model(x[:3]).sum().backward()
    assert model[2].weight.grad_sample.shape == (3, 2, 4)
    pnn.zero_grad(model)
    assert all(p.grad is None and p.grad_sample is None for p in model.parameters())


def test_no_grad_sample_for_frozen_params_or_no_grad():
    shell = pnn.Linear(3, 2, MAX)
    shell.bias.requires_grad_(False)
    shell(torch.randn(4, 3)).sum().backward()
    assert shell.weight.grad_sample.shape == (4, 2, 3)
    assert getattr(shell.bias, "grad_sample", None) is None
    shell.zero_grad()
    with torch.no_grad():
        shell(torch.randn(4, 3))
    assert shell.weight.grad_sample is None


@pytest.mark.parametrize("name", ["conv1d", "conv3d", "embedding", "layernorm", "linear"])
def test_empty_batch(name):
    """An empty batch (Poisson sampling can draw one) gives empty grad_sample, zero grad."""
    shell, ref, x = build(name)
    x = x[:0]
    out = shell(x)
    assert out.shape == ref(x).shape
    out.sum().backward()
    for p in shell.parameters():
        assert p.grad_sample.shape == (0, *p.shape)
        assert p.grad.abs().max() == 0


@pytest.mark.parametrize("name", NAMES)
def test_extra_repr_shows_max_batch_size(name):
    shell, ref, _ = build(name)
    assert repr(shell).endswith(f"max_batch_size={MAX})")
    assert ref.extra_repr() in shell.extra_repr()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_norm=1.0), "max_norm=1.0 is not supported.*renorm_"),
        (dict(scale_grad_by_freq=True), "scale_grad_by_freq=True is not supported.*couples"),
        (dict(sparse=True), "sparse=True is not supported.*sparse=False"),
    ],
)
def test_embedding_options_without_exact_per_sample_grads(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pnn.Embedding(5, 3, MAX, **kwargs)
    shell = pnn.Embedding(5, 3, MAX)
    for k, v in kwargs.items():
        setattr(shell, k, v)  # set after construction: refused at forward
    with pytest.raises(ValueError, match=match):
        shell(torch.tensor([[1, 2]]))


def test_seed_signatures_positionally():
    """BastionLab's positional order: max_batch_size after the sizes, then torch.nn's."""
    assert pnn.Linear(3, 2, 4, False).bias is None
    conv = pnn.Conv2d(2, 4, 3, 8, 2, 1, 1, 2, False, "reflect")
    assert (conv.stride, conv.padding, conv.groups, conv.bias, conv.padding_mode) == (
        (2, 2), (1, 1), 2, None, "reflect")
    emb = pnn.Embedding(10, 3, 4, 0)
    assert emb.padding_idx == 0 and emb.max_batch_size == 4
    ln = pnn.LayerNorm([2, 3], 4, 1e-3, False)
    assert ln.normalized_shape == (2, 3) and ln.eps == 1e-3 and ln.weight is None
    assert isinstance(pnn.Linear(2, 2, 1), nn.Linear) and isinstance(pnn.LayerNorm(2, 1), nn.LayerNorm)
    assert isinstance(pnn.Embedding(2, 2, 1), nn.Embedding)
    meta = pnn.Conv1d(2, 2, 3, 4, device="meta", dtype=torch.float16)
    assert meta.weight.is_meta and meta.weight.dtype == torch.float16


def test_expanded_convolution_builds_the_conv_classes():
    assert pnn.expanded_convolution(PF.conv2d, _pair) is pnn.Conv2d
    assert pnn.expanded_convolution(F.conv1d, _single) is pnn.Conv1d  # BastionLab's style
    assert pnn.expanded_convolution(PF.conv3d, _triple) is pnn.Conv3d
    custom_tuple = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    cls = pnn.expanded_convolution(PF.conv2d, custom_tuple)
    assert cls is not pnn.Conv2d and issubclass(cls, pnn.ExpandedModule)
    layer = cls(2, 3, 3, 4, padding=1)
    assert layer.kernel_size == (3, 3) and layer(torch.randn(2, 2, 5, 5)).shape == (2, 3, 5, 5)
    with pytest.raises(ValueError, match="pair conv1d with _single"):
        pnn.expanded_convolution(PF.conv2d, _triple)
    with pytest.raises(ValueError, match="no per-sample rule"):
        pnn.expanded_convolution(lambda params, x, **kw: x, _pair)


def test_shells_copy_and_pickle():
    for shell in (pnn.Conv2d(2, 3, 3, 4), pnn.Linear(2, 3, 4), pnn.Embedding(4, 2, 3), pnn.LayerNorm(3, 2)):
        for clone in (copy.deepcopy(shell), pickle.loads(pickle.dumps(shell))):
            assert type(clone) is type(shell) and clone.max_batch_size == shell.max_batch_size
            for a, b in zip(clone.state_dict().values(), shell.state_dict().values()):
                assert torch.equal(a, b)


def test_float32_shell_matches_oracle():
    torch.manual_seed(0)
    shell = pnn.Conv2d(3, 4, 3, MAX, padding=1, padding_mode="reflect")
    ref = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    ref.load_state_dict(shell.state_dict())
    x = torch.randn(5, 3, 6, 6)
    loss_of(shell(x)).backward()
    fn = lambda p, xi: loss_of(torch.func.functional_call(ref, p, (xi.unsqueeze(0),)))  # noqa: E731
    expected = per_example_grads(fn, {k: v.detach() for k, v in ref.named_parameters()}, x)
    assert_tree_close({k: p.grad_sample for k, p in shell.named_parameters()}, expected, dtype=torch.float32)
