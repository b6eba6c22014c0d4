"""Distributed DP-SGD (2 gloo processes on 127.0.0.1) is single-process DP-SGD on the union.

One spawned run (:func:`_worker`, two ranks) makes every multi-process check and saves what
it saw; the tests below read it. Spawning costs seconds, so everything shares that run:

* ``DPOptimizer(distributed=True)`` (dense and fast clipping, micro-batches, momentum) and the
  functional recipe (``clipped_grad_sum`` + ``dp_sgd_transform(distributed=True)``, or
  ``all_reduce_sum`` + a seeded transform) equal a single process on the union of the
  ranks' batches to 1e-10 in float64;
* the noise std is ``sigma C / expected_batch_size``, not ``sqrt(world)`` times more;
* the ranks' parameters are bit-identical, with ``secure=True`` and unseeded too;
* ``PoissonDataLoader(distributed=True)`` shards are disjoint and the union is Poisson at q;
* a model wrapped in ``DistributedDataParallel`` is refused.

Bounded: ``init_process_group(timeout=60 s)`` and a join deadline; nothing but 127.0.0.1.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import psgfunc as pf
import psgfunc.dp as dp
import psgfunc.functional as PF
import psgfunc.nn as pnn
from psgfunc.dp._distributed import check_not_ddp

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
DEADLINE_S = 150
DT = torch.float64
N, Q, STEPS, EBS = 40, 0.3, 3, 12.0  # dataset size, sample rate, steps, expected batch q N
MICRO = 3  # micro-batch size of the distributed run


# ----------------------------------------------------------------------- the spawned worker


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        pnn.Conv2d(1, 3, 3, max_batch_size=N),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        pnn.Linear(3 * 4 * 4, 3, max_batch_size=N),
    ).to(DT)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 1, 6, 6, dtype=DT, generator=g), torch.randint(0, 3, (N,), generator=g)


def _optimizer(model: torch.nn.Module, **kw: Any) -> dp.DPOptimizer:
    inner = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    return dp.DPOptimizer(inner, max_norm=0.5, noise_multiplier=0.7, expected_batch_size=EBS, **kw)


def _train(opt: dp.DPOptimizer, model: torch.nn.Module, batches: list[torch.Tensor], micro: int) -> list[torch.Tensor]:
    x, y = _data()
    for idx in batches:
        for start in range(0, len(idx), micro):
            part = idx[start : start + micro]
            F.cross_entropy(model(x[part]), y[part], reduction="sum").backward()
            opt.accumulate()
        opt.step()  # every rank steps, whether its batch was empty or not
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def _check_optimizer(rank: int, out: dict[str, Any]) -> None:
    union = list(dp.poisson_batches(N, Q, STEPS, generator=torch.Generator().manual_seed(0)))
    out["union_sizes"] = [len(b) for b in union]
    for fast in (False, True):
        model = _model()
        if rank == 1:  # rank 0's parameters must win at construction
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        opt = _optimizer(model, seed=0, fast_clipping=fast, distributed=True)
        sampler = dp.PoissonBatchSampler(N, Q, steps=STEPS, generator=torch.Generator().manual_seed(0), distributed=True)
        mine = [torch.tensor(b, dtype=torch.int64) for b in sampler]
        out[f"shards_fast{fast}"] = mine
        out[f"dist_fast{fast}"] = _train(opt, model, mine, MICRO)
        out[f"dp_steps_fast{fast}"] = opt.dp_state.step
        ref_model = _model()
        ref = _optimizer(ref_model, seed=0, fast_clipping=fast)  # one process, union batches
        out[f"single_fast{fast}"] = _train(ref, ref_model, union, N)
    for name, kw in (("secure", {"secure": True}), ("unseeded", {})):
        model = _model()
        opt = _optimizer(model, distributed=True, **kw)
        sampler = dp.PoissonBatchSampler(N, Q, steps=2, secure=True, distributed=True)
        out[name] = _train(opt, model, [torch.tensor(b, dtype=torch.int64) for b in sampler], MICRO)


def _check_noise(rank: int, out: dict[str, Any]) -> None:
    """Empty batches everywhere: one step moves p by -noise / expected batch."""
    sigma, c, ebs = 1.5, 2.0, 4.0
    p = torch.nn.Parameter(torch.zeros(20_000, dtype=DT))
    group = dist.new_group(list(range(WORLD)))  # a ProcessGroup may be passed too
    opt = dp.DPOptimizer(torch.optim.SGD([p], lr=1.0), max_norm=c, noise_multiplier=sigma,
                         expected_batch_size=ebs, seed=11 + rank, distributed=group)  # rank 0's seed
    opt.step()
    out["noise"] = -p.detach().clone()


def _check_functional(rank: int, out: dict[str, Any]) -> None:
    """The README recipe: clipped_grad_sum on this rank's shard, the transform all-reduces."""
    x, y = _data()
    g = torch.Generator().manual_seed(2)
    params = {"a": PF.init_linear(36, 8, dtype=DT, generator=g), "b": PF.init_linear(8, 3, dtype=DT, generator=g)}

    def loss(p: dict[str, Any], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:  # ONE example
        return F.cross_entropy(PF.linear(p["b"], torch.tanh(PF.linear(p["a"], xb.flatten()))), yb)

    union = next(iter(dp.poisson_batches(N, Q, 1, generator=torch.Generator().manual_seed(4))))
    shard = next(iter(dp.poisson_batches(N, Q, 1, generator=torch.Generator().manual_seed(4), distributed=True)))
    local, _ = dp.clipped_grad_sum(loss, params, x[shard], y[shard], max_norm=0.5)
    whole, _ = dp.clipped_grad_sum(loss, params, x[union], y[union], max_norm=0.5)
    tr = dp.dp_sgd_transform(0.5, 0.7, expected_batch_size=EBS, seed=3, distributed=True)
    out["fn_dist"], _ = tr.update_from_sum(local, tr.init(params))
    plain = dp.dp_sgd_transform(0.5, 0.7, expected_batch_size=EBS, seed=3)
    out["fn_manual"], _ = plain.update_from_sum(dp.all_reduce_sum(local), plain.init(params))
    out["fn_single"], _ = plain.update_from_sum(whole, plain.init(params))
    # update() on per-example gradients: the same, all-reduced inside
    grads = pf.per_sample_grads(loss, params, x[shard], y[shard])
    tr2 = dp.dp_sgd_transform(0.5, 0.7, expected_batch_size=EBS, seed=3, distributed=True)
    out["fn_update"], _ = tr2.update(grads, tr2.init(params))
    secure = dp.dp_sgd_transform(0.5, 0.7, expected_batch_size=EBS, secure=True, distributed=True)
    out["fn_secure"], _ = secure.update_from_sum(local, secure.init(params))


def _check_sampler(rank: int, out: dict[str, Any]) -> None:
    data = torch.utils.data.TensorDataset(torch.arange(60))
    for name, kw in (("seeded", {"generator": torch.Generator().manual_seed(9)}), ("secure", {"secure": True})):
        loader = dp.PoissonDataLoader(data, 0.25, steps=300, distributed=True, **kw)
        out[f"loader_{name}"] = [b for (b,) in loader]
    tiny = dp.PoissonDataLoader(torch.utils.data.TensorDataset(torch.randn(4, 3)), 0.3, steps=20, distributed=True)
    out["loader_tiny"] = [tuple(x.shape) for (x,) in tiny]  # 2 examples a rank: empty batches


def _check_ddp(rank: int, out: dict[str, Any]) -> None:
    model = torch.nn.Linear(3, 2)
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    errors = []
    for call in (
        lambda: dp.DPOptimizer(torch.optim.SGD(wrapped.parameters(), lr=0.1), max_norm=1.0,
                               noise_multiplier=1.0, expected_batch_size=4, distributed=True),
        lambda: dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0,
                               noise_multiplier=1.0, expected_batch_size=4),
        lambda: check_not_ddp(wrapped),
        lambda: check_not_ddp(torch.nn.Sequential(wrapped)),
    ):
        try:
            call()
            errors.append(None)
        except ValueError as error:
            errors.append(str(error))
    out["ddp_errors"] = errors
    check_not_ddp(model)  # the unwrapped module itself is fine to check


def _check_example(rank: int, out: dict[str, Any]) -> None:
    """examples/dp_cnn_digits_ddp.py --quick in these two ranks (its group is reused)."""
    sys.path.insert(0, str(ROOT / "examples"))
    spec = importlib.util.spec_from_file_location("psgfunc_example_ddp", ROOT / "examples" / "dp_cnn_digits_ddp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out["example"] = module.main(["--quick"])


def _worker(rank: int, port: int, out_dir: str) -> None:
    started = time.perf_counter()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    out: dict[str, Any] = {"errors": {}, "seconds": {"init": time.perf_counter() - started}}
    try:
        checks = (_check_optimizer, _check_noise, _check_functional, _check_sampler, _check_ddp, _check_example)
        for check in checks:
            start = time.perf_counter()
            try:
                check(rank, out)
            except Exception:  # keep going: the parent reports it with the check's name
                out["errors"][check.__name__] = traceback.format_exc()
            dist.barrier()
            out.setdefault("seconds", {})[check.__name__] = time.perf_counter() - start
    finally:
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


# ----------------------------------------------------------------------- the parent side


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": "1"}
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ctx = torch.multiprocessing.start_processes(
                _worker, args=(_free_port(), tmp), nprocs=WORLD, join=False, start_method="spawn"
            )
            deadline = time.monotonic() + DEADLINE_S
            try:
                while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                    if time.monotonic() > deadline:
                        pytest.fail(f"the {WORLD} spawned ranks did not finish within {DEADLINE_S} s")
            finally:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
            results = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for r, res in enumerate(results):
        assert not res["errors"], f"rank {r}: " + "\n".join(f"{k}:\n{v}" for k, v in res["errors"].items())
    return results


def _close(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = 1e-10) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def _bit_identical(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_bit_identical(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_bit_identical(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("fast", [False, True])
def test_optimizer_equals_one_process_on_the_union(ranks, fast):
    r0, r1 = ranks
    # the shards cut the union, disjoint, and some steps give a rank more than one micro-batch
    for step, size in enumerate(r0["union_sizes"]):
        a, b = r0[f"shards_fast{fast}"][step], r1[f"shards_fast{fast}"][step]
        assert len(a) + len(b) == size and not set(a.tolist()) & set(b.tolist())
    assert max(len(s) for s in r0[f"shards_fast{fast}"]) > MICRO
    assert r0[f"dp_steps_fast{fast}"] == STEPS
    _close(r0[f"dist_fast{fast}"], r0[f"single_fast{fast}"])
    assert _bit_identical(r0[f"dist_fast{fast}"], r1[f"dist_fast{fast}"])  # rank 1's own start lost


@pytest.mark.parametrize("name", ["secure", "unseeded"])
def test_ranks_bit_identical_with_os_entropy(ranks, name):
    r0, r1 = ranks
    assert _bit_identical(r0[name], r1[name])
    assert not _bit_identical(r0[name], r0["dist_fastFalse"])


def test_noise_std_is_sigma_c_over_the_global_expected_batch(ranks):
    r0, r1 = ranks
    assert torch.equal(r0["noise"], r1["noise"])
    # 20000 draws: the std estimate has relative sd 0.5 %; sqrt(2) too large would be +41 %
    assert abs(r0["noise"].std().item() / (1.5 * 2.0 / 4.0) - 1) < 0.03


def test_functional_recipe(ranks):
    r0, r1 = ranks
    for key in ("fn_dist", "fn_manual", "fn_update"):
        _close(list(r0[key].values()), list(r0["fn_single"].values()))
        assert _bit_identical(r0[key], r1[key])
    assert _bit_identical(r0["fn_secure"], r1["fn_secure"])


@pytest.mark.parametrize("name", ["seeded", "secure"])
def test_sampler_shards_disjoint_at_rate_q(ranks, name):
    r0, r1 = ranks
    b0, b1 = r0[f"loader_{name}"], r1[f"loader_{name}"]
    assert len(b0) == len(b1) == 300
    counts = torch.zeros(60)
    for a, b in zip(b0, b1):
        assert bool((a % 2 == 0).all()) and bool((b % 2 == 1).all())  # disjoint residue classes
        counts[torch.cat([a, b])] += 1
    # each example: Binomial(300, 0.25), sd 7.5; allow 5 sd
    assert ((counts - 75).abs() < 5 * 7.5).all()
    if name == "seeded":  # the union is exactly the single-process sample of that generator
        whole = list(dp.poisson_batches(60, 0.25, 300, generator=torch.Generator().manual_seed(9)))
        assert all(torch.equal(torch.cat([a, b]).sort().values, w) for a, b, w in zip(b0, b1, whole))


def test_empty_rank_batches(ranks):
    for res in ranks:
        shapes = res["loader_tiny"]
        assert len(shapes) == 20 and (0, 3) in shapes and all(s[1:] == (3,) for s in shapes)


def test_ddp_wrapped_model_is_refused(ranks):
    for res in ranks:
        from_optimizer, without_flag, model_check, nested = res["ddp_errors"]
        for message in (from_optimizer, without_flag):
            assert message is not None and message.startswith("DPOptimizer: the model of these parameters")
            assert "DistributedDataParallel" in message and "distributed=True" in message
        assert model_check is not None and model_check.startswith("check_not_ddp: the model is wrapped")
        assert nested is not None and "submodule '0'" in nested


def test_example_runs_on_two_ranks(ranks):
    r0, r1 = (res["example"] for res in ranks)
    assert r0["world_size"] == r1["world_size"] == 2 and r0["steps"] == 3
    assert _bit_identical(r0["params"], r1["params"])
    assert r0["test_acc"] == r1["test_acc"] and 0 <= r0["test_acc"] <= 1
    assert r0["shard_examples"] > 0 and r1["shard_examples"] > 0
    q = 256 / 1437  # the example's sample rate: the GLOBAL one, as in one process
    assert r0["epsilon"] == pytest.approx(dp.epsilon(r0["sigma"], q, 3, 1e-5), rel=1e-9)


# ----------------------------------------------------------------------- in this process


def test_errors_without_a_process_group():
    assert not dist.is_initialized()
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"DPOptimizer: distributed=True but .*torch\.distributed\.init_process_group"):
        dp.DPOptimizer(torch.optim.SGD([p], lr=0.1), max_norm=1.0, noise_multiplier=1.0,
                       expected_batch_size=2, distributed=True)
    with pytest.raises(ValueError, match=r"dp_sgd_transform: distributed=True but .*init_process_group"):
        dp.dp_sgd_transform(1.0, 1.0, expected_batch_size=2, distributed=True)
    with pytest.raises(ValueError, match=r"all_reduce_sum: no torch.distributed process group .*init_process_group"):
        dp.all_reduce_sum({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="distributed must be False, True"):
        dp.DPOptimizer(torch.optim.SGD([p], lr=0.1), max_norm=1.0, noise_multiplier=1.0,
                       expected_batch_size=2, distributed="nccl")
    check_not_ddp(torch.nn.Linear(2, 2))  # no DDP: nothing to say

