"""Generic shells: modules with parameters and no converter run their own forward with
expanded parameters through the op-level rules (issue 13), checked against the float64
per-example loop."""

import copy
import warnings

import optree
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import psgfunc.nn as pnn
from psgfunc import dp
from psgfunc.per_sample import _torch_ops
from tests.oracles import per_example_grads

F64 = torch.float64
B, T = 3, 5


class LayerScale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=F64))

    def forward(self, x):
        return x * self.gamma


class Conv1D(nn.Module):
    """HF GPT-2's Conv1D (a linear layer with the weight stored [nx, nf])."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=F64) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf, dtype=F64) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.nf,))


class Pow(nn.Module):
    """A parameter reaching an op without a per-sample rule (torch.pow)."""

    def __init__(self, d):
        super().__init__()
        self.e = nn.Parameter(torch.full((d,), 1.5, dtype=F64))

    def forward(self, x):
        return torch.pow(x.abs() + 1.0, self.e)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6, dtype=F64), LayerScale(6), nn.Tanh(), Conv1D(5, 6))


def loop_grads(model, x, loss):
    ref = copy.deepcopy(model)
    params = {k: v.detach().clone() for k, v in ref.named_parameters()}

    def fn(p, xi):
        return loss(functional_call(ref, p, (xi.unsqueeze(0),)))

    return per_example_grads(fn, params, x)


def sq(out):
    return out.pow(2).sum()


def test_layerscale_and_conv1d_grad_sample_equals_loop():
    model = small_model()
    x = torch.randn(B, T, 4, dtype=F64)
    expected = loop_grads(model, x, sq)
    keys = list(model.state_dict())
    ids = {k: id(p) for k, p in model.named_parameters()}
    pnn.expand_weights(model, B)
    assert isinstance(model[1], pnn.Generic) and isinstance(model[1], LayerScale)
    assert isinstance(model[3], pnn.Generic) and type(model[0]) is pnn.Linear
    assert {k: id(p) for k, p in model.named_parameters()} == ids
    assert list(model.state_dict()) == keys
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no op fell back
        sq(model(x)).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, expected[k], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p.grad, expected[k].sum(0), rtol=1e-10, atol=1e-12)


def test_state_dict_loads_strict_both_ways():
    plain, shelled = small_model(), small_model()
    pnn.expand_weights(shelled, B)
    with torch.no_grad():
        for p in shelled.parameters():
            p.add_(1.0)
    plain.load_state_dict(shelled.state_dict(), strict=True)
    shelled2 = pnn.expand_weights(small_model(), B)
    shelled2.load_state_dict(plain.state_dict(), strict=True)
    for a, b in zip(shelled2.parameters(), shelled.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x = torch.randn(B, T, 4, dtype=F64)
    torch.testing.assert_close(shelled2(x), plain(x), rtol=1e-12, atol=1e-12)


def test_pickle_and_deepcopy_keep_the_generic_shell():
    import io

    model = pnn.expand_weights(small_model(), B)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert type(copied[3]) is type(model[3]) and isinstance(copied[3], Conv1D)
        x = torch.randn(B, T, 4, dtype=F64)
        sq(copied(x)).backward()
        assert copied[3].weight.grad_sample.shape == (B, 6, 5)
        assert model[3].weight.grad is None  # a copy, not the same parameters


def test_reconversion_and_no_grad_forward():
    model = pnn.expand_weights(small_model(), 2)
    cls = type(model[3])
    pnn.expand_weights(model, B)
    assert type(model[3]) is cls and model[3].max_batch_size == B
    x = torch.randn(B, T, 4, dtype=F64)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (B, T, 5)
    with pytest.raises(ValueError, match="max_batch_size=3"):
        model(torch.randn(B + 1, T, 4, dtype=F64))


@pytest.mark.parametrize("fast", [False, True])
def test_op_without_rule_warns_and_stays_exact(fast, monkeypatch):
    monkeypatch.setattr(_torch_ops, "_WARNED", set())  # warned once per process
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, dtype=F64), Pow(4))
    x = torch.randn(B, 3, dtype=F64)
    expected = loop_grads(model, x, sq)
    pnn.expand_weights(model, B)
    c, norms, clipped_sum = clipped_reference(expected)
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), max_norm=c, noise_multiplier=0.0,
                         expected_batch_size=B, fast_clipping=fast)
    with pytest.warns(UserWarning, match="torch.pow takes a parameter and has no per-sample rule"):
        sq(model(x)).backward()
    if not fast:
        for k, p in model.named_parameters():
            torch.testing.assert_close(p.grad_sample, expected[k], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(opt.accumulate(), norms, rtol=1e-10, atol=0)


def clipped_reference(expected):
    norms = dp.per_sample_norms(expected)
    c = float(norms.median())
    return c, norms, optree.tree_map(lambda g: g.sum(0), dp.clip(expected, c))


def check_dp_step(model, inputs, loss, expected, fast, size=B):
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    c, norms, clipped_sum = clipped_reference(expected)
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), max_norm=c, noise_multiplier=0.0,
                         expected_batch_size=size, fast_clipping=fast)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "materialised" fallback
        loss(model(inputs)).backward()
        if fast:  # every parameter's gradient is recorded pieces: nothing dense [B, *shape]
            dense = [k for k, p in model.named_parameters() if getattr(p, "grad_sample", None) is not None]
            assert dense == []
        got = opt.accumulate()
    torch.testing.assert_close(got, norms, rtol=1e-10, atol=0)
    opt.step()
    for k, p in model.named_parameters():
        want = before[k] - 0.5 * clipped_sum[k] / size
        torch.testing.assert_close(p.detach(), want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("fast", [False, True])
def test_dp_optimizer_step_equals_clipped_loop(fast):
    model = small_model()
    x = torch.randn(B, T, 4, dtype=F64)
    expected = loop_grads(model, x, sq)
    pnn.expand_weights(model, B)
    check_dp_step(model, x, sq, expected, fast)


class Block(nn.Module):
    """Own parameter, a child layer that has a converter, and a residual."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(4, dtype=F64))
        self.lin = nn.Linear(4, 4, dtype=F64)

    def forward(self, x):
        return self.lin(x) * self.alpha + x


class Twice(nn.Module):
    """One parameter used twice in the forward."""

    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.randn(4, dtype=F64))

    def forward(self, x):
        return torch.tanh(x * self.g) * self.g


class TiedHead(nn.Module):
    """Reads another layer's weight (a tied head): ``x @ w.T``."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, x):
        return x @ self.w.t()


class ParentBias(nn.Module):
    """HF BERT's masked-LM head: the parent registers the bias, its child Linear holds the
    same Parameter (``decoder.bias = bias``); the parent is a generic shell, and the child's
    use of the bias must get the example's copy too."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(4, dtype=F64))
        self.decoder = nn.Linear(4, 4, bias=False, dtype=F64)
        self.decoder.bias = self.bias

    def forward(self, x):
        return self.decoder(x)


def variant(name):
    torch.manual_seed(0)
    if name == "parent-bias":
        return nn.Sequential(nn.Linear(4, 4, dtype=F64), nn.Tanh(), ParentBias()), (B, 4)
    if name == "child":
        return nn.Sequential(Block(), nn.Tanh(), Twice()), (B, 4)
    if name == "root":
        return Block(), (B, 2, 4)
    if name == "batch-1":
        return nn.Sequential(nn.Linear(4, 4, dtype=F64), Twice()), (1, 4)
    if name == "shared":
        t = Twice()
        return nn.Sequential(t, nn.Tanh(), t), (B, 4)
    lin = nn.Linear(4, 4, bias=False, dtype=F64)
    return nn.Sequential(lin, nn.Tanh(), TiedHead(lin.weight)), (B, 4)


VARIANTS = ["child", "root", "batch-1", "shared", "tied", "parent-bias"]


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_grad_sample_equals_loop(name):
    model, shape = variant(name)
    x = torch.randn(*shape, dtype=F64)
    expected = loop_grads(model, x, sq)
    model = pnn.expand_weights(model, B)
    assert any(isinstance(m, pnn.Generic) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sq(model(x))
        out.backward(retain_graph=True)
        out.backward()  # a second backward of the same forward adds up
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, 2 * expected[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_fast_clipping_step_equals_clipped_loop(name):
    model, shape = variant(name)
    x = torch.randn(*shape, dtype=F64)
    expected = loop_grads(model, x, sq)
    model = pnn.expand_weights(model, B)
    check_dp_step(model, x, sq, expected, True, size=shape[0])


def test_model_with_generic_shells_under_per_sample_grads():
    from psgfunc import per_sample_grads

    model = pnn.expand_weights(small_model(), B)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(B, T, 4, dtype=F64)

    def fn(p, xi):
        return sq(functional_call(model, p, (xi.unsqueeze(0),)))

    expected = per_example_grads(fn, params, x)
    for method in ("vmap", "expanded"):
        got = per_sample_grads(fn, params, x, method=method)
        for k in params:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-10, atol=1e-12)


class Reduce(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4, dtype=F64))

    def forward(self, x):
        return (x * self.w).sum()  # drops the batch dim


class Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4, dtype=F64))

    def forward(self, n):
        return self.w * n


def test_errors_name_the_module_and_the_fix():
    model = pnn.expand_weights(nn.Sequential(Reduce()), B)
    with pytest.raises(ValueError, match="Reduce.*keep that batch dim"):
        model(torch.randn(B, 4, dtype=F64))
    model = pnn.expand_weights(nn.Sequential(Constant()), B)
    with pytest.raises(ValueError, match="Constant.*tensor input whose dim 0 is the batch"):
        model(2.0)
    with pytest.raises(ValueError, match="max_batch_size"):
        pnn.make_generic(Constant(), 0)


# --- HF models -------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def lm_loss(out, ids):
    logits = out.logits if hasattr(out, "logits") else out[0]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="sum")


def hf_model(name):
    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
        model = transformers.GPT2LMHeadModel(config)
    elif name == "bert-mlm":  # its head's bias is held by the head and its decoder Linear
        config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=16)
        model = transformers.BertForMaskedLM(config)
    else:
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=1, max_position_embeddings=16)
        model = transformers.LlamaForCausalLM(config)
        with torch.no_grad():  # RMSNorm weights start at 1: make them differ per channel
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.add_(torch.randn_like(p) * 0.1)
    return model.to(F64).eval()


def hf_expected(model, ids):
    ref = copy.deepcopy(model)
    params = {k: v.detach().clone() for k, v in ref.named_parameters()}

    def fn(p, i):
        return lm_loss(functional_call(ref, p, (i.unsqueeze(0),)), i.unsqueeze(0))

    return per_example_grads(fn, params, ids)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert-mlm"])
def test_hf_grad_sample_equals_loop(name):
    model = hf_model(name)
    ids = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(1))
    expected = hf_expected(model, ids)
    keys = list(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # custom modules with buffers (rotary tables)
        pnn.expand_weights(model, B)
    assert list(model.state_dict()) == keys
    assert any(isinstance(m, pnn.Generic) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no op fell back
        lm_loss(model(ids), ids).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, expected[k], rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert-mlm"])
def test_hf_fast_clipping_step_equals_clipped_loop(name):
    model = hf_model(name)
    ids = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(2))
    expected = hf_expected(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pnn.expand_weights(model, B)
    check_dp_step(model, ids, lambda out: lm_loss(out, ids), expected, True)


def test_a_generic_shell_returning_a_dataclass_is_refused_clearly():
    """HF ``ModelOutput`` or any dataclass of tensors out of a generic shell: the per-example
    call cannot give it back (functorch's 'tensor escaped' RuntimeError before)."""
    import dataclasses

    @dataclasses.dataclass
    class Out:
        y: torch.Tensor

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(4, dtype=F64))

        def forward(self, x):
            return Out(x * self.g)

    model = pnn.expand_weights(Scale(), B)
    with pytest.raises(ValueError, match="got a Out holding tensors.*return_dict=False"):
        model(torch.randn(B, 4, dtype=F64))
