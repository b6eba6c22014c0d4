"""What a rule knows about a parameter's per-sample gradient, before it is materialised.

A rule's backward does not have to build ``[B, *shape]`` gradients itself: it hands the
pieces (layer inputs and output gradients) to :func:`emit` together with a :class:`GradKind`
that knows three things about them:

* ``materialize(*data) -> [B, *shape]``: the per-sample gradient (the expanded method);
* ``norm2(datas) -> [B]``: the squared per-example norm of the SUM of several such pieces
  (one per use of the parameter: time steps, tied weights), without building ``[B, *shape]``
  where a cheaper form exists (Goodfellow 2015; ghost clipping, Li et al. 2021);
* ``weighted_sum(datas, c) -> [*shape]``: ``sum_b c_b * grad_b`` in one contraction
  (book-keeping, Bu et al. 2023).

Norms a clipping factor is computed from must never be below the norm of what the weighted
sum then adds (an example would escape its bound). So each kind also bounds its own
rounding (:meth:`GradKind.bound`, a :class:`NormBound`): an upper bound of the exact norm
of the summed pieces (the Gram form cancels: in float32 its error is relative to
``(sum_n ||g_n|| ||x_n||)^2``, not to the norm, so a crafted example's estimate can be 0 or
negative), and a bound on the weighted sum's own rounding per unit factor.
:func:`certified_norm` adds these up; clipping by it keeps every example's contribution
at most ``C`` as computed, in float32 and bfloat16 too (see its docstring).

Normally :func:`emit` materialises. For parameters a :class:`Collector` tracks (fast
clipping), the pieces are recorded instead and the rule passes no gradient on; the caller
then asks the kinds for norms and the clipped sum.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from psgfunc._tree import FAST_ONE_PASS, accurate_sq_norms, gamma, sq_norm_rel, unit_roundoff

__all__ = [
    "GradKind",
    "Outer",
    "RowSum",
    "SummedRows",
    "summed_rows",
    "presum",
    "with_slack",
    "Materialized",
    "NormBound",
    "emit",
    "collecting",
    "Collector",
    "output_collector",
    "LeafPieces",
    "leaf_pieces",
    "certified_norm",
    "dense_bound",
    "outer_bound",
    "gram_bound",
    "gram_of",
    "COMBINERS",
]

F64 = torch.float64

GRAM_TOLERANCE = 2e-4
"""Largest rounding bound of the Gram forms, relative to an example's whole squared norm,
taken as it comes (the certified norm then exceeds the estimate by at most 1e-4); above
it, the finer bound is computed, and examples still above it (cancelling ones) have their
Grams recomputed in float64 (eagerly; under ``torch.compile`` the finer bound is kept,
which over-clips such an example but never under-clips it)."""


GRAM_BLOCK = 128
"""Gram entries (dot products of rows) longer than ``2 * GRAM_BLOCK`` are summed blockwise
(:func:`gram_of`): their rounding bound is then that of a dot product of about
``GRAM_BLOCK + K / GRAM_BLOCK`` terms, not ``K``, which keeps the certified bound of wide
layers (an MLP's 3072, a tied head's vocabulary) under :data:`GRAM_TOLERANCE` instead of
sending every example to the float64 recomputation."""


def gram_of(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``t [B, N, K] -> (t t^T [B, N, N], k)`` in ``t``'s accumulation dtype: every entry
    within ``gamma_k ||t_n|| ||t_m||`` of the exact dot product.

    Long rows (``K > 2 * GRAM_BLOCK``, eagerly) are summed blockwise: ``nb`` products of
    ``GRAM_BLOCK`` coordinates (each within ``gamma_GRAM_BLOCK`` of its block's
    ``S_j = sum |t_nk t_mk|``), then added one by one (within ``gamma_nb`` of the sum of
    their magnitudes, at most ``(1 + gamma_GRAM_BLOCK) sum_j S_j``), so with
    ``sum_j S_j <= ||t_n|| ||t_m||`` the entry errs by ``gamma_(GRAM_BLOCK + nb)`` of that at
    most. Otherwise one product, ``k = K``. (One product's own order of summation is
    unknown, hence its ``gamma_K``.)
    """
    t = _up(t)
    k = t.shape[2]
    if k <= 2 * GRAM_BLOCK or torch.compiler.is_compiling():
        return torch.bmm(t, t.transpose(1, 2)), k
    acc = None
    for start in range(0, k, GRAM_BLOCK):
        block = t[:, :, start:start + GRAM_BLOCK]
        part = torch.bmm(block, block.transpose(1, 2))
        acc = part if acc is None else acc.add_(part)
    return acc, GRAM_BLOCK + -(-k // GRAM_BLOCK)


class NormBound(NamedTuple):
    """What clipping needs to know about one parameter's per-example gradients ``grad_b``.

    Tensors ``[B]`` in the accumulation dtype (float32, or float64 for float64 pieces); the
    scales are numbers, so that rounding-error factors cost no tensor operation.

    Attributes:
        sq: estimate of ``||grad_b||^2``.
        hi2: ``||grad_b||^2 <= hi2 * hi_scale`` for the EXACT gradient of the pieces
            (rounding of the norm's computation included); None: ``sq`` in its place.
        err: the kind's ``weighted_sum(c)`` is ``sum_b c_b grad_b`` up to an error of norm
            at most ``c_b * err_b * err_scale`` from example ``b``'s terms; None:
            ``sqrt(sq)`` in its place (rounding relative to the norm itself).
        hi_scale, err_scale: see above.
        unc: the part of ``hi2`` that is a rounding bound rather than the estimate (Gram
            forms), or None.
        refine: ``refine(total_sq) -> NormBound`` with a tighter ``hi2``, where ``unc`` is
            too large against ``total_sq`` (the example's whole squared norm), or None.
    """

    sq: torch.Tensor
    hi2: torch.Tensor | None = None
    err: torch.Tensor | None = None
    hi_scale: float = 1.0
    err_scale: float = 0.0
    unc: torch.Tensor | None = None
    refine: Any = None


def _relative(sq: torch.Tensor, rel: float, err: float) -> NormBound:
    """:class:`NormBound` of a norm estimate ``sq`` with relative error ``rel`` and a
    weighted sum erring by ``err`` relatively to the norm (no cancellation)."""
    return NormBound(sq, None, None, *_relative_scales(rel, err))


def _relative_scales(rel: float, err: float) -> tuple[float, float]:
    """``(hi_scale, err_scale)`` of :func:`_relative`."""
    return 1 + rel, err * math.sqrt(1 + rel)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms and sums of ``dtype`` pieces are computed in (float32 for halves)."""
    return F64 if dtype == F64 else torch.float32


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without an operation when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def _up(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype (half-precision pieces are computed on in float32)."""
    return t if t.dtype in (torch.float32, F64) else t.to(torch.float32)


def sq_norms(t: torch.Tensor) -> torch.Tensor:
    """``[B, *shape] -> [B]`` squared norms for the kinds' bounds:
    :func:`~psgfunc._tree.accurate_sq_norms` with :data:`~psgfunc._tree.FAST_ONE_PASS`
    (relative error at most :func:`sq_rel`), plus :func:`underflow` of the row's ``k``
    squares: those below the smallest subnormal number (float32 entries under about 4e-23,
    float64 under 1e-162) are 0, so a row of such entries summed to 0 and its example,
    clipped by ``C / max(C, 0)``, was not clipped at all (float32 gradients of 1e-25 with
    ``C = 1e-30``). The term is a no-op on ordinary norms (float32 squares above about
    ``1e-30 k``), and an exactly zero row gets it too."""
    k = math.prod(t.shape[1:])
    return accurate_sq_norms(t, FAST_ONE_PASS) + underflow(_acc(t.dtype), k)


def sq_rel(dtype: torch.dtype, k: int) -> float:
    """The relative error bound of :func:`sq_norms` on rows of ``k`` elements (remembered
    per ``(dtype, k)``: a few are asked per leaf per step; not while the compiler traces,
    which would guard on the table)."""
    if torch.compiler.is_compiling():
        return sq_norm_rel(dtype, k, FAST_ONE_PASS)
    rel = _SQ_REL.get((dtype, k))
    if rel is None:
        rel = _SQ_REL[(dtype, k)] = sq_norm_rel(dtype, k, FAST_ONE_PASS)
    return rel


_SQ_REL: dict[tuple[torch.dtype, int], float] = {}


def dense_bound(total: torch.Tensor) -> NormBound:
    """:class:`NormBound` of materialised per-example gradients ``[B, *shape]``, whose
    weighted sum is ``c @ total`` (one product per example and coordinate)."""
    k = math.prod(total.shape[1:])
    return _relative(sq_norms(total), sq_rel(total.dtype, k), gamma(2, _acc(total.dtype)))


def underflow(dtype: torch.dtype, k: int) -> float:
    """``4 k eta`` (``eta``: half ``dtype``'s smallest subnormal, ``2^-150`` for float32,
    ``2^-1075`` for float64): a bound on what underflow takes from a sum of ``k`` products
    or squares of ``dtype`` numbers, absolutely, which the relative bounds (``gamma_k``) do
    not cover. Each product that underflows errs by ``eta`` at most (additions of subnormals
    are exact); 4 covers its growth through the sum and the second-order terms of the
    bounds that use it. Negligible for any norm above ``sqrt(k) 2^-74`` (float32;
    ``sqrt(k) 2^-536``, about ``1e-161 sqrt(k)``, in float64), but a product of two norms
    (or of two Grams) multiplies it by the other one: float32 inputs of 3e-23 (squares
    below the smallest subnormal) with output gradients of 3e18 gave norms 5% low, and
    float64 inputs of 1e-163 with output gradients of 1e150 gave norms of 0 for gradients
    of norm 1e-11. So an example with a zero factor gets a certified norm of about
    ``1e-22`` (float32) or ``1e-161`` (float64) times the other factor, not 0."""
    return k * 4 * unit_roundoff(dtype) * torch.finfo(dtype).tiny  # (this order: exact in double)


def _lift(r: torch.Tensor, k: int) -> torch.Tensor:
    """Row norms ``r`` of rows of ``k`` elements computed in ``r``'s dtype, raised by what
    underflow may have taken from their squares: ``sqrt(r^2 + underflow(k)) <= r +
    sqrt(underflow(k))`` (the latter rounded up); a no-op on float32 norms above about
    ``1e-15 sqrt(k)`` (float64: ``4e-146 sqrt(k)``), which it cannot change. An exactly
    zero row gets ``sqrt(underflow(k))`` too: underflowed rows are zeros as well."""
    return r + math.sqrt(underflow(r.dtype, k)) * (1 + 2**-20)


def _rho(cache: dict | None, t: torch.Tensor) -> torch.Tensor:
    """``[B, N, K] -> [B, N]`` row norms ``||t[b, n]||`` (relative error ``gamma_{K+3}``);
    from ``t``'s Gram diagonal when a Gram form already computed it (an LSTM's biases
    after its weights)."""
    if cache is not None:
        from_gram = cache.get(("gram_rho", _key(t)))
        if from_gram is not None:
            return from_gram
    return _shared(cache, "rho", t, lambda: torch.linalg.vector_norm(_up(t), dim=2))


def _gram_error(
    gram_g: torch.Tensor, gram_x: torch.Tensor, rg: torch.Tensor, rx: torch.Tensor, a: torch.Tensor,
    o: int, i: int, grow: float,
) -> tuple[torch.Tensor, Any]:
    """``([B] bound, a function of no arguments giving a finer one)`` on
    ``|sum(gram_g * gram_x) - ||sum_n g_n^T x_n||^2|`` for Grams computed from rows of
    computed norms ``rg, rx`` (``a = sum_n rg_n rx_n``; the exact ``a`` is at most ``grow``
    times that), their product summed in float64.

    Each Gram entry is a dot product: ``|dG_nm| <= gamma_O |g_n| |g_m|`` (and ``gamma_I`` for
    ``x``). So the error is at most ``gamma_O sum rg rg |X| + gamma_I sum |G| rx rx`` plus
    second-order terms and the products' rounding, each at most ``a^2`` times a small
    constant. The cheap bound replaces ``|X|`` and ``|G|`` by their Cauchy-Schwarz bounds
    (``a^2`` in all); the finer one (a few ``[B, N, N]`` passes) is taken when the cheap
    one is not tight enough, or always under ``torch.compile`` (no data-dependent branch).
    """
    n, dtype = gram_g.shape[1], gram_g.dtype
    go, gi = gamma(o + 1, dtype), gamma(i + 1, dtype)
    # products' rounding, their float64 sum and its rounding back to dtype
    small = (go * gi + 2 * unit_roundoff(dtype) + gamma(n * n + 2, F64)) * (1 + go) * (1 + gi)
    cheap = a.square() * ((go + gi + small) * grow**2 * (1 + gamma(3, dtype)))

    def fine() -> torch.Tensor:  # nonnegative sums: relative error gamma_{N^2 + 3}
        t1 = (gram_x.abs() * (rg.unsqueeze(2) * rg.unsqueeze(1))).sum((1, 2))
        t2 = (gram_g.abs() * (rx.unsqueeze(2) * rx.unsqueeze(1))).sum((1, 2))
        k = grow**2 * (1 + gamma(n * n + 6, dtype))
        return (t1 * (go * k) + t2 * (gi * k) + a.square() * (small * k)) * (1 + gamma(3, dtype))

    return cheap, fine


def outer_bound(
    g: torch.Tensor, x: torch.Tensor, pieces: int, cache: dict | None, gram: bool, rows: Any = None
) -> NormBound:
    """:class:`NormBound` of ``grad_b = sum_n g[b, n]^T x[b, n]`` (``g [B, N, O]``, ``x [B, N,
    I]``), by the Gram form (``gram``) or by materialising ``[B, O, I]``, for a weighted sum
    that adds the ``N`` outer products of an example in ``pieces`` contractions.

    ``cache`` shares row norms and (Gram form) Grams of tensors several parameters see.
    ``rows(idx) -> (g[idx], x[idx])``, if given, builds the rows of examples ``idx`` again
    when the refinement needs them, so that the bound does not keep ``g`` and ``x`` alive
    (a convolution's patches: built for the norms, then dropped).
    """
    n, o, i = g.shape[1], g.shape[2], x.shape[2]
    dtype = _acc(g.dtype)
    if n == 1:  # ||g x^T|| = ||g|| ||x||; the layer's bias (a RowSum of g) reuses ||g||^2
        # (each factor raised by what underflow may take from it, in sq_norms: the other
        # multiplies that. Their product may fall below the smallest subnormal number and
        # round to 0: float32 inputs of 1e-25 under output gradients of 1e-5 had exact norm
        # 2.4e-30 and certified 0, so with C = 1e-33 the example was not clipped at all; it
        # rounds by eta at most there, which underflow(dtype, 1) added covers)
        sq = (_sq1(cache, g) * _sq1(cache, x)).add_(underflow(dtype, 1))
        return NormBound(sq, None, None, *_one_row_scales(g.dtype, x.dtype, o, i, pieces))
    grow = (1 + gamma(o + 3, dtype)) * (1 + gamma(i + 3, dtype)) * (1 + gamma(n + 2, dtype))
    err_scale = gamma(n + pieces + 2, dtype) * grow
    if not gram:
        rg, rx = _lift(_rho(cache, g), o), _lift(_rho(cache, x), i)
        a = torch.linalg.vecdot(rg, rx)  # sum_n ||g_n|| ||x_n||: the size of the terms
        dense = torch.bmm(_up(g).transpose(1, 2), _up(x))
        sq = sq_norms(dense)
        # the materialised sums of N products err by gamma_N a at most
        hi = sq.sqrt() * (1 + sq_rel(dtype, o * i)) + a * (gamma(n + 2, dtype) * grow)
        return NormBound(sq, hi.square(), a, 1 + gamma(4, dtype), err_scale)
    # [B, N, N] each; an LSTM's W_ih and W_hh share g (the gate gradients): one Gram
    gram_g, ko = _shared(cache, "gram", g, lambda: gram_of(g))
    gram_x, ki = _shared(cache, "gram", x, lambda: gram_of(x))
    # row norms from the Grams' diagonals (sums of squares: relative error gamma_K), which
    # also spares a strided reduction over non-contiguous pieces (a conv's positions)
    rg = _shared(cache, "gram_rho", g, lambda: gram_g.diagonal(dim1=1, dim2=2).sqrt())
    rx = _shared(cache, "gram_rho", x, lambda: gram_x.diagonal(dim1=1, dim2=2).sqrt())

    fetch = rows if rows is not None else (lambda idx: (g[idx], x[idx]))

    def redo(bad: torch.Tensor) -> torch.Tensor:
        g64, x64 = (t.to(F64) for t in fetch(bad))
        return (torch.bmm(g64, g64.transpose(1, 2)) * torch.bmm(x64, x64.transpose(1, 2))).sum((1, 2))

    return gram_bound(gram_g, gram_x, rg, rx, o, i, pieces, redo, ko, ki)


def _one_row_scales(g_dtype: torch.dtype, x_dtype: torch.dtype | None, o: int, i: int, pieces: int = 1) -> tuple[float, float]:
    """``(hi_scale, err_scale)`` of the one-position bound of ``sum of pieces g^T x`` (``g
    [B, 1, O]``, ``x [B, 1, I]``): ``sq = sq1(g) sq1(x)`` (:func:`outer_bound`); with
    ``x_dtype`` None, of ``g`` alone (a bias on vectors, :meth:`RowSum.bound`: ``sq =
    sq1(g)``). Remembered: a small model's step asks a few per layer; not while the
    compiler traces, which would guard on the table."""
    compiling = torch.compiler.is_compiling()
    key = (g_dtype, x_dtype, o, i, pieces)
    scales = None if compiling else _ONE_ROW.get(key)
    if scales is None:
        dtype = _acc(g_dtype)
        if x_dtype is None:
            scales = _relative_scales(sq_rel(g_dtype, o), gamma(3, dtype))
        else:
            rel = sq_rel(g_dtype, o) + sq_rel(x_dtype, i) + gamma(4, dtype)
            scales = _relative_scales(rel, gamma(pieces + 2, dtype))
        if not compiling:
            _ONE_ROW[key] = scales
    return scales


_ONE_ROW: dict[tuple[Any, ...], tuple[float, float]] = {}
"""``(g dtype, x dtype or None, O, I, pieces) -> (hi_scale, err_scale)`` of
:func:`_one_row_scales`."""


def gram_bound(
    gram_g: torch.Tensor, gram_x: torch.Tensor, rg: torch.Tensor, rx: torch.Tensor,
    o: int, i: int, pieces: int, redo: Any, ko: int | None = None, ki: int | None = None,
) -> NormBound:
    """:class:`NormBound` of ``grad_b = sum_n g[b, n]^T x[b, n]`` from its Grams
    ``gram_g = g g^T``, ``gram_x = x x^T`` ``[B, N, N]`` (entries computed as dot products
    of length ``o`` and ``i``, or exactly), their diagonals' square roots ``rg, rx [B, N]``,
    for a weighted sum that adds the outer products in ``pieces`` contractions.

    ``redo(bad) -> [len(bad)]``: ``sum(gram_g * gram_x)`` of examples ``bad`` (an index
    tensor) from float64 Grams, for the cancelling examples the finer bound leaves
    uncertain. Grams are all it keeps: a caller can build them without ``g`` itself (a
    tied table's one-hot rows, :class:`~psgfunc.per_sample.rules.matmul.TiedTable`).
    ``ko, ki`` (default ``o, i``): the lengths whose ``gamma`` bounds the Grams' entries
    (the ``k`` of :func:`gram_of`); ``o, i`` bound the float64 recomputation and count the
    products of an entry, each of which may underflow (:func:`underflow`: the row norms are
    raised by it and ``o eta sum |G_x| + i eta sum |G_g|`` added to the error bounds, and
    ``4 (N^2 + 1) eta`` for the ``N^2`` products of two entries and the estimate's rounding
    to ``dtype``, each of which may underflow by ``eta``).
    """
    n, dtype = gram_g.shape[1], gram_g.dtype
    ko, ki = o if ko is None else ko, i if ki is None else ki
    grow = (1 + gamma(ko + 3, dtype)) * (1 + gamma(ki + 3, dtype)) * (1 + gamma(n + 2, dtype))
    err_scale = gamma(n + pieces + 2, dtype) * grow
    # underflow: the diagonals (row norms) may have lost up to underflow(o) and underflow(i)
    # (o and i products per entry), every entry as much, which the other Gram multiplies:
    # sum |G_x| <= (sum_n ||x_n||)^2 times underflow(o), and so on
    rg, rx = _lift(rg, o), _lift(rx, i)
    lost = ((rx.sum(1) * math.sqrt(underflow(dtype, o))).square()
            + (rg.sum(1) * math.sqrt(underflow(dtype, i))).square()) * (grow**2 * (1 + gamma(4, dtype)))
    lost = lost + (n * n + 1) * underflow(dtype, 1)  # the products G_g G_x and est's rounding
    a = torch.linalg.vecdot(rg, rx)  # sum_n ||g_n|| ||x_n||: the size of the terms
    est = torch.sum(gram_g * gram_x, (1, 2), dtype=F64).to(dtype)
    cheap, fine = _gram_error(gram_g, gram_x, rg, rx, a, ko, ki, grow)
    scales = (1 + gamma(2, dtype), err_scale)
    if torch.compiler.is_compiling():  # no data-dependent branch: the finer bound, always
        return NormBound(est, (est + torch.minimum(cheap, fine()) + lost).clamp_min(0), a, *scales)
    # what underflow may take asks for the float64 Grams where the estimate is not 0 (an
    # example with a zero factor, e.g. zero output gradients, keeps its cheap bound instead)
    live = torch.where(est != 0, lost, 0.0)

    def refine(total_sq: torch.Tensor) -> NormBound:
        """The finer bound; examples it leaves uncertain (cancelling ones, and those whose
        Grams underflow) get their Grams again in float64 (a few rows)."""
        err, new_est = torch.minimum(cheap, fine()), est
        bad = (err + live > GRAM_TOLERANCE * total_sq).nonzero().flatten()
        err = err + lost
        if bad.numel() and dtype != F64:
            redone = redo(bad)
            k64 = (gamma(o + i + 2, F64) + gamma(n * n + 2, F64)) * grow**2 * (1 + gamma(3, dtype))
            new_est = est.index_copy(0, bad, redone.to(dtype))
            # (float64 Grams of narrower data do not underflow; their sum rounded to dtype may)
            err = err.index_copy(0, bad, a[bad].square() * k64 + redone.abs().to(dtype) * (2 * unit_roundoff(dtype))
                                 + underflow(dtype, 1))
        return NormBound(new_est, (new_est + err).clamp_min(0), a, *scales)

    return NormBound(est, (est + cheap + lost).clamp_min(0), a, *scales, cheap + live, refine)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[B, *shape] -> [B, prod(shape)]``, also for ``B = 0``."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def _time_major(t: torch.Tensor) -> bool:
    """Whether ``t [B, N, K]`` is a transposed view of a contiguous ``[N, B, K]``."""
    return t.shape[0] > 1 and t.shape[1] > 1 and not t.is_contiguous() and t.transpose(0, 1).is_contiguous()


def _key(t: Any) -> Any:
    """Identity of a piece's tensor (storage, offset, shape, strides), for :func:`_shared`."""
    if not isinstance(t, torch.Tensor):
        return t
    return (t.data_ptr(), t.shape, t.stride(), t.dtype)


def _shared(cache: dict | None, tag: str, t: torch.Tensor, compute: Any) -> Any:
    """``compute()``, or its result from an earlier call for the same ``tag`` and tensor ``t``
    on ``cache`` (None: no sharing)."""
    if cache is None:
        return compute()
    key = (tag, _key(t))
    out = cache.get(key)
    if out is None:
        out = cache[key] = compute()
    return out


def _sq1(cache: dict | None, t: torch.Tensor) -> torch.Tensor:
    """``[B]`` squared norms of ``t [B, 1, K]`` (one position per example), shared via
    ``cache``; relative error at most :func:`sq_rel`."""
    return _shared(cache, "sq1", t, lambda: sq_norms(t))


class GradKind:
    """Base: a kind that can only materialise (norms and sums from the materialised form).

    Kinds compare equal when they are of one class with equal attributes, so the pieces of
    several calls of one layer (each making its own kind object) are combined.
    """

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.__dict__.items()))))

    def materialize(self, *data: Any) -> torch.Tensor:
        raise NotImplementedError

    def prefers_dense(self, datas: Sequence[tuple[Any, ...]]) -> bool:
        """Whether materialising is the cheapest way to this parameter's norms (then the
        dense gradient is built once and also serves the weighted sum)."""
        return type(self).bound is GradKind.bound

    def slack(self, *data: Any) -> torch.Tensor | None:
        """``[B]``: how far, in norm, these pieces' computed gradient may be from the exact
        one beyond what :meth:`bound` of the materialised gradient covers (pieces summed by
        the rule itself, :class:`SummedRows`), or None."""
        return None

    def one_position(self, datas: Sequence[tuple[Any, ...]]) -> tuple[torch.Tensor, ...]:
        """The ``[B, 1, K]`` tensors whose squared row norms (:func:`_sq1`) :meth:`bound`
        will ask for, so that :func:`leaf_pieces` computes those of all leaves together
        (:func:`_prefetch_sq1`); none by default."""
        return ()

    def rebuilt(self, records: Sequence[tuple[GradKind, tuple[Any, ...]]]) -> Any:
        """``records`` (all of this kind, one parameter's) rewritten as records of another
        kind that serves them better (e.g. gradients built now, with what their norm's
        bound needs), or None (the default: as they are)."""
        return None

    def bound(self, datas: Sequence[tuple[Any, ...]], cache: dict | None = None) -> NormBound:
        """Norm estimate, certified norm bound and weighted-sum error of the summed pieces
        (:class:`NormBound`); ``cache`` (see :func:`leaf_pieces`) lets parameters whose
        pieces share a tensor compute what depends on it once."""
        total = self.materialize(*datas[0])
        for data in datas[1:]:
            total = total + self.materialize(*data)
        return dense_bound(total)

    def norm2(self, datas: Sequence[tuple[Any, ...]], cache: dict | None = None) -> torch.Tensor:
        """``[B]`` squared norms (estimates) of the summed pieces: ``bound(...).sq``, in the
        pieces' accumulation dtype (float32, or float64)."""
        first = next(t for t in datas[0] if isinstance(t, torch.Tensor) and t.is_floating_point())
        return self.bound(datas, cache).sq.to(_acc(first.dtype))

    def weighted_sum(self, datas: Sequence[tuple[Any, ...]], c: torch.Tensor) -> torch.Tensor:
        total = None
        for data in datas:
            g = self.materialize(*data)
            s = torch.tensordot(c.to(_acc(g.dtype)), _up(g), dims=1)
            total = s if total is None else total + s
        return total.to(g.dtype)


class Materialized(GradKind):
    """Data is the per-sample gradient itself, ``[B, *shape]``."""

    def materialize(self, g: torch.Tensor) -> torch.Tensor:
        return g


class Outer(GradKind):
    """``grad_b = sum_n g[b, n]^T x[b, n]``: data ``(g [B, N, O], x [B, N, I])`` -> ``[B, O, I]``.

    ``shape`` (optional) reshapes the ``[O, I]`` result (e.g. a conv weight from unfolded
    inputs). Norms use the Gram form ``sum_{n,m} (g_n . g_m)(x_n . x_m)`` when it is cheaper
    than materialising, i.e. when ``N * (O + I) < O * I`` (the "mixed" rule).
    """

    def __init__(self, shape: tuple[int, ...] | None = None):
        self.shape = shape

    def materialize(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = torch.bmm(g.transpose(1, 2), x)
        return out if self.shape is None else out.reshape(out.shape[0], *self.shape)

    def prefers_dense(self, datas: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        n = sum(d[0].shape[1] for d in datas)
        o, i = datas[0][0].shape[2], datas[0][1].shape[2]
        return n > 1 and n * (o + i) >= o * i

    def one_position(self, datas: Sequence[tuple[Any, ...]]) -> tuple[torch.Tensor, ...]:
        return tuple(datas[0][:2]) if len(datas) == 1 and datas[0][0].shape[1] == 1 else ()

    def bound(self, datas: Sequence[tuple[torch.Tensor, torch.Tensor]], cache: dict | None = None) -> NormBound:
        one = len(datas) == 1  # a concatenation is a new tensor: nothing to share by identity
        g = datas[0][0] if one else torch.cat([d[0] for d in datas], dim=1)
        x = datas[0][1] if one else torch.cat([d[1] for d in datas], dim=1)
        n, o, i = g.shape[1], g.shape[2], x.shape[2]
        return outer_bound(g, x, len(datas), cache if one else None, n * (o + i) < o * i)

    def weighted_sum(self, datas: Sequence[tuple[torch.Tensor, torch.Tensor]], c: torch.Tensor) -> torch.Tensor:
        total = None
        for g, x in datas:
            # the ordinary weight gradient with each example's output gradient scaled:
            # [O, B*N] @ [B*N, I], one matmul (as autograd's own; einsum took 3x longer).
            # Rows in whichever order (b, n) or (n, b) the pieces are stored: the recurrence
            # keeps its gate gradients time-major, and copying them cost a third of the sum.
            out = g.dtype
            # scale the narrower operand: a tied head's output gradient [B, N, V] is ten
            # times its input [B, N, D], and the scaled copy is a temporary of that size
            if g.shape[1] == 1 and g.shape[2] <= x.shape[2]:  # one position: rows a bias shares
                left, right = scaled_rows(g, c), _up(x).reshape(x.shape[0], x.shape[2])
            else:
                c3 = _as(c, _acc(out)).reshape(-1, 1, 1)
                if _time_major(g) or _time_major(x):
                    g, x, c3 = g.transpose(0, 1), x.transpose(0, 1), c3.transpose(0, 1)
                rows = g.shape[0] * g.shape[1]  # (explicit: -1 is ambiguous for a width of 0)
                if g.shape[2] <= x.shape[2]:
                    left, right = (_up(g) * c3).reshape(rows, g.shape[2]), _up(x).reshape(rows, x.shape[2])
                else:
                    left, right = _up(g).reshape(rows, g.shape[2]), (_up(x) * c3).reshape(rows, x.shape[2])
            total = torch.mm(left.t(), right) if total is None else total.addmm_(left.t(), right)
        total = total if total.dtype == out else total.to(out)
        return total if self.shape is None else total.reshape(self.shape)


_SCALED: list[Any] = [None]
"""``(g, c, rows, c as a column)``: the last :func:`scaled_rows`, kept until the next one or
:func:`forget_scaled` (one at a time: a layer's weight and bias are summed one after the
other)."""


def scaled_rows(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``g [B, 1, K]`` (one position per example), each row scaled by ``c [B]``: ``[B, K]``
    in the accumulation dtype. The weight's and the bias's sums of a linear layer on vectors
    both start from these rows (``rows^T x`` and ``rows.sum(0)``), so the rows are made once
    for both: the last call's are returned again for the same ``g`` and ``c`` objects (held
    until replaced, so no other tensor can take their place). Not while the compiler traces."""
    if torch.compiler.is_compiling():  # (no guard on the slot: the compiler merges equal work)
        return _up(g).reshape(g.shape[0], g.shape[2]) * _as(c, _acc(g.dtype)).reshape(-1, 1)
    slot = _SCALED[0]
    if slot is not None and slot[0] is g and slot[1] is c:
        return slot[2]
    # (c as a column: made once per c while the slot holds one of its rows)
    column = slot[3] if slot is not None and slot[1] is c and slot[3].dtype == _acc(g.dtype) else (
        _as(c, _acc(g.dtype)).reshape(-1, 1))
    rows = _up(g).reshape(g.shape[0], g.shape[2]) * column
    _SCALED[0] = (g, c, rows, column)
    return rows


def forget_scaled() -> None:
    """Drop what :func:`scaled_rows` keeps (the end of a pass's weighted sums)."""
    _SCALED[0] = None


class RowSum(GradKind):
    """``grad_b = sum_n g[b, n]``: data ``(g [B, N, K],)`` -> ``[B, K]`` (biases)."""

    def __init__(self, shape: tuple[int, ...] | None = None):
        self.shape = shape

    def materialize(self, g: torch.Tensor) -> torch.Tensor:
        out = g.sum(1)
        return out if self.shape is None else out.reshape(out.shape[0], *self.shape)

    def prefers_dense(self, datas: Sequence[tuple[torch.Tensor]]) -> bool:
        return len(datas) > 1  # one piece: norms below; several: add them up densely

    def one_position(self, datas: Sequence[tuple[Any, ...]]) -> tuple[torch.Tensor, ...]:
        return (datas[0][0],) if len(datas) == 1 and datas[0][0].shape[1] == 1 else ()

    def bound(self, datas: Sequence[tuple[torch.Tensor]], cache: dict | None = None) -> NormBound:
        if len(datas) > 1:
            return super().bound(datas)
        (g,) = datas[0]
        dtype = _acc(g.dtype)
        if g.shape[1] == 1:
            return NormBound(_sq1(cache, g), None, None, *_one_row_scales(g.dtype, None, g.shape[2], 0))

        def compute() -> NormBound:
            n = g.shape[1]
            sq = sq_norms(_up(g).sum(1))
            a = _rho(cache, g).sum(1)  # the sum of N rows errs by gamma_N sum_n ||g_n|| at most
            grow = (1 + gamma(g.shape[2] + 3, dtype)) * (1 + gamma(n + 2, dtype))
            hi = sq.sqrt() * (1 + sq_rel(dtype, g.shape[2])) + a * (gamma(n + 2, dtype) * grow)
            return NormBound(sq, hi.square(), a, 1 + gamma(4, dtype), gamma(n + 2, dtype) * grow)

        # the [B, K] gradient is the cheap form; an LSTM's b_ih and b_hh share it (both dz)
        return _shared(cache, "rowsum", g, compute)

    def weighted_sum(self, datas: Sequence[tuple[torch.Tensor]], c: torch.Tensor) -> torch.Tensor:
        total = None
        for (g,) in datas:
            out = g.dtype
            if g.shape[1] == 1:  # sum_b c_b g_b, from the rows the weight's sum scales too
                s = scaled_rows(g, c).sum(0)
            else:  # [B] @ [N, B, K] -> [N, K] -> [K]
                s = (_as(c, _acc(out)) @ _up(g).transpose(0, 1)).sum(0)
            total = s if total is None else total + s
        total = total if total.dtype == out else total.to(out)
        return total if self.shape is None else total.reshape(self.shape)


class SummedRows(RowSum):
    """:class:`RowSum` of rows a rule summed itself over positions (a conv's or a norm
    layer's bias and scale, an attention bias): data ``(s [B, N, K], a [B])``, ``grad_b =
    sum_n s[b, n]``, with ``a_b`` a bound, in norm, on how far ``s_b``'s computed sums may
    be from the exact sums of their terms (:func:`presum`). The bound of the exact norm
    adds ``a``, so an example whose terms cancel (output gradients 1e8, 1, -1e8 over a
    bias's positions: exact 1, summed to 0) still gets a norm above its exact one; the
    estimate and the weighted sum are those of ``s``, which is what the sum adds."""

    def materialize(self, s: torch.Tensor, a: Any = None) -> torch.Tensor:
        return super().materialize(s)

    def prefers_dense(self, datas: Sequence[tuple[Any, ...]]) -> bool:
        return False

    def slack(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``a``, as the accumulation dtype of ``s`` (recorded in the parameter's dtype: a
        half-precision ``a`` is raised by its rounding)."""
        up = _as(a, _acc(s.dtype))
        return up if a.dtype in (torch.float32, F64) else up * (1 + 2 * unit_roundoff(a.dtype))

    def bound(self, datas: Sequence[tuple[Any, ...]], cache: dict | None = None) -> NormBound:
        if len(datas) == 1:
            base = super().bound([(datas[0][0],)], cache)
        else:
            base = GradKind.bound(self, datas)
        return with_slack(base, summed_slack([self.slack(*d) for d in datas], base.sq.dtype))

    def weighted_sum(self, datas: Sequence[tuple[Any, ...]], c: torch.Tensor) -> torch.Tensor:
        return super().weighted_sum([(d[0],) for d in datas], c)


@functools.lru_cache(maxsize=256)
def summed_rows(shape: tuple[int, ...] | None = None) -> SummedRows:
    """The :class:`SummedRows` kind of a ``[*shape]`` parameter, one object per shape (for
    the rules' eager backwards; a traced pass makes fresh ones: ``torch.compile`` does not
    trace the cache)."""
    return SummedRows(shape)


def presum(t: torch.Tensor, dims: tuple[int, ...], lead: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, a)`` for :class:`SummedRows`: ``s``, ``t`` summed over ``dims`` in its
    accumulation dtype (float32 for half precision), and ``a`` (``t``'s first ``lead``
    dims): ``gamma_(n+2) sqrt(n) ||t||`` over all the other dims, raised by the rounding of
    its own computation and by underflow, with ``n`` the terms of each sum. Each of those
    sums errs by ``gamma_(n-1)`` of the sum of its terms' magnitudes, at most ``sqrt(n)``
    times their norm, and each term (a product rounded once) by ``u``: ``a`` bounds, in
    norm, how far ``s`` is from the exact sums of the exact terms. (The sums of magnitudes
    themselves, a 1-norm, took 14 times as long as the sum on a WRN layer; the 2-norm,
    twice.)"""
    up = _up(t)
    dtype = up.dtype
    n = math.prod([up.shape[d] for d in dims])
    s = up.sum(dims)
    rest = tuple(range(lead, up.dim()))
    size = torch.linalg.vector_norm(up, dim=rest) if rest else up.abs()  # [*lead]
    k = max(1, math.prod([up.shape[d] for d in rest]))  # the terms of that norm
    # (the norm rounds by gamma_(k + 3) at most; each of the n products per sum may underflow)
    scale = gamma(n + 2, dtype) * math.sqrt(n) * (1 + gamma(k + 6, dtype))
    return s, size * scale + math.sqrt(k) * underflow(dtype, 1) * math.sqrt(n)


def summed_slack(slacks: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The ``[B]`` slacks of several pieces of one parameter added up in ``dtype``, raised by
    that sum's own rounding: the slack of their sum, for :func:`with_slack`."""
    return _total(list(slacks), dtype) * (1 + gamma(len(slacks), dtype))


def with_slack(b: NormBound, slack: torch.Tensor) -> NormBound:
    """``b`` with ``slack [B]`` (nonnegative) added, in norm, to its bound of the exact
    gradient: for pieces whose computed values may be that far from the exact ones."""
    dtype = b.sq.dtype
    if b.hi2 is None:  # (a relative bound: its weighted sum's error scales with sqrt(sq))
        hi = b.sq.sqrt() * math.sqrt(b.hi_scale) + slack
        return NormBound(b.sq, hi.square(), b.sq.sqrt(), 1 + gamma(4, dtype), b.err_scale * (1 + gamma(2, dtype)))
    hi = (b.hi2 * b.hi_scale).sqrt() + slack
    refine = None if b.refine is None else (lambda total_sq: with_slack(b.refine(total_sq), slack))
    return b._replace(hi2=hi.square(), hi_scale=1 + gamma(4, dtype), refine=refine)


class Collector:
    """Records ``(kind, data)`` pieces for each of ``targets`` (expanded param views).

    Each target gets a ``_psg_record`` attribute; :func:`emit` calls it instead of
    materialising. Attaching it to the tensor (not to a context) means recording also works
    when the backward pass runs outside the block that built the graph.

    With ``outputs=True`` (:func:`psgfunc.per_sample._clip.grad_pieces`, which runs the
    backward itself) a rule may instead compute its layer with plain differentiable ops on
    the shared params and hand over a leaf ``z`` of its output's shape on which the output
    depends as ``y = z + ...`` (:meth:`output`): the caller asks autograd for the gradient
    of ``z``, which is the layer's output gradient, and :meth:`finish` turns it into the
    rule's pieces. No ``autograd.Function`` runs for such a layer (torch's own backward
    gives the input gradient), which on small layers is most of their cost.
    """

    def __init__(self, targets: Sequence[torch.Tensor] = (), *, outputs: bool = False):
        self.records: list[list[tuple[GradKind, tuple[Any, ...]]]] = []
        self.inputs: list[torch.Tensor] = []  # the leaves ``z`` of :meth:`output`
        self._builds: list[Any] = []
        for t in targets:
            i = self.track(t)
            if outputs:
                t._psg_outputs = (self, i)

    def track(self, target: torch.Tensor) -> int:
        """Start recording for ``target``; returns its index in ``records``."""
        i = len(self.records)
        self.records.append([])
        target._psg_record = lambda kind, data: self.records[i].append((kind, data))
        return i

    def output(self, z: torch.Tensor, build: Any) -> None:
        """Take ``d loss / d z`` (``g``, shaped as ``z``) for ``build(g) -> [(record index,
        kind, data), ...]``, the pieces of the layer whose output is ``z + ...``."""
        self.inputs.append(z)
        self._builds.append(build)

    def finish(self, grads: Sequence[torch.Tensor | None]) -> None:
        """Record the pieces of every :meth:`output` from ``grads`` (autograd's gradients of
        :attr:`inputs`, in order; None: the layer's output did not reach the loss)."""
        for build, g in zip(self._builds, grads):
            if g is not None:
                for i, kind, data in build(g):
                    self.records[i].append((kind, data))
        self.inputs, self._builds = [], []


def output_collector(*params: torch.Tensor | None) -> tuple[Collector, list[int | None]] | None:
    """``(collector, record index per param)`` where every non-None ``params`` (expanded
    views, as a rule receives them) is tracked with ``outputs=True`` by one
    :class:`Collector` (see :meth:`Collector.output`); else None (run the rule as usual)."""
    found = None
    idx: list[int | None] = []
    for p in params:
        if p is None:
            idx.append(None)
            continue
        entry = getattr(p, "_psg_outputs", None)
        if entry is None or (found is not None and entry[0] is not found):
            return None
        found = entry[0]
        idx.append(entry[1])
    return None if found is None else (found, idx)


def collecting(target: torch.Tensor) -> bool:
    """Whether :func:`emit` records pieces for ``target`` (fast clipping) rather than
    materialising its per-sample gradient."""
    return getattr(target, "_psg_record", None) is not None


def emit(target: torch.Tensor, kind: GradKind, *data: Any) -> torch.Tensor | None:
    """The per-sample gradient for ``target`` (an expanded ``[B, *shape]`` param).

    Materialised, unless a :class:`Collector` tracks ``target``: then the pieces are recorded
    and None is returned (the rule passes no gradient on for it).
    """
    record = getattr(target, "_psg_record", None)
    if record is not None:
        record(kind, tuple(_in_dtype(t, target.dtype) for t in data))
        return None
    return kind.materialize(*data).to(target.dtype)  # autocast: computed in the pieces' dtype


def _in_dtype(t: Any, dtype: torch.dtype) -> Any:
    """A piece to record: detached, and a floating one in the parameter's ``dtype`` (under
    autocast the rules' pieces are half precision; norms and sums then run in ``dtype``).
    One cast per tensor object: the pieces a layer shares between its weight and bias stay
    one tensor."""
    if not isinstance(t, torch.Tensor):
        return t
    if t.dtype == dtype or not t.is_floating_point():
        return t.detach() if t.requires_grad else t  # (an output gradient has no history)
    cached = getattr(t, "_psg_cast", None)  # (version of t, its cast)
    if cached is None or cached[0] != t._version or cached[1].dtype != dtype:
        cached = t._psg_cast = (t._version, t.detach().to(dtype))
    return cached[1]


class LeafPieces:
    """One parameter's per-sample gradient as recorded pieces, plus any dense part.

    Args:
        records: ``(kind, data)`` pieces emitted by rules for this parameter.
        dense: a materialised ``[B, *shape]`` contribution (from ops without a rule), or None.
        size: the batch size ``B``.
        shape: the parameter's shape.
        cache: shared by the parameters of one pass (:func:`leaf_pieces`), or None.

    If all records share one kind and there is no dense part, norms and sums come from the
    kind without materialising; otherwise the pieces are added up densely.

    Attributes:
        bound: the :class:`NormBound` of the parameter's per-example gradients.
        sq_norm: ``[B]`` squared norm estimates (``bound.sq`` in float32 or float64).
        dtype: the dtype of :meth:`weighted_sum`'s result (the pieces').
    """

    def __init__(
        self,
        records: Sequence[tuple[GradKind, tuple[Any, ...]]],
        dense: torch.Tensor | None,
        size: int,
        shape: Sequence[int],
        cache: dict | None = None,
    ):
        self.size = size
        self.materialized = dense is not None
        if size == 0:  # an empty (Poisson) batch: nothing to ask the kinds
            floats = [t for _, data in records for t in data if isinstance(t, torch.Tensor) and t.is_floating_point()]
            ref = dense if dense is not None else floats[0]
            self.kind, self.datas = None, []
            self.dense = ref.new_zeros((0, *shape))
            self.dtype = ref.dtype
            self.bound = NormBound(ref.new_zeros(0, dtype=_acc(ref.dtype)))
            return
        first = records[0][0] if records else None
        datas = [data for _, data in records]
        # kinds compare by value (GradKind.__eq__), rules mostly reuse one object: `is` first
        one_kind = dense is None and first is not None and (
            len(records) == 1 or all(k is first or k == first for k, _ in records))
        if one_kind and not first.prefers_dense(datas):
            self.kind: GradKind | None = first
            self.datas = datas
            self.dense = None
            self.dtype = next(t.dtype for t in self.datas[0] if isinstance(t, torch.Tensor) and t.is_floating_point())
            self.bound = first.bound(self.datas, cache)
            return
        self.kind, self.datas = None, []
        total = dense
        for kind, data in records:
            g = kind.materialize(*data)
            total = g if total is None else total + g
        if total is None:
            raise ValueError(f"no gradient pieces for a parameter of shape {tuple(shape)}")
        self.dense = total
        self.dtype = total.dtype
        self.bound = dense_bound(total)
        slacks = []
        for kind, data in records:
            slack = kind.slack(*data)
            if slack is not None:
                slacks.append(slack)
        if slacks:  # (pieces summed by their rule: how far from exact they may be adds up)
            self.bound = with_slack(self.bound, summed_slack(slacks, self.bound.sq.dtype))

    _lane: tuple[_OneRowLane, int] | None = None
    _bound: NormBound | None = None

    @classmethod
    def in_lane(cls, record: tuple[GradKind, tuple[Any, ...]], size: int, lane: _OneRowLane, j: int) -> LeafPieces:
        """Leaf ``j`` of ``lane`` (:func:`leaf_pieces`): its one ``record``, and its bound
        asked from the lane when read."""
        self = cls.__new__(cls)
        self.size, self.materialized, self.dense = size, False, None
        self.kind, self.datas = record[0], [record[1]]
        self.dtype = lane.dtype
        self._lane = (lane, j)
        return self

    @property
    def bound(self) -> NormBound:
        """The :class:`NormBound` of the parameter's per-example gradients."""
        b = self._bound
        if b is None:
            b = self._bound = self._lane[0].bound(self._lane[1])
        return b

    @bound.setter
    def bound(self, value: NormBound) -> None:
        self._bound = value
        self._lane = None  # (a bound set from outside: certified_norm reads it, not the lane)

    @property
    def sq_dtype(self) -> torch.dtype:
        """The dtype of :attr:`sq_norm` (without computing a lane leaf's bound)."""
        return _acc(self._lane[0].dtype) if self._bound is None else self._bound.sq.dtype

    @property
    def sq_norm(self) -> torch.Tensor:
        """``[B]`` squared norm estimates, in float32 (float64 for float64 pieces)."""
        return self.bound.sq

    def release(self) -> None:
        """Drop the pieces and the bound (and what they keep alive: layer inputs, output
        gradients, Grams): call once this parameter's last :meth:`weighted_sum` is taken,
        so that a pass holds each layer's pieces only until its own sum is done."""
        self.datas, self.dense, self.kind = [], None, None
        if self._bound is not None and self._bound.refine is not None:
            self._bound = self._bound._replace(refine=None)

    def materialize(self) -> torch.Tensor:
        """The per-sample gradients ``[B, *shape]`` (the dense part plus every piece
        materialised), e.g. for a dense fallback where the pieces' norms overflow."""
        total = self.dense
        for data in self.datas if self.kind is not None else ():
            g = self.kind.materialize(*data)
            total = g if total is None else total + g
        return total

    def weighted_sum(self, c: torch.Tensor) -> torch.Tensor:
        """``sum_b c_b grad_b``, shaped like the parameter, in :attr:`dtype` (computed in
        float32 for half-precision pieces)."""
        if self.kind is not None:
            return self.kind.weighted_sum(self.datas, c)
        dense = self.dense
        total = _as(c, _acc(dense.dtype)) @ _up(_rows(dense))
        return _as(total, dense.dtype).reshape(dense.shape[1:])


def leaf_pieces(
    records: Sequence[Sequence[tuple[GradKind, tuple[Any, ...]]]],
    dense: Sequence[torch.Tensor | None],
    size: int,
    shapes: Sequence[Sequence[int]],
) -> list[LeafPieces]:
    """:class:`LeafPieces` for several parameters of one pass, computing what their pieces
    share once (the Gram of an output gradient that two weights see, the norms of a layer's
    output gradient for its bias and its weight). Under ``torch.compile`` nothing is shared
    by identity (traced tensors have no storage; the compiler merges equal work itself)."""
    cache: dict | None = None if torch.compiler.is_compiling() else {}
    if cache is not None and size > 0:
        # (single records of exactly Outer or RowSum: _combined leaves them as they are)
        lane = _one_row_lane(records, dense, size)
        if lane is not None:
            return [LeafPieces.in_lane(r[0], size, lane, j) for j, r in enumerate(records)]
    records = [_combined(r) for r in records]
    if cache is not None and size > 0:
        _prefetch_sq1(cache, [t for r, d in zip(records, dense) if r and d is None
                              for t in r[0][0].one_position([data for _, data in r])])
    return [LeafPieces(r, d, size, s, cache) for r, d, s in zip(records, dense, shapes)]


def _prefetch_sq1(cache: dict, tensors: Sequence[torch.Tensor]) -> None:
    """Put on ``cache`` the :func:`_sq1` of every ``[B, 1, K]`` tensor in ``tensors`` (one
    position per example: a linear layer's input and output gradient on vectors), in a few
    operations for all of them: each one's row norms, then one stack, square and add. The
    values are :func:`sq_norms`' (rows of at most ``FAST_ONE_PASS``, one reduction each),
    plus the largest :func:`underflow` term of the group, which covers each one's own; on a
    small model each operation costs more than its arithmetic, and these were three per
    tensor."""
    groups: dict[tuple[torch.dtype, int], dict[Any, torch.Tensor]] = {}
    for t in tensors:
        key = ("sq1", _key(t))
        if t.shape[2] <= FAST_ONE_PASS and t.shape[1] == 1 and key not in cache:
            groups.setdefault((t.dtype, t.shape[0]), {})[key] = t
    for (dtype, _), group in groups.items():
        if len(group) < 2:
            continue  # (one tensor: sq_norms itself, when asked)
        cache.update(zip(group, _stacked_sq1(list(group.values()), dtype).unbind(0)))


def _stacked_sq1(tensors: Sequence[torch.Tensor], dtype: torch.dtype, extra: torch.Tensor | None = None) -> torch.Tensor:
    """``[T, B]``: the squared row norms of ``T`` tensors ``[B, 1, K]`` of ``dtype`` (``K`` at
    most ``FAST_ONE_PASS``), each one reduction, in one stack, square and add, raised by the
    largest :func:`underflow` term among them (see :func:`_prefetch_sq1`); ``extra`` (``[B]``,
    the accumulation dtype) is stacked after them as it is (its square and that term leave
    ones unchanged)."""
    acc = None if dtype in _FULL else torch.float32
    norms = [torch.linalg.vector_norm(t, dim=(1, 2), dtype=acc) for t in tensors]
    most = max(t.shape[2] for t in tensors)
    return torch.stack(norms if extra is None else [*norms, extra]).square_().add_(underflow(_acc(dtype), most))


class _OneRowLane:
    """The norms of a pass whose every parameter is the weight or the bias of linear layers
    on vectors (one :class:`Outer` or :class:`RowSum` record each, one position per
    example): each leaf's squared norm is ``sq1(g) sq1(x)`` or ``sq1(g)``, and the certified
    norm their sum, raised by constant scales. On a small MLP the per-leaf objects
    (:class:`NormBound`, the caches, :func:`certified_norm`'s loop) cost more than that
    arithmetic: here it is the row norms of the distinct tensors stacked once
    (:func:`_stacked_sq1`, with a row of ones), two index selects, one product and one sum,
    for the whole pass. The values are those of the per-leaf route (the same products, summed
    in the same stacked order), which :meth:`bound` gives for a leaf on its own (per-layer
    clipping, ``sq_norms``).

    Built by :func:`_one_row_lane`; its leaves refer to it (never the other way round, so
    that no cycle keeps a pass's pieces alive).
    """

    def __init__(self, tensors: list[torch.Tensor], dtype: torch.dtype, plan: tuple[Any, ...]):
        self.tensors, self.dtype = tensors, dtype
        self.gi, self.xi, self.floor, self.scales, self.factor = plan
        self.n = len(self.scales)
        self._products: torch.Tensor | None = None

    def products(self) -> torch.Tensor:
        """``[L, B]``: every leaf's squared norm estimate (computed once; the tensors are then
        dropped)."""
        if self._products is None:
            if torch._C._is_any_autocast_enabled():  # (read inside a caller's autocast block)
                from psgfunc.functional import _autocast

                with _autocast.off():
                    return self.products()
            t = self.tensors
            sq = _stacked_sq1(t, self.dtype, _ones(t[0].shape[0], _acc(self.dtype), t[0].device))
            # (a weight's product raised by what its underflow may take, a bias's by 0: as
            # outer_bound and RowSum.bound)
            self._products = sq.index_select(0, self.gi).mul_(sq.index_select(0, self.xi)).add_(self.floor)
            self.tensors = []
        return self._products

    def bound(self, j: int) -> NormBound:
        """Leaf ``j``'s :class:`NormBound`, as its kind's :meth:`~GradKind.bound` gives it."""
        return NormBound(self.products()[j], None, None, *self.scales[j])

    def covers(self, leaves: Sequence[Any], out_dtypes: Sequence[torch.dtype] | None) -> bool:
        """Whether ``leaves`` are exactly this lane's, in order, each with the bound the lane
        gives it, and no sum ends in a dtype narrower than the lane's (:func:`certified_norm`)."""
        if len(leaves) != self.n:
            return False
        for j, leaf in enumerate(leaves):
            mine = getattr(leaf, "_lane", None)
            if mine is None or mine[0] is not self or mine[1] != j:
                return False
        u = unit_roundoff(self.dtype)
        return out_dtypes is None or all(unit_roundoff(d) <= u for d in out_dtypes)

    def certified(self) -> torch.Tensor:
        """``[B]``: :func:`certified_norm` of the lane's leaves (all relative bounds: the
        square root of the summed estimates, times the largest scales and the sum's own
        rounding)."""
        return self.products().sum(0).sqrt_().mul_(self.factor)


def _ones(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``[size]`` tensor of ones, made once per ``(size, dtype, device)`` (only ever
    read: :func:`_stacked_sq1` copies it into its stack)."""
    key = (size, dtype, device)
    ones = _ONES.get(key)
    if ones is None:
        if len(_ONES) >= _LANE_CACHE_MAX:
            _ONES.clear()
        with torch.inference_mode(False):  # (an ordinary tensor, whatever the caller's mode)
            ones = _ONES[key] = torch.ones(size, dtype=dtype, device=device)
    return ones


_ONES: dict[tuple[Any, ...], torch.Tensor] = {}

_LANE_PLANS: dict[tuple[Any, ...], tuple[Any, ...]] = {}
"""Structure of a lane (dtype, device, per leaf: kind, sizes, which distinct tensors) ->
``(g indices, x indices, per-leaf floors [L, 1], per-leaf scales, the certified norm's
factor)``."""


def _one_row_lane(records: Sequence[Sequence[tuple[GradKind, tuple[Any, ...]]]], dense: Sequence[Any],
                  size: int) -> _OneRowLane | None:
    """The :class:`_OneRowLane` of these leaves' records, or None where one of them is not a
    single one-position :class:`Outer` or :class:`RowSum` piece (exactly those classes) of
    one full-precision dtype, rows of at most ``FAST_ONE_PASS``."""
    index: dict[Any, int] = {}
    tensors: list[torch.Tensor] = []
    key: list[Any] = []
    dtype = None
    for r, d in zip(records, dense):
        if d is not None or len(r) != 1:
            return None
        kind, data = r[0]
        cls = type(kind)
        if cls is Outer:
            if len(data) != 2:
                return None
            g, x = data
        elif cls is RowSum:
            if len(data) != 1:
                return None
            g, x = data[0], None
        else:
            return None
        ids = []
        for t in (g,) if x is None else (g, x):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[1] != 1 or t.shape[0] != size:
                return None
            if t.shape[2] > FAST_ONE_PASS:
                return None
            if dtype is None:
                dtype = t.dtype
                if dtype not in _FULL:
                    return None
            elif t.dtype != dtype:
                return None
            k = _key(t)
            j = index.get(k)
            if j is None:
                j = index[k] = len(tensors)
                tensors.append(t)
            ids.append(j)
        key.append((cls, ids[0], g.shape[2], -1 if x is None else ids[1], 0 if x is None else x.shape[2]))
    if not key:
        return None
    plan_key = (dtype, tensors[0].device, tuple(key))
    plan = _LANE_PLANS.get(plan_key)
    if plan is None:
        ones = len(tensors)  # (the row of ones a bias's norm is multiplied by)
        scales = [_one_row_scales(dtype, None if xi < 0 else dtype, o, i) for _, _, o, xi, i in key]
        k_hi = max([1.0] + [h for h, _ in scales])
        k_plain = max([0.0] + [e for _, e in scales])
        factor = (math.sqrt(k_hi) + k_plain) * (1 + gamma(len(key) + 8, _acc(dtype)))
        device = tensors[0].device
        gi = torch.tensor([gj for _, gj, _, _, _ in key], device=device)
        xi = torch.tensor([ones if xj < 0 else xj for _, _, _, xj, _ in key], device=device)
        floor = torch.tensor([[0.0 if xj < 0 else underflow(_acc(dtype), 1)] for _, _, _, xj, _ in key],
                             dtype=_acc(dtype), device=device)
        if len(_LANE_PLANS) >= _LANE_CACHE_MAX:
            _LANE_PLANS.clear()
        plan = _LANE_PLANS[plan_key] = (gi, xi, floor, scales, factor)
    return _OneRowLane(tensors, dtype, plan)


_LANE_CACHE_MAX = 256
"""Entries of :data:`_LANE_PLANS` and of the ones' table before they are cleared."""


COMBINERS: list[Any] = []
"""``combine(records) -> records or None``: rewrite one parameter's pieces of several kinds
into pieces of one kind that knows their sum (a table used by an embedding and by a tied
output head); the first that applies wins. Rules' modules append to it."""


def _combined(records: Sequence[tuple[GradKind, tuple[Any, ...]]]) -> Sequence[tuple[GradKind, tuple[Any, ...]]]:
    if not records:
        return records
    first = records[0][0]
    if all(k is first or k == first for k, _ in records):
        return first.rebuilt(records) or records
    if not COMBINERS:
        return records
    for combine in COMBINERS:
        out = combine(records)
        if out is not None:
            return out
    return records


def certified_norm(leaves: Sequence[LeafPieces], out_dtypes: Sequence[torch.dtype] | None = None) -> torch.Tensor:
    """``[B]`` per-example norms to clip by (float32, float64 if any leaf is float64):
    clipping with ``C / max(C, norm)`` keeps each example's contribution to the weighted
    sums at most ``C`` in norm, AS COMPUTED.

    ``norm = (sqrt(sum_l hi2_l) + sqrt(sum_l err_l^2)) * (1 + rel)`` over the leaves'
    :class:`NormBound` (scales applied): the exact norm's upper bound, plus what the
    weighted sums' rounding can add (both scale with ``sum_n ||g_n|| ||x_n||``, the size of
    the terms, which only exceeds the norm when they cancel), and ``rel``: this sum's and
    the factor's own rounding and, where a sum ends in a narrower dtype (``out_dtypes``, by
    default each leaf's :attr:`~LeafPieces.dtype`: bfloat16 pieces are summed in float32),
    that dtype's unit roundoff (each coordinate rounds by at most that, relatively).

    Where the Gram forms' rounding bounds add up to more than ``GRAM_TOLERANCE`` of an
    example's squared norm, their finer bounds are computed (:attr:`NormBound.refine`;
    cancelling examples get float64 Grams), so on ordinary float32 inputs the result
    exceeds the exact norm by about 1e-4 relatively at most (3e-5 without Gram forms); in
    float64 by about 1e-13.
    """
    if not leaves:
        return torch.zeros(0)
    lane = getattr(leaves[0], "_lane", None)
    if lane is not None and lane[0].covers(leaves, out_dtypes):
        return lane[0].certified()
    plain, hi2, err2, unc = [], [], [], []  # plain: the sq of leaves whose errors are relative
    k_hi, k_plain, k_err, u_out = 1.0, 0.0, 0.0, 0.0
    dtype = torch.float32
    for k, leaf in enumerate(leaves):
        b = leaf.bound
        dtype = F64 if b.sq.dtype == F64 else dtype
        k_hi = max(k_hi, b.hi_scale)
        if b.hi2 is None:
            plain.append(b.sq)
            k_plain = max(k_plain, b.err_scale)
        else:
            hi2.append(b.hi2)
            err2.append(b.err)
            k_err = max(k_err, b.err_scale)
            if b.unc is not None:
                unc.append(b.unc)
        if out_dtypes is None and leaf.dtype in _FULL:
            continue  # (its sum ends in the dtype it was computed in)
        out = max(unit_roundoff(leaf.dtype), unit_roundoff(out_dtypes[k]) if out_dtypes else 0.0)
        if out > unit_roundoff(_acc(leaf.dtype)):
            u_out = max(u_out, out)
    rel = (1 + gamma(len(leaves) + 8, dtype)) * (1 + u_out)
    plain_sq = _total(plain, dtype)
    if not hi2:  # no cancelling leaf: one relative bound
        return plain_sq.sqrt() * ((math.sqrt(k_hi) + k_plain) * rel)
    total = _total(hi2, dtype) if plain_sq is None else _total([*hi2, plain_sq], dtype)
    if unc and not torch.compiler.is_compiling() and bool((_total(unc, dtype) > GRAM_TOLERANCE * total).any()):
        for leaf in leaves:  # Gram rounding bounds too loose for some example: tighten
            if leaf.bound.refine is not None:
                leaf.bound = leaf.bound.refine(total)
        return certified_norm(leaves, out_dtypes)
    err = _total([e.square() for e in err2], dtype) * k_err**2
    if plain_sq is not None:
        err = err + plain_sq * k_plain**2
    return (total.sqrt() * math.sqrt(k_hi) + err.sqrt()) * rel


_FULL = (torch.float32, F64)


def _total(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor | None:
    """The sum of ``[B]`` tensors (in ``dtype``), None for none; one operation for many."""
    if not parts:
        return None
    if len(parts) == 1:
        return _as(parts[0], dtype)
    if len(parts) == 2:
        return _as(parts[0], dtype) + _as(parts[1], dtype)
    return torch.stack([_as(t, dtype) for t in parts]).sum(0)
