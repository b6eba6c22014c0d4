"""``scan``: a loop over the leading axis of pytrees, with ``jax.lax.scan``'s semantics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch

__all__ = ["scan", "ScanStructureError"]

_SCALARS = (bool, int, float, complex)  # Python scalars: carry leaves become 0-dim tensors


class ScanStructureError(ValueError, TypeError):
    """``f`` broke the scan's contract: it did not return a pair ``(carry, y)``, or its carry
    (or ``y``) changed pytree structure, type, shape or dtype between steps.

    Both a ``ValueError`` (what ``scan`` raised before) and a ``TypeError`` (what
    ``jax.lax.scan`` raises for the same mistakes), so either ``except`` clause catches it.
    """


def scan(
    f: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: Any = None,
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
) -> tuple[Any, Any]:
    """``scan : (c, [a]) -> (c, [b])`` given ``f : (c, a) -> (c, b)``; ``jax.lax.scan``.

    ``c`` (the carry), ``a`` (one slice of ``xs``) and ``b`` (one output) are pytrees of
    tensors; ``[a]`` is the same pytree with every leaf stacked along a new leading axis of
    size ``T``. ``scan`` behaves as this reference loop (``tests/test_scan.py`` uses it as
    the oracle for values, gradients and vmap)::

        def scan(f, init, xs=None, length=None, reverse=False, unroll=1):
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

    Python scalars in the carry (as JAX's weak types): a leaf of ``init`` that is a Python
    ``bool``, ``int``, ``float`` or ``complex`` becomes a 0-dim tensor (``torch.as_tensor``:
    int64, the default float dtype, bool, the default complex dtype), so
    ``scan(lambda c, x: (c + x, c + x), 0, xs)`` works. Its dtype is not fixed until the
    first step: if ``f`` returns a 0-dim tensor of a dtype that the scalar's dtype promotes
    to (``torch.promote_types``; e.g. int64 -> float32 when ``xs`` is float32), the carry
    takes that dtype from then on, as ``jax.lax.scan`` promotes a weakly typed ``init``;
    any other change (a demotion such as float -> int, or a shape change) is an error.
    Unlike JAX, which re-traces ``f`` with the promoted carry, the first step runs on the
    unpromoted tensor (the same numbers unless ``f`` does integer-only arithmetic on it),
    except where the promoted dtype holds the scalar's value more exactly than the
    unpromoted one (``0.1`` is read as float32, then the carry becomes float64): then the
    first step runs again on the exact value in the promoted dtype (``f`` is called twice
    for it), so the result is JAX's, not float32's rounding of ``0.1``.
    A Python scalar that ``f`` returns for a 0-dim tensor leaf of the carry is converted
    to that leaf's dtype when the dtype can hold it (``torch.result_type``), else it is an
    error. Other non-tensor leaves (strings, objects) are carried as they are, but must
    stay non-tensors.

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
        unroll: accepted for ``jax.lax.scan`` compatibility: an int ``>= 1`` or a bool.
            In JAX it sets how many steps one compiled loop iteration runs; this loop is
            eager Python, so it changes nothing here (results are identical).

    Returns:
        ``(carry, ys)``: the final carry, and the ``y``'s stacked along a new dim 0, so
        every leaf of ``ys`` is shaped ``[T, *y_leaf.shape]``.

    Raises:
        ValueError: when ``xs`` has a leaf that is not a tensor of dim >= 1, its leaves
            disagree on the leading size, ``length`` contradicts it, neither ``xs`` nor
            ``length`` gives ``T``, or ``unroll`` is an int below 1.
        TypeError: when ``unroll`` is neither an int nor a bool.
        ScanStructureError: (a ``ValueError`` and a ``TypeError``) when ``f`` does not
            return a pair, or the carry (or ``y``) changes structure, type, shape or dtype
            between steps (the message names the leaf and both shapes/dtypes).

    Example:
        >>> cumsum = lambda c, x: (c + x, c + x)
        >>> scan(cumsum, torch.tensor(0.0), torch.arange(4.0))
        (tensor(6.), tensor([0., 1., 3., 6.]))
        >>> scan(cumsum, 0, torch.arange(4.0))  # a Python scalar carry, promoted to float
        (tensor(6.), tensor([0., 1., 3., 6.]))
    """
    _check_unroll(unroll)
    x_paths, x_leaves, x_spec = optree.tree_flatten_with_path(xs)
    n = _scan_length(x_paths, x_leaves, length)
    init_paths, init_leaves, init_spec = optree.tree_flatten_with_path(init)
    weak = [isinstance(leaf, _SCALARS) for leaf in init_leaves]
    scalars = list(init_leaves)  # the Python values of the weakly typed leaves
    if any(weak):
        init_leaves = [torch.as_tensor(v) if w else v for v, w in zip(init_leaves, weak)]
        init = optree.tree_unflatten(init_spec, init_leaves)
    ref = list(init_leaves)  # what each carry leaf must look like (type, shape, dtype)
    carry_names = [_name("carry", path) for path in init_paths]

    def settle_carry(carry: Any, t: int | str) -> Any:
        """Checks f's carry against ``ref``; returns it with scalars made tensors."""
        leaves, spec = optree.tree_flatten(carry)
        if spec != init_spec:
            raise ScanStructureError(
                f"scan: f changed the structure of the carry at step {t}: init has "
                f"structure {init_spec} but f returned {spec}; f must return a carry with "
                "the same pytree structure as init"
            )
        changed = False
        for i, (name, old, new) in enumerate(zip(carry_names, ref, leaves)):
            if isinstance(old, torch.Tensor) and isinstance(new, _SCALARS):
                new = torch.as_tensor(new) if weak[i] else _scalar_to(old, new)
                leaves[i], changed = new, True
            if weak[i] and isinstance(new, torch.Tensor) and new.dtype != old.dtype:
                if (
                    new.shape == old.shape
                    and torch.promote_types(old.dtype, new.dtype) == new.dtype
                ):
                    old = ref[i] = new  # the weakly typed scalar takes f's dtype
            if _signature(old) != _signature(new):
                _check_leaf(name, old, new, t, "init", "f returned")
        weak[:] = [False] * len(weak)  # dtypes are fixed after the first step
        return optree.tree_unflatten(init_spec, leaves) if changed else carry

    if n == 0:
        probe = optree.tree_unflatten(x_spec, [leaf.new_zeros(leaf.shape[1:]) for leaf in x_leaves])
        with torch.no_grad():
            carry, y = _call(f, init, probe)
        settle_carry(carry, "(the length-0 probe)")
        if any(r is not v for r, v in zip(ref, init_leaves)):  # promoted scalar leaves
            init = _promoted_init(init_spec, init_leaves, ref, scalars)
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
        first = y_spec is None
        carry = settle_carry(carry, f"t={t}")
        if first and _lossy(init_leaves, ref, scalars):
            # a Python scalar promoted to a dtype that holds its value more exactly than the
            # tensor this step read (0.1 read as float32, carried as float64): the step again
            # on the exact value in the promoted dtype, as JAX traces f again
            carry, y = _call(f, _promoted_init(init_spec, init_leaves, ref, scalars), x)
            carry = settle_carry(carry, f"t={t}")
        leaves, spec = optree.tree_flatten(y)
        leaves = [_as_tensor(leaf) for leaf in leaves]
        if y_spec is None:
            y_spec, first_y, y_sig = spec, leaves, [_signature(leaf) for leaf in leaves]
        elif spec != y_spec:
            raise ScanStructureError(
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


def _promoted_init(spec: Any, leaves: list[Any], ref: list[Any], scalars: list[Any]) -> Any:
    """``init`` with every promoted weakly typed leaf made again from its Python value in the
    promoted dtype (exact: not a cast of the rounded tensor first made from it)."""
    return optree.tree_unflatten(spec, [
        torch.as_tensor(v, dtype=r.dtype, device=r.device) if _promoted(leaf, r, v) else leaf
        for leaf, r, v in zip(leaves, ref, scalars)
    ])


def _promoted(leaf: Any, r: Any, v: Any) -> bool:
    """Whether init leaf ``leaf``, made from the Python scalar ``v``, was promoted to the
    dtype of the carry ``r`` that ``f`` returned."""
    return isinstance(v, _SCALARS) and isinstance(r, torch.Tensor) and r.dtype != leaf.dtype


def _lossy(leaves: list[Any], ref: list[Any], scalars: list[Any]) -> bool:
    """Whether a promoted weakly typed leaf's value differs between the tensor the first
    step read (cast to the promoted dtype) and the Python value made in that dtype."""
    for leaf, r, v in zip(leaves, ref, scalars):
        if _promoted(leaf, r, v):
            exact, read = torch.as_tensor(v, dtype=r.dtype), leaf.to(r.dtype)
            if not bool((exact == read) | (exact.isnan() & read.isnan())):
                return True
    return False


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


def _check_unroll(unroll: Any) -> None:
    if isinstance(unroll, bool):
        return
    if not isinstance(unroll, int):
        raise TypeError(
            f"scan: unroll must be an int >= 1 or a bool (as in jax.lax.scan), got "
            f"{type(unroll).__name__} {unroll!r}; it changes nothing in this eager loop"
        )
    if unroll < 1:
        raise ValueError(
            f"scan: unroll must be an int >= 1 or a bool (as in jax.lax.scan), got {unroll}"
        )


def _scalar_to(old: torch.Tensor, new: Any) -> Any:
    """A Python scalar ``f`` returned for the 0-dim tensor leaf ``old``, as ``old``'s dtype."""
    if old.dim() == 0 and torch.result_type(old, new) == old.dtype:
        return torch.as_tensor(new, dtype=old.dtype, device=old.device)
    return new  # left as a scalar: _check_leaf reports it


def _call(f: Callable[[Any, Any], Any], carry: Any, x: Any) -> tuple[Any, Any]:
    out = f(carry, x)
    if not isinstance(out, tuple) or len(out) != 2:
        raise ScanStructureError(
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
        detail = f" of shape {tuple(old.shape)} dtype {old.dtype}" if old_t and old.dim() else ""
        raise ScanStructureError(
            f"scan: {name} at step {t}: {old_what} has a {type(old).__name__}{detail} but "
            f"{new_what} a {type(new).__name__} {new!r}; the leaf must keep its type (a "
            "Python number is accepted only for a 0-dim tensor whose dtype can hold it)"
        )
    if old.shape != new.shape or old.dtype != new.dtype:
        raise ScanStructureError(
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
