"""``DPOptimizer``: DP-SGD around any ``torch.optim`` optimizer, reading ``p.grad_sample``.

The optimizer is a thin stateful shell over :func:`dp_sgd_transform`: it gathers the
trainable parameters' per-sample gradients in ``param_groups`` order, clips them per example
across all parameters, keeps the running clipped sum over micro-batches, and on ``step()``
asks the transform for the noisy average, writes it to ``p.grad`` and steps the inner
optimizer. The numbers are therefore those of ``dp_sgd_transform(...).update`` applied to
the list ``[p.grad_sample for p in params]`` with the same seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch

from psgfunc._dispatch import no_autograd
from psgfunc._tree import batch_size, tree_flatten
from psgfunc.dp._clip import _check_positive_finite, clip_factor, clipped_sum, rounding_floor
from psgfunc.dp._distributed import prepare_optimizer
from psgfunc.dp._transform import DPSGDState, dp_sgd_transform
from psgfunc.functional import _autocast
from psgfunc.per_sample import _rows
from psgfunc.per_sample._clip import weighted_sums
from psgfunc.per_sample._kinds import certified_norm, leaf_pieces


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the running clipped sum (and of the noise added to it) for parameters of
    ``dtype``: float32 for half precision, else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class DPOptimizer(torch.optim.Optimizer):
    """Differentially private wrapper of a ``torch.optim`` optimizer (DP-SGD, Abadi et al. 2016).

    After ``loss.backward()`` every trainable parameter ``p`` holds ``p.grad_sample`` of shape
    ``[B, *p.shape]`` (``psgfunc.nn`` shells set it; functional users call
    :meth:`set_grad_sample`). ``step()`` then replaces ``p.grad`` by

        (sum_b clip(g_b, C) + N(0, (sigma C)^2)) / expected_batch_size

    with ``g_b`` example ``b``'s gradient over ALL parameters together, and steps the inner
    optimizer. ``p.grad`` as left by ``backward`` (the non-private gradient) is never used.

    Gradient accumulation (one logical batch in several physical micro-batches, e.g. to fit
    in memory): after each micro-batch's backward call :meth:`accumulate`, which clips that
    micro-batch's examples, adds them to a running clipped sum and clears ``grad_sample``;
    ``step()`` accumulates whatever is left and adds noise ONCE for the logical batch::

        for x, y in micro_batches(logical_batch):      # e.g. PoissonDataLoader batch, split
            loss_fn(model(x), y).backward()
            dp_opt.accumulate()
        dp_opt.step()                                   # noise once, inner step once
        dp_opt.zero_grad()

    Clipping is per example, so the split never changes the result (up to float rounding) nor
    the privacy analysis: account with the logical batch's ``sample_rate`` and one step per
    ``step()`` call. ``expected_batch_size`` is the logical batch's expected size.

    An empty Poisson batch (no parameter has ``grad_sample``, or all have a leading 0) makes
    ``step()`` a pure-noise step, as the privacy analysis requires; but if backward did run
    and left only plain ``p.grad`` (a model that was never converted with
    ``psgfunc.nn.expand_weights``), that is a ValueError, not a noise step.

    Rows are examples: the rows of two forward passes are never added (a ValueError asks for
    :meth:`accumulate` between micro-batches), the rows of a forward pass that
    :meth:`accumulate` clipped cannot come back, and rows that miss a use of their parameter
    outside psgfunc layers are refused (see ``psgfunc.per_sample._rows``).

    Learning-rate schedulers may be given the ``DPOptimizer`` or its ``.optimizer``:
    ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters.
        max_norm: per-example clipping bound ``C > 0`` (one float: global clipping).
        noise_multiplier: ``sigma >= 0``.
        expected_batch_size: expected logical batch size, ``sample_rate * dataset_size``.
        seed: seeds the noise generator once (reproducible runs); ``None``: OS entropy.
        secure: a fresh OS-entropy seed for every step's noise (production runs); see
            :func:`dp_sgd_transform`.
        loss_reduction: how the loss that is backpropagated reduces over the batch.
            ``"sum"`` (default): ``p.grad_sample[b]`` is example b's gradient as it is.
            ``"mean"``: the loss was averaged over the ``B`` examples of the micro-batch, so
            ``grad_sample`` holds ``g_b / B``; it is multiplied by ``B`` before clipping, as
            Opacus does. Getting this wrong does not break privacy but silently clips
            ``B`` times too loosely and shrinks the signal against the noise.
        fast_clipping: never build ``p.grad_sample`` for parameters of psgfunc layers
            (``psgfunc.nn`` shells, ``expand_weights``-converted models, DPLSTM): their rules
            record layer inputs and output gradients during backward, and :meth:`accumulate`
            computes per-example norms from them (Gram form where cheaper) and the clipped sum
            in one contraction per parameter (ghost clipping / book-keeping). Same numbers as
            the default, far less memory and time for large layers. Parameters that get
            ``grad_sample`` another way (``set_grad_sample``, ops without a rule) are used
            densely. ``p.grad`` is not filled by backward in this mode. The records belong
            to this optimizer: they stop when it is garbage collected, and a newer
            ``DPOptimizer`` on the same parameters takes them over (this one then raises).
        distributed: ``True`` (torch.distributed's default process group) or a
            ``ProcessGroup``: one DP-SGD run over several processes. Each rank clips its own
            examples (micro-batches, fast clipping as usual); ``step()`` all-reduces the
            clipped sums (one all-reduce of the trainable parameters' size) and adds the
            noise once, identical on every rank (rank 0's seed, broadcast; with
            ``secure=True`` a fresh rank-0 OS-entropy seed every step), so every rank applies
            the identical update. ``expected_batch_size`` is the GLOBAL expected batch;
            feed each rank ``PoissonDataLoader(..., distributed=True)``; every rank calls
            ``step()`` every time, empty batches included. Rank 0's parameters are broadcast
            at construction. See :mod:`psgfunc.dp._distributed`.

    A model wrapped in ``torch.nn.parallel.DistributedDataParallel`` is refused (whenever a
    process group is initialised): DDP all-reduces the raw gradients, which DP-SGD must not
    release; use ``distributed=True`` on the unwrapped model instead.

    Raises:
        ValueError: for invalid ``max_norm``, ``noise_multiplier``, ``expected_batch_size``,
            ``seed`` with ``secure=True``, a per-layer (dict) ``max_norm`` (use
            :func:`dp_sgd_transform` for per-layer clipping), ``distributed`` without an
            initialised process group, or parameters of a ``DistributedDataParallel`` model.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        max_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        seed: int | None = None,
        secure: bool = False,
        loss_reduction: str = "sum",
        fast_clipping: bool = False,
        distributed: Any = False,
    ) -> None:
        # Deliberately no super().__init__: all optimizer state lives in `optimizer`.
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"DPOptimizer: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(max_norm, Mapping):
            raise ValueError(
                "DPOptimizer: max_norm must be one float (global clipping); for per-layer "
                "clipping use psgfunc.dp.dp_sgd_transform with a dict max_norm"
            )
        max_norm = _check_positive_finite(max_norm, "DPOptimizer: max_norm")
        if loss_reduction not in ("sum", "mean"):
            raise ValueError(
                f"DPOptimizer: loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}; "
                "say how the loss you call backward() on reduces over the batch"
            )
        self.loss_reduction = loss_reduction
        self.optimizer = optimizer
        group = prepare_optimizer(self._all_params(), distributed, "DPOptimizer")
        self.transform = dp_sgd_transform(
            max_norm,
            noise_multiplier,
            expected_batch_size=expected_batch_size,
            seed=seed,
            secure=secure,
            distributed=group,  # its update_from_sum all-reduces the clipped sum, then noises once
        )
        self.dp_state: DPSGDState = self.transform.init(self._trainable())
        self._summed: list[torch.Tensor] | None = None
        self._summed_params: list[int] = []  # id of each trainable parameter _summed is for
        self.accumulated_examples = 0
        self.fast_clipping = bool(fast_clipping)
        self.accountant: Any = None  # a PrivacyAccountant (make_private sets one): step() counts
        self._logical_batch_open = False  # a VirtualBatchLoader's slice that does not end its batch
        # newest DPOptimizer on a parameter wins; its logs die with it (the registry is weak)
        self._logs = _rows.claim(self._trainable(), self.fast_clipping)
        # whatever p.grad holds now (an earlier optimizer's update, a public pretraining's
        # gradient) is no gradient of this optimizer's steps (_rows.mark_clean; see _empty),
        # nor a use outside psgfunc layers; frozen parameters too: unfrozen later, what their
        # p.grad holds is no gradient of a DP step either
        for p in self._all_params():
            _rows.mark_clean(p)

    # ----------------------------------------------------------------- torch.optim surface

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus ``"psgfunc_dp"``: the number of DP steps
        taken and, unless ``secure=True``, the noise generator's state, so that a run resumed
        with :meth:`load_state_dict` draws the noise the uninterrupted run would have drawn.

        With ``secure=True`` the generator is left out on purpose: its state would reveal
        the last step's noise to whoever reads the checkpoint.

        Raises:
            ValueError: while a logical batch is being accumulated (its partial clipped sum
                is not saved); call ``step()`` first.
        """
        if self._summed is not None:
            raise ValueError(
                "DPOptimizer.state_dict: a logical batch is half accumulated and its clipped sum "
                "would be lost; call step() first, then save"
            )
        state = self.optimizer.state_dict()
        dp_state: dict[str, Any] = {"step": self.dp_state.step}
        if not self.transform.secure:
            dp_state["generator"] = self.dp_state.generator.get_state()
        state["psgfunc_dp"] = dp_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict` (or a plain one of the inner optimizer,
        which leaves the noise generator and step count as they are)."""
        state_dict = dict(state_dict)
        dp_state = state_dict.pop("psgfunc_dp", None)
        self.optimizer.load_state_dict(state_dict)
        if dp_state is not None:
            generator = self.dp_state.generator
            if "generator" in dp_state and not self.transform.secure:
                generator = torch.Generator(device=generator.device)
                generator.set_state(dp_state["generator"])
            self.dp_state = DPSGDState(generator, int(dp_state["step"]))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer (before any :meth:`accumulate`)."""
        if self._summed is not None:
            raise ValueError(
                "DPOptimizer.add_param_group: a logical batch is being accumulated; call "
                "step() first, then add the group"
            )
        self.optimizer.add_param_group(param_group)
        for p in self.optimizer.param_groups[-1]["params"]:
            _rows.mark_clean(p)  # (as in __init__)
        new = [p for p in self.optimizer.param_groups[-1]["params"] if p.requires_grad]
        self._logs.update(_rows.claim(new, self.fast_clipping))

    def __repr__(self) -> str:
        return f"DPOptimizer({self.transform!r}, optimizer={self.optimizer!r})"

    # ----------------------------------------------------------------- DP machinery

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _trainable(self) -> list[torch.Tensor]:
        return [p for p in self._all_params() if p.requires_grad]

    def set_grad_sample(self, params: Any, grads: Any) -> None:
        """Attach per-sample gradients to parameters, for functional users.

        ``opt.set_grad_sample(params, pf.per_sample_grads(fn, params, x, y))`` sets
        ``p.grad_sample = g`` leaf by leaf.

        Args:
            params: pytree of this optimizer's parameters, e.g. ``dict(model.named_parameters())``.
            grads: pytree of the same structure with leaves ``[B, *p.shape]``.

        Raises:
            ValueError: if the structures differ, a leaf's shape is not ``[B, *p.shape]``, or
                a parameter is not one of this optimizer's.
        """
        p_leaves, p_spec = tree_flatten(params)
        g_leaves, g_spec = tree_flatten(grads)
        if p_spec != g_spec:
            raise ValueError(
                f"DPOptimizer.set_grad_sample: grads must have params' structure; got {g_spec} "
                f"for params {p_spec}"
            )
        mine = {id(p) for p in self._all_params()}
        for i, (p, g) in enumerate(zip(p_leaves, g_leaves)):
            if id(p) not in mine:
                raise ValueError(
                    f"DPOptimizer.set_grad_sample: params leaf {i} (shape {tuple(p.shape)}) is not "
                    "a parameter of the wrapped optimizer; pass the tensors the optimizer holds"
                )
            if g.dim() != p.dim() + 1 or g.shape[1:] != p.shape:
                raise ValueError(
                    f"DPOptimizer.set_grad_sample: grads leaf {i} has shape {tuple(g.shape)}, "
                    f"expected [B, {', '.join(map(str, p.shape))}]"
                )
        for p, g in zip(p_leaves, g_leaves):
            p.grad_sample = g

    def _grad_samples(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        params = self._same_params(self._trainable())
        samples = [getattr(p, "grad_sample", None) for p in params]
        return params, samples

    def accumulate(self) -> torch.Tensor:
        """Clip the current micro-batch per example and add it to the logical batch's sum.

        Reads ``p.grad_sample`` from every trainable parameter, then clears ``p.grad_sample``
        and ``p.grad``. If no parameter has ``grad_sample`` the micro-batch is empty (a
        no-op). With ``fast_clipping`` each parameter's recorded pieces are freed as soon as
        its clipped sum is taken, so once the norms are known the micro-batch is consumed: if
        a sum then fails (out of memory), it is dropped as by :meth:`zero_grad`.

        Returns:
            ``[B]`` per-example gradient norms before clipping, as clipping used them (with
            ``fast_clipping``, certified upper bounds: see ``clipped_grad_sum``); for
            logging, computing statistics from them is not private.

        Raises:
            ValueError: if some trainable parameters have ``grad_sample`` and others do not
                (except parameters of psgfunc layers that no backward reached, e.g. a pooler
                the loss does not use: their per-sample gradients are zero), a
                ``grad_sample`` is not shaped ``[B, *p.shape]``, the ``B``'s differ, or an
                example's gradient holds NaN or Inf; if none has per-sample gradients but
                backward left ``p.grad`` (a model not converted with ``expand_weights``); if a
                parameter's per-sample gradients miss a use of it outside psgfunc layers; if
                a newer ``DPOptimizer`` took over this one's fast-clipping records.
        """
        if self.fast_clipping:
            return self._accumulate_pieces()
        params, samples = self._grad_samples()
        if any(_rows.log_of(p) is not None for p in params):
            raise self._taken_over()
        present = [s is not None for s in samples]
        if not any(present):
            return self._empty(params)
        if not all(present):
            self._unreached(params, present)  # ValueError unless no backward reached them
            b = batch_size([s for s in samples if s is not None], what="grad_sample")
            samples = [s if ok else p.new_zeros(()).expand(b, *p.shape)
                       for p, s, ok in zip(params, samples, present)]
        for i, (p, s) in enumerate(zip(params, samples)):
            if not isinstance(s, torch.Tensor) or s.dim() != p.dim() + 1 or s.shape[1:] != p.shape:
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(
                    f"DPOptimizer: parameter #{i}'s grad_sample has shape {got}, expected "
                    f"[B, {', '.join(map(str, p.shape))}] for a parameter of shape {tuple(p.shape)}"
                )
        self._check_plain_uses(params, [False] * len(params), samples)
        tags = [getattr(s, "_psg_call", None) for s in samples]
        b = batch_size(samples, what="grad_sample")
        if self.loss_reduction == "mean":
            samples = [s * b for s in samples]
        summed, norms = clipped_sum(samples, self.transform.max_norm, "DPOptimizer")
        self._add_to_sum(summed)
        self.accumulated_examples += b
        for p, tag in zip(params, tags):
            _rows.consume(tag)  # its forward pass may not deliver again
            p.grad_sample = None
            p.grad = None
        return norms

    @staticmethod
    def _taken_over() -> ValueError:
        return ValueError(
            "DPOptimizer: a newer DPOptimizer was built on this optimizer's parameters with "
            "another fast_clipping setting and took over their per-sample gradients (the "
            "newest one gets them); use that one, or build this one again"
        )

    def _empty(self, params: list[torch.Tensor]) -> torch.Tensor:
        """An empty micro-batch: ``[0]`` norms, or a ValueError if backward did run but left
        plain ``p.grad`` only (a model without per-sample gradients: the step would be noise)."""
        plain = []
        for i, p in enumerate(params):
            g = p.grad
            if g is None or _rows.marked_clean(p):
                continue  # nothing, or the last step's update untouched since
            if bool(g.ne(0).any()):
                plain.append(f"#{i} shape {tuple(p.shape)}")
        if plain:
            raise ValueError(
                "DPOptimizer: no trainable parameter has per-sample gradients (grad_sample or "
                "a fast-clipping record), but backward left p.grad on parameters "
                + ", ".join(plain[:10]) + (" ..." if len(plain) > 10 else "")
                + " (in param_groups order): the model does not compute per-sample gradients "
                "and step() would apply pure noise. Convert it with psgfunc.nn.expand_weights("
                "model, max_batch_size) or build it from psgfunc.nn layers, or give per-sample "
                "gradients with set_grad_sample. (An empty Poisson batch, where backward never "
                "ran, is a pure-noise step; clear gradients left from elsewhere with zero_grad())"
            )
        device = params[0].device if params else torch.device("cpu")
        return torch.zeros(0, device=device)

    @staticmethod
    def _check_plain_uses(params: list[torch.Tensor], flagged: list[bool],
                          samples: list[torch.Tensor | None]) -> None:
        """ValueError if a later backward sent a parameter a gradient outside psgfunc layers
        while it held per-sample gradients (they miss that use; see psgfunc.per_sample._rows)."""
        for i, (p, f, s) in enumerate(zip(params, flagged, samples)):
            if f or getattr(s, "_psg_plain", False):
                raise _rows.plain_use_error(f"DPOptimizer: trainable parameter #{i} (shape "
                                            f"{tuple(p.shape)}, in param_groups order)")

    def _unreached(self, params: list[torch.Tensor], present: list[bool]) -> list[int]:
        """Indices of the parameters without per-sample gradients, whose per-sample gradients
        are zero: psgfunc layers used them, and no backward reached them (``p.grad`` is None,
        or still this optimizer's last update), e.g. a BERT pooler whose output the loss does
        not use. ValueError for any other (a parameter that psgfunc layers never used, or one
        with a gradient that nothing recorded per example)."""
        missing = [i for i, ok in enumerate(present) if not ok]
        bad = []
        for i in missing:
            untouched = params[i].grad is None or _rows.marked_clean(params[i])
            if not (untouched and _rows.watched(params[i])):
                bad.append(i)
        if bad:
            raise self._missing_error(params, [i not in bad for i in range(len(params))])
        return missing

    def _missing_error(self, params: list[torch.Tensor], present: list[bool]) -> ValueError:
        missing = [f"#{i} shape {tuple(p.shape)}" for i, (p, ok) in enumerate(zip(params, present)) if not ok]
        return ValueError(
            "DPOptimizer: trainable parameters "
            + ", ".join(missing[:10])
            + (" ..." if len(missing) > 10 else "")
            + " (in param_groups order) have no grad_sample while others do (no per-sample gradient); DP-SGD "
            "must clip every example's whole gradient. Make sure every parameter gets per-sample "
            "gradients (psgfunc.nn layers or set_grad_sample), or set requires_grad=False on "
            "parameters that are not trained"
        )

    @torch.no_grad()
    @_autocast.off()  # norms and sums never in half precision, even inside an autocast block
    def _accumulate_pieces(self) -> torch.Tensor:
        """:meth:`accumulate` for ``fast_clipping``: norms and clipped sums from recorded pieces."""
        params = self._same_params(self._trainable())
        logs = [self._logs.get(id(p)) for p in params]
        if any(log is not None and not log.attached() for log in logs):
            raise self._taken_over()
        pieces = [log.records() if log is not None else [] for log in logs]
        dense = [getattr(p, "grad_sample", None) for p in params]
        present = [bool(r) or d is not None for r, d in zip(pieces, dense)]
        if not any(present):
            return self._empty(params)
        unreached = self._unreached(params, present) if not all(present) else []
        self._check_plain_uses(params, [log is not None and log.plain for log in logs], dense)
        sizes = {log.batch if r else d.shape[0] for log, r, d in zip(logs, pieces, dense) if r or d is not None}
        if len(sizes) != 1:
            raise ValueError(
                f"DPOptimizer: parameters saw different batch sizes {sorted(sizes)} in one "
                "micro-batch; run one forward and backward per micro-batch, then accumulate()"
            )
        (size,) = sizes
        for i in unreached:  # no backward reached it: its per-sample gradients are zero
            dense[i] = params[i].new_zeros(()).expand(size, *params[i].shape)
        scale = size if self.loss_reduction == "mean" else 1  # gradients of a mean loss are g_b / B
        with no_autograd():  # (never differentiated: inference tensors, read by the sums)
            leaves = leaf_pieces(pieces, dense, size, [p.shape for p in params])
            # certified: covers the rounding of the norms and of the sums (psgfunc.per_sample._kinds)
            norms = certified_norm(leaves, [p.dtype for p in params]) * scale
        dense_sums = None
        if not bool(torch.isfinite(norms).all()):
            # squares that overflow (finite float32 gradients above ~1e19, which the dense
            # route clips exactly, as clipped_grad_sum does) or a real NaN/Inf: the dense
            # route's clipped_sum tells them apart and names the bad examples
            samples = [leaf.materialize().reshape(size, *p.shape) for leaf, p in zip(leaves, params)]
            if scale != 1:  # (as the dense path does: rows of a mean loss are g_b / B)
                samples = [t * scale for t in samples]
            dense_sums, norms = clipped_sum(samples, self.transform.max_norm, "DPOptimizer", certified=True)
            del samples
        # the micro-batch is consumed from here: the logs and grad_sample let go of the pieces
        # (the leaves hold them alone), so each leaf's are freed as soon as its sum is taken
        # (a layer's inputs and output gradients then never all outlive the sums)
        tags = [getattr(d, "_psg_call", None) for d in dense]
        del pieces, dense
        for p, log, tag in zip(params, logs, tags):
            if log is not None:
                _rows.consume(log.group)
                log.clear()
            _rows.consume(tag)
            p.grad_sample = None
            p.grad = None
        if dense_sums is None:
            floor = rounding_floor([(p.dtype, p.numel()) for p in params])
            with no_autograd():
                factor = clip_factor(norms, self.transform.max_norm, floor) * scale
            sums = weighted_sums(leaves, [factor] * len(leaves), release=True)
        else:
            sums = dense_sums
            for leaf in leaves:
                leaf.release()
        self._add_to_sum([s.to(p.dtype) for s, p in zip(sums, params)])
        self.accumulated_examples += size
        return norms.to(leaves[0].sq_dtype).clone()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Finish the logical batch: clip what is left, add noise once, step the inner optimizer.

        Frozen parameters (``requires_grad=False``) in the groups lose any ``p.grad`` first,
        so that the inner optimizer never applies a gradient no DP step made.

        Args:
            closure: optional, re-evaluates the model and calls backward (run with gradients
                enabled before the DP step); its return value is returned.

        Returns:
            ``closure()``'s value, or None.

        Raises:
            ValueError: as :meth:`accumulate`.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.accumulate()
        if self._logical_batch_open:  # more physical batches of this logical batch follow
            return loss
        params = self._same_params(self._trainable())
        summed = self._summed
        if summed is None:  # empty logical batch: the update is pure noise
            # (in the running sum's dtype: ranks all-reduce it, whether or not theirs is empty)
            summed = [torch.zeros_like(p, dtype=_sum_dtype(p.dtype), memory_format=torch.contiguous_format)
                      for p in params]
        updates, self.dp_state = self.transform.update_from_sum(summed, self.dp_state)
        for p, u in zip(params, updates):
            p.grad = u.to(dtype=p.dtype)
        for p in self._all_params():
            if not p.requires_grad and p.grad is not None:
                # frozen: the inner optimizer would apply a gradient no DP step made (a
                # non-private backward's, left from before freezing)
                p.grad = None
        self._summed, self._summed_params = None, []
        self.accumulated_examples = 0
        self.optimizer.step()
        # step() leaves the update in p.grad: not a gradient backward left (see _empty)
        for p in self._all_params():
            _rows.mark_clean(p, replaced=True)
        if self.accountant is not None:
            self.accountant.step()
        return loss

    def _end_of_logical_batch(self, last: bool) -> None:
        """Told by a :class:`~psgfunc.dp.VirtualBatchLoader` before each physical batch:
        whether it is the last of its logical batch (``step()`` after the others only clips
        and accumulates)."""
        self._logical_batch_open = not last

    def _same_params(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """``params``, or a ValueError if the trainable parameters are not those the running
        clipped sum is for: a ``requires_grad`` changed after an :meth:`accumulate` of this
        logical batch, and the sums (one per trainable parameter, in order) would be added
        to, and applied to, the wrong parameters (review h16: freezing the first of two
        ``Linear(4, 4)`` layers between ``accumulate()`` and ``step()`` silently gave the
        second one the first one's update)."""
        if self._summed is not None and [id(p) for p in params] != self._summed_params:
            raise ValueError(
                "DPOptimizer: the trainable parameters (requires_grad) changed while a logical "
                "batch was being accumulated, so its clipped sums no longer line up with the "
                "parameters; freeze or unfreeze parameters only after step() (or before the "
                "logical batch's first accumulate())"
            )
        return params

    def _add_to_sum(self, summed: list[torch.Tensor]) -> None:
        """Add one micro-batch's clipped sums to the running sum, in place (the sums are this
        optimizer's own tensors: no new parameter-sized tensor per micro-batch). Sums of
        half-precision parameters run in float32 (:func:`_sum_dtype`; twice their memory),
        rounded to the parameter's dtype once, in ``step()``: in float16, each micro-batch's
        addition rounded the running sum again, with float16's precision."""
        if self._summed is None:
            self._summed = [s.to(_sum_dtype(s.dtype)) for s in summed]
            self._summed_params = [id(p) for p in self._trainable()]
        else:
            for acc, s in zip(self._summed, summed):
                acc.add_(s)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad`` and ``p.grad_sample`` of every parameter.

        The running clipped sum of :meth:`accumulate` is kept (only ``step()`` consumes it),
        so calling ``zero_grad`` between micro-batches loses nothing.
        """
        for p in self._all_params():
            p.grad_sample = None
            log = self._logs.get(id(p))
            if log is not None and log.attached():
                log.clear()
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.zero_()
                    # zeros no backward left since: as untouched as None (see _unreached)
                    _rows.mark_clean(p, replaced=True)
