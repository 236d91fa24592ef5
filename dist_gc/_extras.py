"""Optional dependencies: a missing one fails with one line naming the extra to install."""

from __future__ import annotations

import importlib.util

__all__ = ["MissingExtra", "require"]


class MissingExtra(ImportError):
    """An optional dependency of the feature in use is not installed."""


def require(module: str, extra: str, feature: str, package: str | None = None) -> None:
    """Raise :class:`MissingExtra` — ``"<feature> needs <package>, which is not
    installed: pip install 'dist_gc[<extra>]'"`` — unless ``module`` can be imported."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingExtra(f"{feature} needs {package or module}, which is not installed: pip install 'dist_gc[{extra}]'")
