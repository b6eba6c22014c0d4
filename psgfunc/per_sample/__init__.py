"""Per-sample gradients: ``per_sample_grads`` and the expanded-weight rules it dispatches to."""

from psgfunc.per_sample import rules as _rules_registered  # noqa: F401  (registers the rules)
from psgfunc.per_sample._api import METHODS, per_sample_grads
from psgfunc.per_sample._expanded import Rule, call_rule, module_call

__all__ = ["per_sample_grads", "METHODS", "Rule", "call_rule", "module_call"]
