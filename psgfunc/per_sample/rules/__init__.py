"""Per-sample rules for the expanded method, one module per layer family.

Importing this package registers every rule with :mod:`psgfunc._rules`.
"""

from psgfunc.per_sample.rules import linear as _linear  # noqa: F401
