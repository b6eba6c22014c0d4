"""psgfunc: per-sample gradients in PyTorch the way JAX users write them.

Public API (ARCHITECTURE.md, rule 1): ``per_sample_grads``, ``scan`` and the subpackages ``functional``
(pure layers), ``nn`` (module shells), ``dp`` (DP-SGD).
"""

from psgfunc import dp, functional, nn
from psgfunc.per_sample import per_sample_grads
from psgfunc.scan import ScanStructureError, scan

__all__ = ["per_sample_grads", "scan", "ScanStructureError", "functional", "nn", "dp"]
__version__ = "0.1.0"
