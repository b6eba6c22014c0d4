"""The registry that lets a functional layer be served by a per-sample rule.

This floor sits under ``functional`` so that layers can mark themselves without importing
``per_sample``. A layer decorated with :func:`dispatchable` behaves exactly like the plain
function, except while :func:`expanded_mode` is active (``per_sample_grads(method="expanded")``
turns it on): then the rule registered for that layer runs instead. Rules are keyed by the
public function they serve (ARCHITECTURE.md rule 5), so a model built from these functions gets
its rule for free, whatever module or closure calls them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator

from torch.compiler import is_compiling as _is_compiling

__all__ = [
    "dispatchable", "register_rule", "expanded_mode", "expanded_mode_kind", "rule_for", "enter_mode", "exit_mode",
    "current_tap", "set_tap",
]

_RULES: dict[Callable[..., Any], Callable[..., Any]] = {}
# None: plain layers. "vmap": the per-example fn runs under vmap with expanded params
# (per_sample_grads(method="expanded")). "batch": a module shell calls the layer on a batch
# with expanded params (psgfunc.nn).
_EXPANDED: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "psgfunc_expanded_mode", default=None
)


class _TapSlot:
    """Where the active output tap lives (see ``psgfunc.per_sample._tap``).

    A plain attribute rather than a ContextVar: torch.compile traces attribute reads and
    writes inside ``torch.func`` transforms, but not ``ContextVar.set``."""

    current: Any = None


_TAP = _TapSlot()


def current_tap() -> Any:
    """The active tap (rules tap their layer's output instead of running a rule), or None."""
    return _TAP.current


def set_tap(tap: Any) -> Any:
    """Make ``tap`` the active tap (None: none); returns the one it replaces."""
    prev = _TAP.current
    _TAP.current = tap
    return prev


def dispatchable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a functional layer so that a per-sample rule can stand in for it.

    The returned function is the key under which rules are registered.
    """

    @functools.wraps(fn)
    def layer(*args: Any, **kwargs: Any) -> Any:
        # the compiler cannot trace ContextVar.get (a graph break per layer call, which broke
        # compiled_clipped_grad_sum(method="materialize")); the modes are entered eagerly
        if _TAP.current is not None or (not _is_compiling() and _EXPANDED.get() is not None):
            rule = _RULES.get(layer)
            if rule is not None:
                return rule(*args, **kwargs)
        return fn(*args, **kwargs)

    layer.plain = fn  # type: ignore[attr-defined]
    return layer


def register_rule(target: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``rule`` (same signature as ``target``) to run for ``target`` in expanded mode."""
    if not hasattr(target, "plain"):
        raise TypeError(f"{target!r} is not decorated with psgfunc._rules.dispatchable")

    def decorate(rule: Callable[..., Any]) -> Callable[..., Any]:
        _RULES[target] = rule
        return rule

    return decorate


def rule_for(target: Callable[..., Any]) -> Callable[..., Any] | None:
    """The rule registered for ``target``, or None."""
    return _RULES.get(target)


def expanded_mode_kind() -> str | None:
    """The active expanded mode: None, "vmap" or "batch"."""
    return _EXPANDED.get()


@contextlib.contextmanager
def expanded_mode(kind: str | None = "vmap") -> Iterator[None]:
    """Within this block, dispatchable layers run their registered rules (kind None: plain)."""
    if kind not in (None, "vmap", "batch"):
        raise ValueError(f"expanded_mode kind must be None, 'vmap' or 'batch', got {kind!r}")
    token = _EXPANDED.set(kind)
    try:
        yield
    finally:
        _EXPANDED.reset(token)


def enter_mode(kind: str | None) -> contextvars.Token:
    """:func:`expanded_mode` without the context manager (for per-layer-call hot paths):
    returns the token for :func:`exit_mode`. ``kind`` is not checked."""
    return _EXPANDED.set(kind)


def exit_mode(token: contextvars.Token) -> None:
    """Restore the mode :func:`enter_mode` replaced."""
    _EXPANDED.reset(token)
