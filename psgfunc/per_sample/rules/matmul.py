"""Per-sample rules for torch's contractions and elementwise ops with a parameter operand.

Plain torch models (HF ``Conv1D``'s ``addmm``, ``x @ W``, ``einsum``, ``weight * x`` in a
hand-written RMSNorm, LayerScale's ``gamma * x``) use parameters outside psgfunc's layers.
:mod:`psgfunc.per_sample._torch_ops` hands those calls here while ``fn`` runs.

* :data:`CONTRACT`: a two-operand contraction ``y = einsum(a, w -> y)(x, W)`` with ``W`` a
  parameter. Indices of ``W`` split into ``I`` (shared with ``x``, summed) and ``O`` (kept in
  ``y``); indices of ``x`` and ``y`` alone are positions ``N``. Then ``x`` reshaped to
  ``[B, N, I]``, ``y = x W_{IO}`` and example b's gradient is ``sum_n x_bn^T g_bn`` (an
  :class:`~psgfunc.per_sample._kinds.Outer` kind: norms in Gram form, the clipped sum in one
  matmul), laid out in ``W``'s own index order. ``matmul``/``mm``/``addmm``/``bmm`` are written
  as such contractions. An index in all three operands (``S``: a group, e.g. the head of
  ``einsum("bhtd,hde->bhte")`` or the batch of ``bmm(x, W)`` with ``W [G, K, N]``) makes the
  weight block diagonal in it: ``x`` is reshaped to ``[B, S, N, I]``, ``y_s = x_s W_s`` and
  example b's gradient is ``sum_n x_bsn^T g_bsn`` for each group (a :class:`GroupedOuter`
  kind: the squared norm is the sum over the groups of their Gram norms). A repeated index
  has no such form: the caller falls back to vmap.
* :data:`ELEMENTWISE`: a broadcasting elementwise op (``mul``, ``add``, ``sub``, ``div``)
  with a parameter ``p``. The op runs on the batch with ``p`` expanded to the op's
  broadcast shape (a view), so autograd leaves example b's gradient unreduced (``g`` times
  the op's partial derivative at every position); the rule sums it over the broadcast dims
  with the bound of that sum's rounding and emits a
  :class:`~psgfunc.per_sample._kinds.SummedRows` of one position: the same kind as
  LayerNorm's affine parameters, so the pieces of several uses combine.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import torch

from psgfunc._tree import gamma
from psgfunc.functional import _autocast
from psgfunc.per_sample._expanded import Rule, apply_function, is_shared, shared
from psgfunc.per_sample._kinds import (
    COMBINERS,
    F64,
    GradKind,
    NormBound,
    Outer,
    RowSum,
    SummedRows,
    _acc,
    _as,
    _up,
    emit,
    gram_bound,
    gram_of,
    outer_bound,
    presum,
    summed_rows,
)

__all__ = ["ContractPlan", "contract_plan", "CONTRACT", "ELEMENTWISE", "PermutedOuter", "GroupedOuter"]

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXY"  # "Z" is the batch


class PermutedOuter(Outer):
    """``Outer`` whose ``[B, *shape]`` result is then permuted by ``perm`` (a weight whose
    ``I`` and ``O`` indices interleave). Norms are the ``Outer`` ones (a permutation keeps them)."""

    def __init__(self, shape: tuple[int, ...], perm: tuple[int, ...]):
        super().__init__(shape)
        self.perm = perm

    def materialize(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return super().materialize(g, x).permute(0, *(1 + d for d in self.perm))

    def weighted_sum(self, datas: Any, c: torch.Tensor) -> torch.Tensor:
        return super().weighted_sum(datas, c).permute(*self.perm)


class GroupedOuter(GradKind):
    """``grad_b[s] = sum_n u[b, s, n]^T v[b, s, n]`` for every group ``s`` (a weight block
    diagonal in an index that the input, the weight and the output share): data
    ``(u [B, S, N, P], v [B, S, N, Q])`` -> ``[B, S, P, Q]``, reshaped to ``shape`` and then
    permuted by ``perm`` (None: kept) into the weight's own index order.

    The groups' gradients are disjoint blocks, so ``|grad_b|^2 = sum_s |grad_b[s]|^2``: each
    block is an :class:`~psgfunc.per_sample._kinds.Outer` gradient of ``N`` positions, normed
    by ``outer_bound`` on the ``B * S`` blocks (the Gram form when ``N (P + Q) < P Q``, with
    its rounding bound and float64 Grams for cancelling blocks), whose bounds then add up
    per example (:func:`_per_example`). The weighted sum is one batched matmul over the
    groups, ``[S, P, B*N] @ [S, B*N, Q]``: per block the same sum of products as ``Outer``'s.
    """

    def __init__(self, shape: tuple[int, ...], perm: tuple[int, ...] | None = None):
        self.shape, self.perm = tuple(shape), perm

    def _layout(self, t: torch.Tensor, lead: int) -> torch.Tensor:
        """``[*lead, S, P, Q] -> [*lead, *shape]`` in the weight's index order."""
        t = t.reshape(*t.shape[:lead], *self.shape)
        return t if self.perm is None else t.permute(*range(lead), *(lead + d for d in self.perm))

    def materialize(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._layout(torch.matmul(u.transpose(2, 3), v), 1)

    def prefers_dense(self, datas: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        n = sum(d[0].shape[2] for d in datas)
        p, q = datas[0][0].shape[3], datas[0][1].shape[3]
        return n > 1 and n * (p + q) >= p * q

    def bound(self, datas: Sequence[tuple[torch.Tensor, torch.Tensor]], cache: dict | None = None) -> NormBound:
        u = datas[0][0] if len(datas) == 1 else torch.cat([d[0] for d in datas], dim=2)
        v = datas[0][1] if len(datas) == 1 else torch.cat([d[1] for d in datas], dim=2)
        size, groups, n, p = u.shape
        q = v.shape[3]
        # the [B*S, N, *] blocks are (mostly) copies, new tensors: nothing to share by identity
        blocks = outer_bound(u.reshape(size * groups, n, p), v.reshape(size * groups, n, q), len(datas), None,
                             n * (p + q) < p * q)
        return _per_example(blocks, size, groups)

    def weighted_sum(self, datas: Sequence[tuple[torch.Tensor, torch.Tensor]], c: torch.Tensor) -> torch.Tensor:
        total = None
        for u, v in datas:
            out = u.dtype
            scaled = _up(u) * _as(c, _acc(out)).reshape(-1, 1, 1, 1)
            # [S, P, B*N] @ [S, B*N, Q]: each block's sum over the examples' positions
            s = torch.bmm(scaled.permute(1, 3, 0, 2).reshape(u.shape[1], u.shape[3], -1),
                          _up(v).transpose(0, 1).reshape(v.shape[1], -1, v.shape[3]))
            total = s if total is None else total + s
        total = total if total.dtype == out else total.to(out)
        return self._layout(total, 0)


def _per_example(blocks: NormBound, size: int, groups: int) -> NormBound:
    """The :class:`NormBound` of ``B`` examples from that of their ``B * S`` disjoint blocks
    (example-major): squared norms and their bounds add up, the weighted sum's error bounds
    add up in quadrature (the blocks' errors lie in disjoint coordinates). The float sums of
    ``S`` nonnegative terms round down by at most ``gamma_S`` relatively: the scales say so."""
    dtype = blocks.sq.dtype

    def fold(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(size, groups).sum(1)

    err = None if blocks.err is None else blocks.err.reshape(size, groups).square().sum(1).sqrt()
    refine = None
    if blocks.refine is not None:
        finer = blocks.refine

        def refine(total_sq: torch.Tensor) -> NormBound:  # each block against its example's norm
            return _per_example(finer(total_sq.repeat_interleave(groups)), size, groups)

    return NormBound(
        fold(blocks.sq), fold(blocks.hi2), err, blocks.hi_scale * (1 + gamma(groups + 1, dtype)),
        blocks.err_scale * (1 + gamma(groups + 3, dtype)), fold(blocks.unc), refine,
    )


class ContractPlan:
    """How ``einsum(f"{a},{w}->{y}")`` with a parameter ``w`` becomes ``[B, N, I] @ [I, O]``.

    With group indices ``s`` (in all three operands), ``[B, S, N, I] @ [S, I, O]``, one
    matmul per group, and a :class:`GroupedOuter` kind.

    Attributes:
        a, w, y: the per-example subscripts.
        s, n, i, o: the group, position, summed and kept index strings.
        kind: the gradient kind; ``x_first``: whether its data is ``(x, g)`` (else ``(g, x)``).
    """

    def __init__(self, a: str, w: str, y: str, w_shape: Sequence[int]):
        self.a, self.w, self.y = a, w, y
        self.s = "".join(c for c in w if c in a and c in y)
        self.n = "".join(c for c in a if c in y and c not in w)
        self.i = "".join(c for c in w if c in a and c not in y)
        self.o = "".join(c for c in w if c in y and c not in a)
        sizes = dict(zip(w, w_shape))
        self.s_sizes = [sizes[c] for c in self.s]
        self.i_sizes = [sizes[c] for c in self.i]
        self.o_sizes = [sizes[c] for c in self.o]
        self.w_shape = tuple(w_shape)
        self.w_perm = tuple(w.index(c) for c in self.s + self.i + self.o)  # w -> [S..., I..., O...]
        if self.s:
            self._grouped()
            return
        two_d = len(w) == 2
        if w == self.i + self.o:  # gradient [I..., O...] = x^T g
            self.x_first, self.kind = True, Outer(None if two_d else self.w_shape)
        elif w == self.o + self.i:  # gradient [O..., I...] = g^T x (nn.Linear's layout)
            self.x_first, self.kind = False, Outer(None if two_d else self.w_shape)
        else:
            order = self.i + self.o
            inverse = tuple(order.index(c) for c in w)
            self.x_first = True
            self.kind = PermutedOuter(tuple(self.i_sizes + self.o_sizes), inverse)

    def _grouped(self) -> None:
        s, i, o, w = self.s, self.i, self.o, self.w
        if w == s + i + o:  # gradient [S..., I..., O...]: x^T g per group
            self.x_first, self.kind = True, GroupedOuter(self.w_shape)
        elif w == s + o + i:  # [S..., O..., I...]: g^T x per group (bmm(W, x)'s layout)
            self.x_first, self.kind = False, GroupedOuter(self.w_shape)
        else:
            order = s + i + o
            inverse = tuple(order.index(c) for c in w)
            self.x_first = True
            self.kind = GroupedOuter(tuple(self.s_sizes + self.i_sizes + self.o_sizes), inverse)


@functools.lru_cache(maxsize=256)
def contract_plan(a: str, w: str, y: str, w_shape: tuple[int, ...]) -> ContractPlan | None:
    """The plan for ``einsum(f"{a},{w}->{y}")``, or None when it has no (grouped) Outer form."""
    if len(set(a)) != len(a) or len(set(w)) != len(w) or len(set(y)) != len(y):
        return None  # a diagonal
    if any(c not in a and c not in y for c in w):
        return None  # a weight index summed on its own
    if any(c not in a and c not in w for c in y):
        return None
    if len(w) != len(w_shape):
        return None
    return ContractPlan(a, w, y, w_shape)


def _weight_matrix(w: torch.Tensor, plan: ContractPlan) -> torch.Tensor:
    """The shared ``W`` as ``[I, O]``, or ``[S, I, O]`` with groups (``w`` unbatched)."""
    mat = (math.prod(plan.i_sizes), math.prod(plan.o_sizes))
    return w.permute(*plan.w_perm).reshape(*((math.prod(plan.s_sizes),) if plan.s else ()), *mat)


def _grouped_mm(x: torch.Tensor, wm: torch.Tensor) -> torch.Tensor:
    """``[B, S, N, I] @ [S, I, O] -> [B, S, N, O]``: one ``bmm`` over the groups, the shared
    ``wm`` read once (``torch.matmul`` would broadcast it to ``B`` copies)."""
    size, groups, n, i = x.shape
    out = torch.bmm(x.transpose(0, 1).reshape(groups, size * n, i), wm)
    return out.view(groups, size, n, wm.shape[2]).transpose(0, 1)


def _contract(x: torch.Tensor, wm: torch.Tensor, b: torch.Tensor | None, plan: ContractPlan) -> torch.Tensor:
    """``x [B, N, I] @ wm [I, O] (+ b [O]) -> [B, N, O]`` (groups: :func:`_grouped_mm`)."""
    if plan.s:
        return _grouped_mm(x, wm)
    if b is None:
        return x @ wm
    return torch.addmm(b, x.reshape(-1, x.shape[-1]), wm).reshape(*x.shape[:-1], wm.shape[1])


class _ContractPerSample(torch.autograd.Function):
    """``x [B, N, I], w [B, *w] (shared), b [B, O] or None -> [B, N, O]`` with per-sample grads
    (with groups: ``x [B, S, N, I] -> [B, S, N, O]``, no bias)."""

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, plan: ContractPlan) -> torch.Tensor:  # type: ignore[override]
        # autocast: x is in its dtype already (the caller casts it), the shared weight and
        # bias are cast here, as autocast casts a matmul's operands
        dtype = _autocast.autocast_dtype(x)
        if dtype is None:  # (no context manager: a small layer's step pays per call)
            return _contract(x, _weight_matrix(shared(w), plan), None if b is None else shared(b), plan)
        with _autocast.disabled(x):
            wm = _autocast.cast(_weight_matrix(shared(w), plan), dtype)
            return _contract(x, wm, None if b is None else _autocast.cast(shared(b), dtype), plan)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, w, b, plan = inputs
        ctx.save_for_backward(x, w)
        # the expanded params by identity for emit too: a saved tensor may come back from
        # saved-tensor hooks (checkpoint, offloading) as another object, without its Collector
        ctx.plan, ctx.weight, ctx.bias = plan, w, b

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x, w = ctx.saved_tensors
        plan = ctx.plan
        gx = None
        if ctx.needs_input_grad[0]:
            wm = _as(_weight_matrix(shared(w), plan), g.dtype)  # autocast: in g's dtype
            gx = _grouped_mm(g, wm.transpose(1, 2)) if plan.s else g @ wm.t()
        gw = gb = None
        if ctx.needs_input_grad[1]:
            data = (x, g) if plan.x_first else (g, x)
            gw = emit(ctx.weight, plan.kind, *data)
        if ctx.bias is not None and ctx.needs_input_grad[2]:
            gb = emit(ctx.bias, _ROWSUM, g)
        return gx, gw, gb, None


_ROWSUM = RowSum()


def _plain_contract(params: dict[str, torch.Tensor], x: torch.Tensor, plan: ContractPlan) -> torch.Tensor:
    """One example: ``einsum(a, w -> y)(x, W) (+ bias over O)``."""
    y = torch.einsum(f"{plan.a},{plan.w}->{plan.y}", x, params["weight"])
    b = params.get("bias")
    return y if b is None else y + b


class ContractRule(Rule):
    """Rule of a contraction with a parameter operand (see :class:`ContractPlan`)."""

    def batched(self, params: dict[str, torch.Tensor], x: torch.Tensor, plan: ContractPlan) -> Any:
        w, b = params["weight"], params.get("bias")
        if not is_shared(w) or (b is not None and not is_shared(b)):
            return NotImplemented
        size, s = x.shape[0], plan.s
        n_sizes = [dict(zip(plan.a, x.shape[1:]))[c] for c in plan.n]
        xs = torch.einsum(f"Z{plan.a}->Z{s}{plan.n}{plan.i}", x)  # indices of x alone are summed
        groups = (math.prod(plan.s_sizes),) if s else ()
        x3 = xs.reshape(size, *groups, math.prod(n_sizes), math.prod(plan.i_sizes))
        x3 = _autocast.cast(x3, _autocast.autocast_dtype(x3))  # autocast: x in its dtype
        y3 = apply_function(_ContractPerSample, x3, w, b, plan)
        y = y3.reshape(size, *plan.s_sizes, *n_sizes, *plan.o_sizes)
        return torch.einsum(f"Z{s}{plan.n}{plan.o}->Z{plan.y}", y)

    vmapped = batched

    def tapped(self, tap: Any, params: dict[str, torch.Tensor], x: torch.Tensor, plan: ContractPlan) -> Any:
        """One example with ``W`` (and the bias) detached; the pieces are :meth:`batched`'s:
        ``x`` as ``[B, N, I]`` and the output gradient as ``[B, N, O]`` in ``plan.kind``."""
        w, b = params["weight"], params.get("bias")
        iw, ib = tap.index(w), tap.index(b)
        if iw is None or (b is not None and ib is None) or x.dim() != len(plan.a) or plan.s:
            return NotImplemented  # grouped plans (bmm, per-head einsum): the leaf is materialised
        detached = {"weight": w.detach()} if b is None else {"weight": w.detach(), "bias": b.detach()}
        y = self.plain(detached, x, plan)
        z = [c for c in _LETTERS + "Z" if c not in plan.a + plan.w + plan.y][0]  # the batch

        def build(saved: tuple[torch.Tensor, ...], g: torch.Tensor) -> list[tuple[int, Any, Any]]:
            size = g.shape[0]
            sizes = dict(zip(plan.a, saved[0].shape[1:]))
            n = math.prod([sizes[c] for c in plan.n])
            # autocast: both in the weight's dtype, as emit gives them (x and g may differ)
            x3 = torch.einsum(f"{z}{plan.a}->{z}{plan.n}{plan.i}", saved[0].to(w.dtype))  # x's own indices summed
            x3 = x3.reshape(size, n, math.prod(plan.i_sizes))
            g3 = torch.einsum(f"{z}{plan.y}->{z}{plan.n}{plan.o}", g.to(w.dtype)).reshape(size, n, math.prod(plan.o_sizes))
            out = [(iw, plan.kind, (x3, g3) if plan.x_first else (g3, x3))]
            return out + ([] if ib is None else [(ib, _ROWSUM, (g3,))])

        return tap.out(y, (x,), build)


CONTRACT = ContractRule(_plain_contract)


class _PerSampleParam(torch.autograd.Function):
    """``p [B, *shape] -> p`` reshaped to ``aligned`` and expanded to ``full`` (the op's
    broadcast shape, a view), whose backward receives example b's gradient at every position
    and emits its sum over the broadcast dims (:func:`_broadcast_sum`)."""

    @staticmethod
    def forward(p: torch.Tensor, aligned: tuple[int, ...], full: tuple[int, ...]) -> torch.Tensor:  # type: ignore[override]
        return p.reshape(aligned).expand(full)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.p, ctx.aligned = inputs[0], inputs[1]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        p = ctx.p
        shape = tuple(p.shape[1:])
        return emit(p, summed_rows(shape), *_broadcast_sum(g, ctx.aligned)), None, None


def _broadcast_sum(g: torch.Tensor, aligned: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``g [B, *full]`` summed over the dims where ``aligned [B, *]`` is 1 and ``g`` is not:
    ``([B, 1, K], [B])``, the rows of a :class:`SummedRows` (``K`` the parameter's size)
    and the bound of the sums' rounding (zero where nothing is summed)."""
    size = g.shape[0]
    dims = tuple(d for d in range(1, g.dim()) if aligned[d] == 1 and g.shape[d] != 1)
    if not dims:
        return _up(g).reshape(size, 1, -1), g.new_zeros(size, dtype=_acc(g.dtype))
    rows, bound = presum(g, dims)
    return rows.reshape(size, 1, -1), bound


def _plain_elementwise(params: dict[str, torch.Tensor], *args: Any, op: Callable[..., Any], slot: int,
                       kwargs: dict[str, Any]) -> Any:
    """One example: ``op(*args, **kwargs)`` with ``params["p"]`` at position ``slot``."""
    full = list(args)
    full.insert(slot, params["p"])
    return op(*full, **kwargs)


class ElementwiseRule(Rule):
    """Rule of a broadcasting elementwise op with one parameter operand (see module doc)."""

    def batched(self, params: dict[str, torch.Tensor], *args: Any, op: Callable[..., Any], slot: int,
                kwargs: dict[str, Any]) -> Any:
        p = params["p"]
        if not is_shared(p):
            return NotImplemented
        full = list(args)
        full.insert(slot, p)
        rank = max(t.dim() - 1 for t in full if isinstance(t, torch.Tensor))
        # align every example's dims to the right, behind the batch dim
        full = [
            t.reshape(t.shape[0], *([1] * (rank + 1 - t.dim())), *t.shape[1:])
            if isinstance(t, torch.Tensor) and t.dim() - 1 < rank else t
            for t in full
        ]
        aligned = tuple(full[slot].shape)
        broadcast = tuple(torch.broadcast_shapes(*[t.shape for t in full if isinstance(t, torch.Tensor)]))
        full[slot] = apply_function(_PerSampleParam, p, aligned, broadcast)
        return op(*full, **kwargs)

    vmapped = batched

    def tapped(self, tap: Any, params: dict[str, torch.Tensor], *args: Any, op: Callable[..., Any], slot: int,
               kwargs: dict[str, Any]) -> Any:
        """One example with ``p`` detached. The piece is :meth:`batched`'s: example b's
        gradient ``[B, *p.shape]`` (a ``p``-sized vector-Jacobian product of the op at
        example b's operands and output gradient) as a one-position :class:`RowSum`."""
        p = params["p"]
        i = tap.index(p)
        if i is None:
            return NotImplemented
        full = list(args)
        full.insert(slot, p.detach())
        y = op(*full, **kwargs)
        if not isinstance(y, torch.Tensor) or not y.is_floating_point():
            return NotImplemented  # the plain op (its leaf then materialised)
        where = [k for k, t in enumerate(full) if isinstance(t, torch.Tensor)]
        constants = [None if isinstance(t, torch.Tensor) else t for t in full]
        shape = tuple(p.shape)
        kind = SummedRows(shape)  # not the lru_cache: torch.compile traces this
        rank = max(t.dim() for t in full if isinstance(t, torch.Tensor))
        aligned = (1,) * (rank - p.dim()) + shape  # p's dims aligned to the right

        def one(g: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
            """Example b's gradient of ``p`` expanded to the op's broadcast shape, unsummed:
            the op's vector-Jacobian product at its operands."""
            operands = list(constants)
            for k, t in zip(where, tensors):
                operands[k] = t
            full_shape = torch.broadcast_shapes(*[t.shape for t in operands if isinstance(t, torch.Tensor)])

            def at(q: torch.Tensor) -> torch.Tensor:
                return op(*operands[:slot], q, *operands[slot + 1:], **kwargs)

            return torch.func.vjp(at, operands[slot].reshape(aligned).expand(full_shape))[1](g)[0]

        def build(saved: tuple[torch.Tensor, ...], g: torch.Tensor) -> list[tuple[int, Any, Any]]:
            per = torch.func.vmap(one)(g, *saved)  # [B, *broadcast shape]
            return [(i, kind, _broadcast_sum(per, (g.shape[0], *aligned)))]

        return tap.out(y, tuple(full[k] for k in where), build)


ELEMENTWISE = ElementwiseRule(_plain_elementwise)


class TiedTable(GradKind):
    """An embedding table ``[V, D]`` that is also the weight of an output head (tied weights).

    Data ``("rows", idx [B, *], g [B, *, D])`` from the lookup (see
    :class:`~psgfunc.per_sample.rules.embedding.EmbeddingRows`) or ``("outer", gv [B, N, V],
    h [B, N, D])`` from the head (an :class:`~psgfunc.per_sample._kinds.Outer` piece). Example
    b's gradient is ``G_b = sum_n gv_n^T h_n + sum_t e_{idx_t} g_t^T``, and

        ``|G_b|^2 = |head|^2 + |lookup|^2 + 2 sum_{n,t} gv_n[idx_t] (h_n . g_t)``

    (the cross term pairs each head position with each looked-up token through that token's
    column of ``gv``): norms from the two kinds' own forms plus a ``[B, N, T]`` contraction,
    never the ``[B, V, D]`` gradient unless the head's pieces are cheaper dense (then all is).
    """

    def __init__(self, num_embeddings: int, padding_idx: int | None):
        self.num_embeddings, self.padding_idx = num_embeddings, padding_idx

    def _parts(self, datas: Sequence[tuple[Any, ...]]) -> tuple[list[Any], list[Any]]:
        rows = [(a, b) for tag, a, b in datas if tag == "rows"]
        outer = [(a, b) for tag, a, b in datas if tag == "outer"]
        return rows, outer

    def _rows_kind(self) -> Any:
        from psgfunc.per_sample.rules.embedding import EmbeddingRows

        return EmbeddingRows(self.num_embeddings, self.padding_idx)

    def materialize(self, tag: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if tag == "rows":
            return self._rows_kind().materialize(a, b)
        return _OUTER.materialize(a, b)

    def prefers_dense(self, datas: Sequence[tuple[Any, ...]]) -> bool:
        rows, outer = self._parts(datas)
        return bool(outer) and _OUTER.prefers_dense(outer)

    def bound(self, datas: Sequence[tuple[Any, ...]], cache: dict | None = None) -> NormBound:
        """The certified bound of the whole table's gradient (see ``_kinds.gram_bound``),
        read as ONE sum of outer products: the head's ``gv_n^T h_n`` and, for each looked-up
        token, ``e_{idx_t}^T g_t`` (a one-hot row): Gram norm, its rounding bound, float64
        Grams for cancelling examples. The one-hot rows' Gram blocks are read off ``idx``
        (``gv_n . e_{idx_t} = gv_n[idx_t]``, ``e_{idx_t} . e_{idx_t'} = [idx_t == idx_t']``,
        both exact), so no ``[B, T, V]`` one-hot tensor is built."""
        rows, outer = self._parts(datas)
        if not rows or not outer:
            kind = self._rows_kind() if rows else _OUTER
            return kind.bound(rows or outer)
        gv = outer[0][0] if len(outer) == 1 else torch.cat([g for g, _ in outer], dim=1)  # [B, N, V]
        h = outer[0][1] if len(outer) == 1 else torch.cat([x for _, x in outer], dim=1)  # [B, N, D]
        idx, ge = self._rows_kind()._flat(rows)  # [B, T], [B, T, D] (padding zeroed)
        idx = idx.to(torch.int64)

        def grams(gv: torch.Tensor, idx: torch.Tensor, h: torch.Tensor, ge: torch.Tensor) -> Any:
            """``[B, N + T, N + T]`` Grams of the rows ``[gv; one-hot(idx)]`` and ``[h; ge]``,
            and the lengths bounding their entries' rounding (see ``_kinds.gram_of``)."""
            uu, ku = gram_of(gv)
            uo = torch.gather(gv, 2, idx.unsqueeze(1).expand(-1, gv.shape[1], -1))  # [B, N, T]
            oo = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(uu.dtype)  # [B, T, T]
            gram_u = torch.cat([torch.cat([uu, uo.to(uu.dtype)], dim=2),
                                torch.cat([uo.transpose(1, 2).to(uu.dtype), oo], dim=2)], dim=1)
            gram_v, kv = gram_of(torch.cat([h, ge.to(h.dtype)], dim=1))
            return gram_u, gram_v, ku, kv

        gram_u, gram_v, ku, kv = grams(_up(gv), idx, _up(h), _up(ge))
        rg = gram_u.diagonal(dim1=1, dim2=2).sqrt()
        rx = gram_v.diagonal(dim1=1, dim2=2).sqrt()

        def redo(bad: torch.Tensor) -> torch.Tensor:
            gu, gx, _, _ = grams(gv[bad].to(F64), idx[bad], h[bad].to(F64), ge[bad].to(F64))
            return (gu * gx).sum((1, 2))

        return gram_bound(gram_u, gram_v, rg, rx, gv.shape[2], h.shape[2], len(datas) + 1, redo, ku, kv)

    def norm2(self, datas: Sequence[tuple[Any, ...]], cache: dict | None = None) -> torch.Tensor:
        rows, outer = self._parts(datas)
        kind = self._rows_kind()
        total = None
        if rows:
            total = kind.norm2(rows)
        if outer:
            head = _OUTER.norm2(outer)
            total = head if total is None else total + head
        if rows and outer:
            idx, ge = kind._flat(rows)  # [B, T], [B, T, D] (padding positions zeroed)
            gv = torch.cat([g for g, _ in outer], dim=1)  # [B, N, V]
            h = torch.cat([x for _, x in outer], dim=1)  # [B, N, D]
            picked = torch.gather(gv, 2, idx.to(torch.int64).unsqueeze(1).expand(-1, gv.shape[1], -1))
            total = total + 2 * (picked * torch.bmm(h, ge.transpose(1, 2))).sum((1, 2))
        return total

    def weighted_sum(self, datas: Sequence[tuple[Any, ...]], c: torch.Tensor) -> torch.Tensor:
        rows, outer = self._parts(datas)
        total = _OUTER.weighted_sum(outer, c) if outer else None
        if rows:  # the lookup's rows added into the head's [V, D] sum in place
            total = self._rows_kind().weighted_sum(rows, c, out=total)
        return total


_OUTER = Outer()


def _tie(records: Sequence[tuple[GradKind, tuple[Any, ...]]]) -> Any:
    """Pieces of an embedding lookup and of plain ``Outer`` heads on one table -> :class:`TiedTable`."""
    from psgfunc.per_sample.rules.embedding import EmbeddingRows

    rows = [k for k, _ in records if isinstance(k, EmbeddingRows)]
    if not rows or any(k != rows[0] for k in rows):
        return None
    table = None
    out = []
    for kind, data in records:
        if isinstance(kind, EmbeddingRows):
            out.append(("rows",) + tuple(data))
        elif type(kind) is Outer and kind.shape is None and data[0].dim() == 3 and data[0].shape[2] == rows[0].num_embeddings:
            out.append(("outer",) + tuple(data))
        else:
            return None
    table = TiedTable(rows[0].num_embeddings, rows[0].padding_idx)
    return [(table, data) for data in out]


COMBINERS.append(_tie)
