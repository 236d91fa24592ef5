"""dist_gc's launcher bootstrap (the ``ddtrace-run`` / ``coverage`` pattern).

``dist-gc-run`` / ``python -m dist_gc.run`` put this directory first on ``PYTHONPATH``
(with ``DIST_GC_RUN=1``), so every Python process of the launch — launcher CLIs, agents,
ranks, re-launched ranks, spawned workers — runs this file at startup. It registers
post-import hooks (``dist_gc._autopatch.install``: standard library only, nothing
imported early) and then chains to the ``sitecustomize`` this process would have run
without us. It never raises: an unrelated Python process must not break.
"""

import os
import sys

if os.environ.get("DIST_GC_RUN") == "1":
    try:
        _root = os.environ.get("DIST_GC_ROOT")  # the dist_gc the wrapper ran, when not importable otherwise
        if _root and _root not in sys.path:
            sys.path.append(_root)  # appended: never shadows anything on the path
        from dist_gc import _autopatch

        _autopatch.install()
    except Exception as exc:  # pragma: no cover - defensive
        print(f"[dist_gc] bootstrap failed, GC is not switched on automatically in this process: {exc!r}",
              file=sys.stderr, flush=True)

# Chain to the next sitecustomize on the path, if any.
_here = os.path.dirname(os.path.abspath(__file__))
_ours = sys.modules.pop("sitecustomize", None)
_saved = list(sys.path)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
try:
    import sitecustomize  # noqa: F401
except ImportError:
    if _ours is not None:
        sys.modules["sitecustomize"] = _ours
finally:
    sys.path[:] = _saved
