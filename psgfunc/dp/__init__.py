"""Differentially private SGD on per-sample gradients.

Per-sample gradient pytrees (leaves ``[B, *param_shape]``, as returned by
:func:`psgfunc.per_sample_grads`) are clipped per example (:func:`clip`), summed and
noised (:func:`privatize`); :func:`dp_sgd_transform` (functional, explicit state) and
:class:`DPOptimizer` (wraps a ``torch.optim`` optimizer, reads ``p.grad_sample``) make one
DP-SGD step with identical numbers. Batches come from Poisson sampling
(:func:`poisson_batches`, :class:`PoissonDataLoader`), which is what :func:`epsilon` and
:func:`noise_multiplier_for` account for (through Google's ``dp_accounting``, imported only
when called). ``distributed=True`` on :class:`DPOptimizer`, :func:`dp_sgd_transform` and the
Poisson samplers runs one DP-SGD over several ``torch.distributed`` processes with the
privacy analysis of a single process on the union of their batches
(:func:`all_reduce_sum` sums a clipped sum over the ranks);
:class:`PrivacyAccountant` counts steps as they happen; :func:`make_private` sets it all up in
one call.
"""

from psgfunc.dp._accounting import PrivacyAccountant, epsilon, noise_multiplier_for
from psgfunc.dp._clip import clip, per_sample_norms, privatize
from psgfunc.dp._clipped import clipped_grad_sum
from psgfunc.dp._compiled import compiled_clipped_grad_sum
from psgfunc.dp._distributed import all_reduce_sum
from psgfunc.dp._optimizer import DPOptimizer
from psgfunc.dp._private import VirtualBatchLoader, make_private, physical_batches
from psgfunc.dp._sampling import PoissonBatchSampler, PoissonDataLoader, poisson_batches
from psgfunc.dp._transform import DPSGDState, DPSGDTransform, dp_sgd_transform

__all__ = [
    "compiled_clipped_grad_sum",
    "per_sample_norms",
    "clip",
    "privatize",
    "clipped_grad_sum",
    "epsilon",
    "noise_multiplier_for",
    "PrivacyAccountant",
    "dp_sgd_transform",
    "DPSGDTransform",
    "DPSGDState",
    "DPOptimizer",
    "poisson_batches",
    "PoissonBatchSampler",
    "PoissonDataLoader",
    "make_private",
    "VirtualBatchLoader",
    "physical_batches",
    "all_reduce_sum",
]
