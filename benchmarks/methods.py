"""The methods the benchmark compares: one step builder for every way of getting gradients.

A *configuration* is a dict (the format of :func:`benchmarks.layers.layer_configs`, plus two
optional keys) describing one layer or model:

* ``desc``: a one-line description (shapes);
* ``nn()``: the plain ``torch.nn`` module, ``[B, ...] -> [B, ...]`` (a tensor);
* ``shell(b)``: the same architecture built from ``psgfunc.nn`` shells for batches of up to
  ``b`` (optional: default ``psgfunc.nn.expand_weights(nn(), b)``);
* ``fn(params, x)``: the same forward for ONE example with ``psgfunc.functional``, on
  ``params = dict(nn().named_parameters())`` (detached);
* ``x(b)``: an input batch;
* ``opacus_nn()``: the module Opacus wraps, when it differs from ``nn()`` (Opacus needs its
  own ``opacus.layers.DPLSTM`` in place of ``nn.LSTM``; optional);
* ``notes``: method -> what the benchmark knows about that method's result on this
  configuration (the ``note`` column; optional); the compiled methods add the warnings
  ``compiled_clipped_grad_sum`` gave while compiling (e.g. leaves materialised in the graph);
* ``batches``: the batch sizes a run uses unless ``--batch-sizes`` is given (optional).

Every method runs the same step: the forward, the loss ``sum(out * target)`` with a fixed
random ``target`` shaped like the output (one scalar per example, summed over the batch),
and the backward, leaving what the method promises (see :data:`METHODS`). The weights of the
shell are loaded from the ``nn`` module; Opacus's modules keep their own random weights
(timings do not depend on the values).

Opacus is imported in the measuring child only (see ``benchmarks.layers._grad_sample_module``).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Callable

import torch
from torch import nn

import psgfunc.nn as pnn
from psgfunc import per_sample_grads
from psgfunc.dp import DPOptimizer, clipped_grad_sum, compiled_clipped_grad_sum

MAX_NORM = 1.0  # clipping bound of the clipping methods (any value costs the same)

METHODS: dict[str, str] = {
    "nn": "torch.nn forward + backward: the ordinary gradient (non-private reference)",
    "vmap": "psgfunc.per_sample_grads(method='vmap'): per-sample gradients",
    "expanded": "psgfunc.per_sample_grads(method='expanded'): per-sample gradients",
    "auto": "psgfunc.per_sample_grads(method='auto'): per-sample gradients",
    "shell": "psgfunc.nn shells, forward + loss.backward(): p.grad_sample and p.grad",
    "dpopt": "shells + psgfunc.dp.DPOptimizer.accumulate(): per-sample gradients, clipped sum",
    "dpopt-fast": "shells + DPOptimizer(fast_clipping=True).accumulate(): clipped sum, no per-sample gradients",
    "clip-fast": "psgfunc.dp.clipped_grad_sum(method='fast'): clipped sum, no per-sample gradients",
    "clip-fast-compiled": "psgfunc.dp.compiled_clipped_grad_sum(method='fast') (torch.compile of the fast-clipping step: tapped layer outputs, norms, clipped sums; compiled before timing): clipped sum",
    "clip-compiled": "psgfunc.dp.compiled_clipped_grad_sum(method='materialize') (torch.compile of vmap(grad) + clip + sum; compiled before timing): clipped sum",
    "torch-ew": "torch.nn.utils._per_sample_grad.call_for_per_sample_grads (expanded weights): p.grad_sample",
    "opacus-hooks": "opacus GradSampleModule, grad_sample_mode='hooks': p.grad_sample",
    "opacus-functorch": "opacus GradSampleModule, grad_sample_mode='functorch': p.grad_sample",
    "opacus-ew": "opacus GradSampleModuleExpandedWeights, grad_sample_mode='ew': p.grad_sample",
    "opacus-ghost": "opacus GradSampleModuleFastGradientClipping (ghost clipping, two backward passes): clipped sum in p.grad",
}
"""Method name -> what one step computes. ``nn`` is the reference of every ratio."""

COMPILED = ("clip-fast-compiled", "clip-compiled")
"""The methods that compile (seconds to minutes per batch size, reported as ``compile_s``)."""

Step = Callable[[], Any]


def inductor_in_process() -> None:
    """Make Inductor compile in this process, without its pool of compile workers.

    The benchmark forks a process per cell; a pool (or its threads and locks) started before
    a fork is copied into the child half-alive, and the child's compile then waits on it
    forever (a forked cell once hung for over ten minutes). With one compile thread Inductor
    never starts the pool, in this process or in its children
    (``TORCHINDUCTOR_COMPILE_THREADS=1`` for processes that import torch afresh)."""
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out * target).sum()


def _per_example_losses(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out * target).flatten(1).sum(1)  # [B]


def _clear(params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = None
        if getattr(p, "grad_sample", None) is not None:
            p.grad_sample = None


def _take(params: list[torch.Tensor], attr: str) -> list[Any]:
    """The step's result (``p.grad`` or ``p.grad_sample`` of each parameter), handed over as
    the functional methods hand theirs: nothing left on the parameters, so that no method
    starts its next step (or the memory measurement its baseline) holding its last result."""
    out = [getattr(p, attr, None) for p in params]
    _clear(params)
    return out


def _shell(cfg: dict[str, Any], module: nn.Module, batch: int) -> nn.Module:
    """The psgfunc.nn version of ``module`` holding ``module``'s weights (copied)."""
    shell = cfg["shell"](batch) if "shell" in cfg else pnn.expand_weights(cfg["nn"](), batch)
    shell.load_state_dict(module.state_dict())
    return shell


def _opacus(mode: str, module: nn.Module) -> nn.Module:
    from opacus.grad_sample.utils import prepare_module

    kwargs: dict[str, Any] = dict(batch_first=True, loss_reduction="sum")
    if mode == "ghost":
        kwargs.update(max_grad_norm=MAX_NORM, use_ghost_clipping=True)
    return prepare_module(module, mode, **kwargs)


def make_step(cfg: dict[str, Any], method: str, batch: int) -> Step:
    """Build everything for one (configuration, method, batch size); return the step to time.

    Raises:
        ValueError: for an unknown ``method``. Any other exception means the method does not
            support this configuration (the benchmark records its message).
    """
    if method not in METHODS:
        raise ValueError(f"make_step: unknown method {method!r}; use one of {list(METHODS)}")
    warnings.simplefilter("ignore")  # Opacus and torch warn on every wrap; keep the log short
    torch.manual_seed(0)
    module = cfg["nn"]()
    x = cfg["x"](batch)
    with torch.no_grad():
        target = torch.randn_like(module(x))
    params = {k: v.detach() for k, v in module.named_parameters()}
    forward = cfg["fn"]
    weights = list(module.parameters())  # the tensors the step differentiates
    notes = [cfg["notes"][method]] if method in cfg.get("notes", {}) else []

    def fn(p: dict[str, torch.Tensor], xi: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
        return _loss(forward(p, xi), ti)

    if method == "nn":

        def step() -> Any:
            _clear(weights)
            _loss(module(x), target).backward()
            return _take(weights, "grad")

    elif method in ("vmap", "expanded", "auto"):

        def step() -> Any:
            return per_sample_grads(fn, params, x, target, method=method)

    elif method == "clip-fast":

        def step() -> Any:
            return clipped_grad_sum(fn, params, x, target, max_norm=MAX_NORM, method="fast")

    elif method in COMPILED:
        inductor_in_process()
        how = "fast" if method == "clip-fast-compiled" else "materialize"
        compiled = compiled_clipped_grad_sum(fn, MAX_NORM, method=how, dynamic=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled(params, x, target)  # compile here, for this batch size: not part of a step
        notes += [str(w.message) for w in caught if "compiled_clipped_grad_sum" in str(w.message)]
        compile_s = sum(compiled.compile_seconds.values())
        # FlopCounterMode cannot look inside an Inductor graph (and entering it would make the
        # compiler trace again): FLOPs are counted on the same program run eagerly
        # (backend="eager": the planned step, its norms and sums, without Inductor's kernels).
        twin = compiled_clipped_grad_sum(fn, MAX_NORM, method=how, backend="eager")

        def flop_step() -> Any:
            return twin(params, x, target)

        def step() -> Any:
            return compiled(params, x, target)

    elif method in ("shell", "dpopt", "dpopt-fast"):
        shell = _shell(cfg, module, batch)
        weights = list(shell.parameters())
        if method == "shell":

            def step() -> Any:
                _clear(weights)
                _loss(shell(x), target).backward()
                return _take(weights, "grad_sample")

        else:
            opt = DPOptimizer(
                torch.optim.SGD(weights, lr=0.0),
                max_norm=MAX_NORM,
                noise_multiplier=0.0,
                expected_batch_size=batch,
                fast_clipping=method == "dpopt-fast",
            )

            def step() -> Any:
                opt.zero_grad()
                _loss(shell(x), target).backward()
                return opt.accumulate()

    elif method == "torch-ew":
        from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

        wrapped = call_for_per_sample_grads(module, batch_size=batch, loss_reduction="sum")

        def step() -> Any:
            _clear(weights)
            _loss(wrapped(x), target).backward()
            return _take(weights, "grad_sample")

    else:  # opacus-*
        mode = method.split("-", 1)[1]
        base = cfg["opacus_nn"]() if "opacus_nn" in cfg else module
        weights = [p for p in base.parameters() if p.requires_grad]
        gsm = _opacus(mode, base)
        if mode != "ghost":

            def step() -> Any:
                _clear(weights)
                _loss(gsm(x), target).backward()
                return _take(weights, "grad_sample")

        else:

            def step() -> Any:
                _clear(weights)
                losses = _per_example_losses(gsm(x), target)
                losses.sum().backward(retain_graph=True)  # pass 1: per-example norms
                coef = gsm.get_clipping_coef()
                _clear(weights)
                gsm.disable_hooks()
                (coef * losses).sum().backward()  # pass 2: the clipped sum
                gsm.enable_hooks()
                return _take(weights, "grad")

    checked = _checked(step, method, batch, [p.shape for p in weights])
    checked.note = "; ".join(dict.fromkeys(notes))  # type: ignore[attr-defined]
    if method in COMPILED:
        checked.compile_s = compile_s  # type: ignore[attr-defined]
        checked.flop_step = flop_step  # type: ignore[attr-defined]
    return checked


def _conv_backward_flops(grad_out_shape: Any, x_shape: Any, w_shape: Any, bias: Any, stride: Any,
                         padding: Any, dilation: Any, transposed: bool, output_padding: Any,
                         groups: int, output_mask: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``FlopCounterMode``'s formula for ``aten.convolution_backward`` with the weight-gradient
    term divided by ``groups``: torch's counts that term as if every output channel saw
    every input channel, so a grouped convolution's (e.g. the batch-as-groups per-example
    weight gradient of psgfunc's conv rule) was counted ``groups`` times its work."""
    from torch.utils.flop_counter import conv_backward_flop

    raw = conv_backward_flop.__wrapped__  # the formula on shapes (the registry's is wrapped)
    args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    total = 0
    if output_mask[0]:
        total += raw(*args, [True, False, False], out_shape)
    if output_mask[1]:
        total += raw(*args, [False, True, False], out_shape) // groups
    return total


def count_flops(step: Step) -> float:
    """FLOPs of one call of ``step`` (``torch.utils.flop_counter.FlopCounterMode``: matrix
    products, convolutions and attention; elementwise ops count zero; the weight gradient
    of a grouped convolution counted once, see :func:`_conv_backward_flops`); NaN if it
    fails.

    A step that carries a ``flop_step`` (the compiled methods) is counted on that."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})
    try:
        with counter:
            getattr(step, "flop_step", step)()
    except Exception:  # the timed step reports errors; a count that fails is just missing
        return math.nan
    return float(counter.get_total_flops())


def _checked(step: Step, method: str, batch: int, shapes: list[torch.Size]) -> Step:
    """``step``, whose first call checks that the method delivered what it promises (every
    parameter's per-sample gradient ``[B, *shape]``, norms ``[B]``, or gradients ``[*shape]``),
    so that a method silently skipping a layer fails instead of looking fast."""
    first = True

    def run() -> Any:
        nonlocal first
        out = step()
        if first:
            first = False
            if method in ("dpopt", "dpopt-fast"):
                got, want = [tuple(out.shape)], [(batch,)]
            elif method in ("clip-fast", "clip-compiled", "clip-fast-compiled"):
                got = [tuple(t.shape) for t in out[0].values()] + [tuple(out[1].shape)]
                want = [tuple(s) for s in shapes] + [(batch,)]
            else:
                leaves = list(out.values()) if isinstance(out, dict) else list(out)
                got = [None if t is None else tuple(t.shape) for t in leaves]
                per_sample = method not in ("nn", "opacus-ghost")
                want = [((batch,) if per_sample else ()) + tuple(s) for s in shapes]
            if got != want:
                raise RuntimeError(f"{method} returned shapes {got}, expected {want}")
        return out

    return run
