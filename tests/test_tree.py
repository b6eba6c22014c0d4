import pytest
import torch

from psgfunc import _tree


def test_batch_size_nested_and_mismatch():
    batch = ({"x": torch.zeros(3, 2), "ids": torch.zeros(3, dtype=torch.long)}, [torch.zeros(3)])
    assert _tree.batch_size(*batch) == 3
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        _tree.batch_size({"x": torch.zeros(3, 2)}, torch.zeros(4))


def test_batch_size_needs_a_batch_dim_and_a_tensor():
    with pytest.raises(ValueError, match="no batch dimension"):
        _tree.batch_size(torch.tensor(1.0))
    with pytest.raises(ValueError, match="no tensor leaves"):
        _tree.batch_size({"a": 1})


def test_stack_unstack_roundtrip():
    trees = [{"a": torch.full((2,), float(i)), "b": (torch.tensor(float(i)),)} for i in range(3)]
    stacked = _tree.tree_stack(trees)
    assert stacked["a"].shape == (3, 2) and stacked["b"][0].shape == (3,)
    back = _tree.tree_unstack(stacked)
    for t, u in zip(trees, back):
        assert torch.equal(t["a"], u["a"]) and torch.equal(t["b"][0], u["b"][0])
    with pytest.raises(ValueError):
        _tree.tree_stack([])


def test_tree_map_several_trees_and_structure_error():
    out = _tree.tree_map(lambda a, b: a + b, {"x": torch.ones(2)}, {"x": torch.ones(2)})
    assert torch.equal(out["x"], torch.full((2,), 2.0))
    with pytest.raises(ValueError, match="structure"):
        _tree.tree_map(lambda a, b: a, {"x": torch.ones(1)}, {"y": torch.ones(1)})


def test_per_example_norms_by_hand():
    grads = {"w": torch.tensor([[3.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([[4.0], [0.0]])}
    assert torch.equal(_tree.per_example_norms(grads), torch.tensor([5.0, 0.0]))


def _roundings(dtype, k, one_pass):
    """The roundings (in the accumulation dtype) of ``accurate_sq_norms`` on rows of ``k``,
    counted from its algorithm: ``k`` squares and additions, then the norm's square root
    (2, squared) and its square (1); longer rows: the ``block`` squares and additions and
    the square root of each block, then the sum of the blocks' squares (a product and an
    addition each; beyond 128 blocks added in float64, which for float32 rows stays below
    one float32 rounding, then rounded back) and the tail's addition."""
    if k <= max(one_pass, _tree._SQ_BLOCK):
        return k + 3
    block = _tree._block(k, one_pass)
    parts, tail = k // block, k % block
    if parts <= _tree._SQ_BLOCK or dtype == torch.float64:
        second = parts
    else:
        second = 3  # the square, the float64 sum (below one float32 rounding), back to float32
    return block + 2 + second + (tail > 0)


KS = [*range(1, 40), 127, 128, 129, 255, 256, 257, 509, 511, 512, 513, 521, 640, 1021, 1024,
      3072, 4093, 4096, 16384, 16512, 2**18, 2**18 + 7, 2**20, 10**8 + 7]


ONE_PASS = [128, _tree.FAST_ONE_PASS]  # dense clipping's default; the fast kinds' (_kinds.sq_norms)


@pytest.mark.parametrize("one_pass", ONE_PASS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_sq_norm_rel_counts_every_rounding_of_accurate_sq_norms(dtype, one_pass):
    """Reproducer: float64 rows of more than 128 blocks (k > 16384: a materialised float64
    embedding table's gradient) were bounded by gamma_133 while their block sums are added
    in float64 too (2047 more roundings at k = 2^18)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for k in KS:
        assert _tree.sq_norm_rel(dtype, k, one_pass) >= _tree.gamma(_roundings(dtype, k, one_pass), acc), k
    if dtype == torch.float64:
        with pytest.raises(ValueError, match="pass the row length k"):
            _tree.sq_norm_rel(dtype, None, one_pass)
    else:
        assert _tree.sq_norm_rel(dtype, None, one_pass) >= max(_tree.sq_norm_rel(dtype, k, one_pass) for k in KS)


def _adversarial_rows(k, dtype, gen):
    """``[5, k]``: random, all equal, one large element among tiny ones, squares that round
    down, and values near the largest of ``dtype`` (half precision: its squares still
    fit float32)."""
    big = 6e4 if dtype == torch.float16 else 1.0
    rows = [
        torch.randn(k, generator=gen, dtype=torch.float64),
        torch.full((k,), 1 / 3, dtype=torch.float64),
        torch.cat([torch.ones(1, dtype=torch.float64), 1e-3 * torch.rand(k - 1, generator=gen, dtype=torch.float64)]),
        torch.full((k,), 1 + 2**-12 + 2**-13, dtype=torch.float64),
        big * (1 - torch.rand(k, generator=gen, dtype=torch.float64) / 4),
    ]
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("one_pass", ONE_PASS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_accurate_sq_norms_within_sq_norm_rel(dtype, one_pass):
    """Against the exact squared norms (float64 for the narrower dtypes, whose squares it
    holds exactly; exact rationals for float64) on adversarial rows, every row length
    around the one-pass and block limits."""
    from fractions import Fraction

    gen = torch.Generator().manual_seed(0)
    for k in [1, 2, 3, 7, 100, 128, 129, 300, 511, 512, 513, 521, 1024, 1031, 4096]:
        t = _adversarial_rows(k, dtype, gen)
        got = _tree.accurate_sq_norms(t, one_pass).double()
        if dtype == torch.float64:
            exact = [sum(Fraction(v) ** 2 for v in row.tolist()) for row in t]
            err = [abs(Fraction(float(g)) - e) / e for g, e in zip(got, exact)]
        else:
            exact = t.double().square().sum(1)
            err = ((got - exact).abs() / exact).tolist()
        assert max(err) <= _tree.sq_norm_rel(dtype, k, one_pass), k


def test_dense_clipping_norms_stay_within_its_tolerance():
    """``psgfunc.dp.clip`` adds no slack for float32 leaves: its norms (the default
    ``one_pass``) must be accurate to well inside its ``C (1 + 1e-5)`` for every row length,
    which the fast kinds' one-pass rows of 512 (3e-5 on squares) are not."""
    assert max(_tree.sq_norm_rel(torch.float32, k) for k in KS) <= 2e-5
    assert _tree.sq_norm_rel(torch.float32, 512, _tree.FAST_ONE_PASS) > 2e-5
