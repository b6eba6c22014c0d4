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
