"""Pure layers: ``init_*`` builds a params dict named as torch.nn's state_dict; the layer computes.

Every layer is a plain function ``layer(params, x, ...)`` that accepts one example or a batch
wherever the matching torch op does, so it can be used under ``torch.func.vmap`` and
``torch.func.grad`` and inside :func:`psgfunc.per_sample_grads`.
"""

from psgfunc.functional.linear import init_linear, linear

__all__ = [
    "linear",
    "init_linear",
]
