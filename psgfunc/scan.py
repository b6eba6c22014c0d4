"""``scan``: a loop over the leading axis of pytrees, with ``jax.lax.scan``'s semantics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch

__all__ = ["scan"]


def scan(
    f: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: Any = None,
    length: int | None = None,
    reverse: bool = False,
) -> tuple[Any, Any]:
    """``scan : (c, [a]) -> (c, [b])`` given ``f : (c, a) -> (c, b)``; ``jax.lax.scan``.

    ``c`` (the carry), ``a`` (one slice of ``xs``) and ``b`` (one output) are pytrees of
    tensors; ``[a]`` is the same pytree with every leaf stacked along a new leading axis of
    size ``T``. ``scan`` behaves as this reference loop (``tests/test_scan.py`` uses it as
    the oracle for values, gradients and vmap)::

        def scan(f, init, xs=None, length=None, reverse=False):
            T = length if xs is None else leading size of xs's leaves
            carry, ys = init, []
            for t in (reversed(range(T)) if reverse else range(T)):
                x = None if xs is None else tree_map(lambda leaf: leaf[t], xs)
                carry, y = f(carry, x)
                ys.append(y)
            if reverse:
                ys = ys[::-1]                      # ys[t] always belongs to xs[t]
            return carry, tree_map(lambda *leaves: torch.stack(leaves), *ys)

    It is a plain Python loop (no compilation, no ``torch._higher_order_ops``), so it
    composes with ``torch.func.vmap``, ``torch.func.grad``, ``torch.func.functional_call``
    and ordinary autograd, and ``f`` may have any Python side effects.

    Pytrees are optree's (dicts, lists, tuples, namedtuples; ``None`` is an empty subtree,
    not a leaf). So ``y`` may be ``None`` (then ``ys`` is ``None``) or contain ``None``
    (kept in place in ``ys``). Non-tensor leaves of ``y`` (Python numbers) are converted
    with ``torch.as_tensor`` before stacking.

    Length 0: ``ys`` still needs each output's shape and dtype, which only ``f`` knows
    (JAX traces ``f`` once for this). ``scan`` therefore calls ``f`` once, under
    ``torch.no_grad()``, on a probe: ``init`` and a slice of zeros shaped like one element
    of ``xs`` (``None`` when ``xs`` is ``None``). The probe's carry is checked like any
    step's and then discarded; ``init`` is returned unchanged and every leaf of ``ys`` is
    empty, shaped ``[0, *y_leaf.shape]``. Any side effect of ``f`` happens once for
    this probe, and ``f`` must accept zeros as input.

    Args:
        f: ``f(carry, x) -> (carry, y)``. The returned carry must have the structure of
            ``init`` and, leaf by leaf, the same shape and dtype; ``y`` must have the same
            structure, shapes and dtypes at every step.
        init: the initial carry, a pytree (may be ``None`` or empty).
        xs: pytree whose tensor leaves all share the leading size ``T``, or ``None``.
        length: ``T``; required when ``xs`` is ``None`` or has no leaves, otherwise it
            must equal the leading size of ``xs``'s leaves.
        reverse: scan from ``t = T - 1`` down to ``0``. ``ys`` is still returned in the
            order of ``xs`` (``ys[t]`` is the output of the step that saw ``xs[t]``).

    Returns:
        ``(carry, ys)``: the final carry, and the ``y``'s stacked along a new dim 0, so
        every leaf of ``ys`` is shaped ``[T, *y_leaf.shape]``.

    Raises:
        ValueError: when ``xs`` has a leaf that is not a tensor of dim >= 1, its leaves
            disagree on the leading size, ``length`` contradicts it, neither ``xs`` nor
            ``length`` gives ``T``, or the carry (or ``y``) changes structure, shape or
            dtype between steps (the message names the leaf and both shapes/dtypes).

    Example:
        >>> cumsum = lambda c, x: (c + x, c + x)
        >>> scan(cumsum, torch.tensor(0.0), torch.arange(4.0))
        (tensor(6.), tensor([0., 1., 3., 6.]))
    """
    x_paths, x_leaves, x_spec = optree.tree_flatten_with_path(xs)
    n = _scan_length(x_paths, x_leaves, length)
    init_paths, init_leaves, init_spec = optree.tree_flatten_with_path(init)
    init_sig = [_signature(leaf) for leaf in init_leaves]

    def check_carry(carry: Any, t: int | str) -> None:
        leaves, spec = optree.tree_flatten(carry)
        if spec != init_spec:
            raise ValueError(
                f"scan: f changed the structure of the carry at step {t}: init has "
                f"structure {init_spec} but f returned {spec}; f must return a carry with "
                "the same pytree structure as init"
            )
        if [_signature(leaf) for leaf in leaves] != init_sig:
            for path, old, new in zip(init_paths, init_leaves, leaves):
                _check_leaf(_name("carry", path), old, new, t, "init", "f returned")

    if n == 0:
        probe = optree.tree_unflatten(x_spec, [leaf.new_zeros(leaf.shape[1:]) for leaf in x_leaves])
        with torch.no_grad():
            carry, y = _call(f, init, probe)
        check_carry(carry, "(the length-0 probe)")
        y_leaves, y_spec = optree.tree_flatten(y)
        empty = [_as_tensor(leaf).unsqueeze(0)[:0] for leaf in y_leaves]
        return init, optree.tree_unflatten(y_spec, empty)

    slices = [leaf.unbind(0) for leaf in x_leaves]
    carry = init
    outputs: list[list[torch.Tensor]] = [[] for _ in range(n)]
    y_spec = None
    first_y: list[torch.Tensor] = []
    y_sig: list[Any] = []
    order = range(n - 1, -1, -1) if reverse else range(n)
    for t in order:
        x = optree.tree_unflatten(x_spec, [s[t] for s in slices])
        carry, y = _call(f, carry, x)
        check_carry(carry, f"t={t}")
        leaves, spec = optree.tree_flatten(y)
        leaves = [_as_tensor(leaf) for leaf in leaves]
        if y_spec is None:
            y_spec, first_y, y_sig = spec, leaves, [_signature(leaf) for leaf in leaves]
        elif spec != y_spec:
            raise ValueError(
                f"scan: f changed the structure of its output y at step t={t}: it was "
                f"{y_spec} at the first step but is {spec}; y must keep one structure"
            )
        elif [_signature(leaf) for leaf in leaves] != y_sig:
            y_paths = optree.tree_paths(y)
            for path, old, new in zip(y_paths, first_y, leaves):
                _check_leaf(_name("y", path), old, new, f"t={t}", "the first step", "this step")
        outputs[t] = leaves
    ys = [torch.stack([outputs[t][i] for t in range(n)]) for i in range(len(first_y))]
    return carry, optree.tree_unflatten(y_spec, ys)


def _scan_length(paths: list[Any], leaves: list[Any], length: int | None) -> int:
    """``T`` from the leaves of ``xs`` and ``length``, with the checks of :func:`scan`."""
    sizes: list[tuple[str, int]] = []
    for path, leaf in zip(paths, leaves):
        name = _name("xs", path)
        if not isinstance(leaf, torch.Tensor):
            raise ValueError(
                f"scan: {name} is a {type(leaf).__name__}, not a tensor; every leaf of xs must "
                "be a tensor whose dim 0 is the scanned axis (wrap it with torch.as_tensor)"
            )
        if leaf.dim() == 0:
            raise ValueError(
                f"scan: {name} is a 0-dim tensor and has no leading axis to scan over; every "
                "leaf of xs must be shaped [T, ...]"
            )
        sizes.append((name, leaf.shape[0]))
    if length is not None:
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"scan: length must be an int >= 0 or None, got {length!r}")
    if not sizes:
        if length is None:
            raise ValueError(
                "scan: cannot tell the number of steps: xs is None (or has no tensor leaves) "
                "and length is None; pass length=T or an xs with leaves shaped [T, ...]"
            )
        return length
    first_name, first = sizes[0]
    for name, size in sizes[1:]:
        if size != first:
            listing = ", ".join(f"{nm}: {sz}" for nm, sz in sizes)
            raise ValueError(
                f"scan: the leaves of xs disagree on the leading (scanned) size: {first_name} "
                f"has {first} but {name} has {size} ({listing}); every leaf must be [T, ...]"
            )
    if length is not None and length != first:
        raise ValueError(
            f"scan: length={length} contradicts xs, whose leaves have leading size {first} "
            f"(e.g. {first_name}); drop length or make it equal {first}"
        )
    return first


def _call(f: Callable[[Any, Any], Any], carry: Any, x: Any) -> tuple[Any, Any]:
    out = f(carry, x)
    if not isinstance(out, tuple) or len(out) != 2:
        raise ValueError(
            "scan: f must return a pair (carry, y), got "
            f"{type(out).__name__}{f' of length {len(out)}' if isinstance(out, tuple) else ''}"
        )
    return out


def _check_leaf(name: str, old: Any, new: Any, t: str, old_what: str, new_what: str) -> None:
    """Raise if ``new`` differs from ``old`` in tensor-ness, shape or dtype."""
    old_t, new_t = isinstance(old, torch.Tensor), isinstance(new, torch.Tensor)
    if not old_t and not new_t:
        return
    if old_t != new_t:
        raise ValueError(
            f"scan: {name} at step {t}: {old_what} has a {type(old).__name__} but "
            f"{new_what} a {type(new).__name__}; the leaf must keep its type"
        )
    if old.shape != new.shape or old.dtype != new.dtype:
        raise ValueError(
            f"scan: {name} changed at step {t}: {old_what} has shape {tuple(old.shape)} "
            f"dtype {old.dtype} but {new_what} shape {tuple(new.shape)} dtype {new.dtype}; "
            "f must keep every leaf's shape and dtype (cast or reshape inside f)"
        )


def _signature(leaf: Any) -> Any:
    """What must not change between steps: shape and dtype of a tensor, else nothing."""
    return (leaf.shape, leaf.dtype) if isinstance(leaf, torch.Tensor) else None


def _as_tensor(leaf: Any) -> torch.Tensor:
    return leaf if isinstance(leaf, torch.Tensor) else torch.as_tensor(leaf)


def _name(root: str, path: tuple[Any, ...]) -> str:
    return root + "".join(f"[{p!r}]" for p in path)
