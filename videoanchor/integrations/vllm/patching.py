"""Wrapping vLLM's methods, once per process, whatever imports the plugin how often."""

from __future__ import annotations


def wrap_once(owner, name: str, make) -> None:
    """Replaces ``owner.name`` with ``make(original)``, unless it is one of ours already (a
    second ``install()`` in the same process, or a subclass that inherited the wrapper)."""
    orig = getattr(owner, name)
    if getattr(orig, "_videoanchor", False):
        return
    new = make(orig)
    new._videoanchor = True
    setattr(owner, name, new)
