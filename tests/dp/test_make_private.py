"""make_private: one call turns model/optimizer/loader into DP-SGD with virtual batches."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import psgfunc as pf


def _data(n=40, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(x, y)


def _model(d=6):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _run(max_physical, fast, seed=3):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(_data(), batch_size=20)
    model, opt, loader = pf.dp.make_private(
        model, opt, loader, max_norm=0.7, noise_multiplier=0.8, seed=seed,
        max_physical_batch_size=max_physical, fast_clipping=fast,
    )
    loader.loader.batch_sampler.generator = torch.Generator().manual_seed(11)
    sizes = []
    for x, y in loader:
        sizes.append(x.shape[0])
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model, opt, sizes


@pytest.mark.parametrize("fast", [False, True])
def test_physical_batches_give_the_logical_step(fast):
    """Cutting each Poisson batch into physical batches of 3 changes nothing (same noise seed,
    same sampling): one step per logical batch, clipping per example."""
    whole, opt_whole, sizes_whole = _run(None, fast)
    split, opt_split, sizes_split = _run(3, fast)
    assert max(sizes_split) <= 3 and sum(sizes_split) == sum(sizes_whole)
    assert opt_whole.accountant.steps == opt_split.accountant.steps == len(sizes_whole) == 2
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_batch_over_the_shells_limit_never_stops_training():
    """Poisson batches larger than the physical limit are split, never refused."""
    model, opt, sizes = _run(4, True)
    assert max(sizes) <= 4 and len(sizes) > 2


def test_epsilon_follows_the_steps_taken():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(_data(), batch_size=10)
    model, opt, loader = pf.dp.make_private(model, opt, loader, max_norm=1.0, noise_multiplier=1.3,
                                            max_physical_batch_size=4)
    assert opt.accountant.epsilon(1e-5) == 0.0
    for x, y in loader:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    steps = opt.accountant.steps
    assert steps == len(loader) == 4
    want = pf.dp.epsilon(1.3, sample_rate=0.25, steps=steps, delta=1e-5, accountant="pld")
    assert opt.accountant.epsilon(1e-5) == pytest.approx(want, rel=1e-9)


def test_target_epsilon_picks_sigma():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(_data(), batch_size=10)
    _, opt, loader = pf.dp.make_private(model, opt, loader, max_norm=1.0, target_epsilon=3.0,
                                        epochs=5, delta=1e-5, accountant="rdp")
    sigma = opt.transform.noise_multiplier
    steps = 5 * len(loader)
    assert pf.dp.epsilon(sigma, 0.25, steps, 1e-5, accountant="rdp") <= 3.0 + 1e-6


def test_empty_logical_batch_is_a_noise_step():
    ds = _data(n=50)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = pf.dp.PoissonDataLoader(ds, 0.02, generator=torch.Generator().manual_seed(0), steps=30)
    model, opt, loader = pf.dp.make_private(model, opt, loader, max_norm=1.0, noise_multiplier=1.0,
                                            max_physical_batch_size=2, seed=0)
    empties = 0
    for x, y in loader:
        before = [p.detach().clone() for p in model.parameters()]
        F.cross_entropy(model(x), y).backward() if x.shape[0] else None
        opt.step()
        opt.zero_grad()
        if x.shape[0] == 0:
            empties += 1
            assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert empties > 0 and opt.accountant.steps == 30


def test_trains_the_digits_cnn():
    sklearn = pytest.importorskip("sklearn.datasets")
    digits = sklearn.load_digits()
    x = torch.tensor(digits.images[:600], dtype=torch.float32) / 16
    y = torch.tensor(digits.target[:600])
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 16, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model, opt, loader = pf.dp.make_private(
        model, opt, DataLoader(TensorDataset(x, y), batch_size=100), max_norm=1.0,
        noise_multiplier=0.7, max_physical_batch_size=64, seed=0,
    )
    for _ in range(4):
        for xb, yb in loader:
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        logits = torch.cat([model(c) for c in x.split(64)])
        acc = (logits.argmax(1) == y).float().mean().item()
    assert acc > 0.6
    assert opt.accountant.steps == 4 * len(loader)
    assert 0 < opt.accountant.epsilon(1e-5) < 50


def test_errors():
    model, ds = _model(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(ds, batch_size=10)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        pf.dp.make_private("model", opt, loader, max_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(TypeError, match="optimizer must be"):
        pf.dp.make_private(model, "sgd", loader, max_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(TypeError, match="data_loader must be"):
        pf.dp.make_private(model, opt, [1, 2], max_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="exactly one of noise_multiplier and target_epsilon"):
        pf.dp.make_private(model, opt, loader, max_norm=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        pf.dp.make_private(model, opt, loader, max_norm=1.0, noise_multiplier=1.0, target_epsilon=1.0)
    with pytest.raises(ValueError, match="needs epochs"):
        pf.dp.make_private(model, opt, loader, max_norm=1.0, target_epsilon=1.0)
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        pf.dp.make_private(model, opt, loader, max_norm=1.0, noise_multiplier=1.0,
                           max_physical_batch_size=0)
    other = torch.optim.SGD(copy.deepcopy(model).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not the model's"):
        pf.dp.make_private(model, other, loader, max_norm=1.0, noise_multiplier=1.0)


def test_physical_batches_functional():
    x, y = torch.randn(7, 3), torch.arange(7)
    chunks = list(pf.dp.physical_batches((x, y), 3))
    assert [c[0].shape[0] for c in chunks] == [3, 3, 1]
    assert torch.equal(torch.cat([c[1] for c in chunks]), y)
    assert len(list(pf.dp.physical_batches((x[:0], y[:0]), 3))) == 1
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        list(pf.dp.physical_batches((x, y), 0))


def test_secure_reaches_noise_and_sampling():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, opt, loader = pf.dp.make_private(model, opt, DataLoader(_data(), batch_size=10), max_norm=1.0,
                                        noise_multiplier=1.0, secure=True)
    assert opt.transform.secure
    assert loader.loader.batch_sampler.secure


def test_ddp_model_refused():
    class FakeDDP(nn.parallel.DistributedDataParallel):
        def __init__(self, module):  # no process group needed to build the refusal case
            nn.Module.__init__(self)
            self.module = module

    model = FakeDDP(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        pf.dp.make_private(model, opt, DataLoader(_data(), batch_size=10), max_norm=1.0,
                           noise_multiplier=1.0)
