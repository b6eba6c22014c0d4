"""The torch.compile route agrees with the eager clipped sum."""

import pytest
import torch
import torch.nn.functional as F

import psgfunc.dp as dp
import psgfunc.functional as PF
from tests.oracles import assert_tree_close


def loss(p, x, y):
    return F.cross_entropy(PF.linear(p["b"], torch.relu(PF.linear(p["a"], x))), y)


def test_compiled_equals_eager():
    g = torch.Generator().manual_seed(0)
    params = {"a": PF.init_linear(8, 16, generator=g), "b": PF.init_linear(16, 3, generator=g)}
    x, y = torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
    step = dp.compiled_clipped_grad_sum(loss, 0.5)
    summed, norms = step(params, x, y)
    eager, eager_norms = dp.clipped_grad_sum(loss, params, x, y, max_norm=0.5, method="materialize")
    assert_tree_close(summed, eager, dtype=torch.float32)
    torch.testing.assert_close(norms, eager_norms, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        step(params, x * float("nan"), y)
    with pytest.raises(ValueError, match="empty"):
        step(params, x[:0], y[:0])
    with pytest.raises(ValueError, match="max_norm"):
        dp.compiled_clipped_grad_sum(loss, -1.0)
