"""Post-import hooks: ``when_imported(name, fn)`` calls ``fn(module)`` right after the
module ``name`` has finished executing — or at once, if it is already imported.

This is what ``wrapt.register_post_import_hook`` does. It is our own (one finder, ~60
lines, standard library only) for a measured reason: the launcher wrapper's bootstrap
runs in *every* Python process of a launch (the ``accelerate``/``torchrun``/
``deepspeed`` CLIs, their agents, every rank, Lightning's re-launched ranks, dataloader
workers started with ``spawn``), and ``import wrapt`` (2.x) imports ``asyncio`` and
``importlib.metadata``: 70-85 ms per process on an idle 2-core machine, 0.3-0.5 s under
load, against ~3 ms for this module (``python -X importtime``). Nothing here imports a
hooked module early; a hook never runs before its module's body has completed.

How: a ``sys.meta_path`` finder that, only for names with a pending hook, asks the other
finders for the real spec (re-entrancy guard) and wraps its loader's ``exec_module``;
the module keeps the real loader (``module.__loader__``, ``__spec__.loader``), so
``importlib.reload`` and ``importlib.resources`` behave as without us. Loaders without
``exec_module`` (legacy ``load_module`` only) are left alone: their hook never fires.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from typing import Any, Callable

__all__ = ["when_imported"]

_hooks: dict[str, list[Callable[[Any], None]]] = {}
_lock = threading.RLock()
_busy: set[str] = set()


def _run(name: str, module: Any, fns: list[Callable[[Any], None]]) -> None:
    for fn in fns:
        try:
            fn(module)
        except Exception as exc:  # never break the user's import; never hide the failure
            print(f"[dist_gc] could not patch {name} ({getattr(fn, '__name__', fn)}): {exc!r}; "
                  "GC may not be attached automatically for it", file=sys.stderr, flush=True)


class _HookedLoader:
    """Delegates to the real loader; runs the hooks after ``exec_module``."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader, self._name = loader, name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._loader, attr)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        with _lock:
            fns = _hooks.pop(self._name, [])
        _run(self._name, module, fns)


class _Finder:
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in _hooks or fullname in _busy:
            return None
        _busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)  # the other finders (the parent is imported by now)
        finally:
            _busy.discard(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _HookedLoader(spec.loader, fullname)
        return spec


_finder = _Finder()


def when_imported(name: str, fn: Callable[[Any], None]) -> None:
    """Call ``fn(module)`` once ``name`` is imported (now, if it already is)."""
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            _hooks.setdefault(name, []).append(fn)
            return
    _run(name, module, [fn])
