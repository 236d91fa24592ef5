"""dist_gc: gradient centralization that is exact under DDP, FSDP and DeepSpeed ZeRO.

Gradient centralization (Yong et al., "Gradient Centralization: A New Optimization
Technique for Deep Neural Networks", ECCV 2020, arXiv 2004.01461) subtracts from each
weight gradient its mean over every dim except the output dim (``mode="channel"``) or
over the whole tensor (``mode="tensor"``), immediately before the optimizer update —
after gradient reduction, loss-scale unscaling and clipping.

    import dist_gc
    gc = dist_gc.attach(optimizer, model=model)      # GCConfig() defaults

Or with no code change: ``accelerate launch -m dist_gc.run train.py`` (also
``torchrun -m``, ``deepspeed --module``, or the ``dist-gc-run`` prefix), settings from
the DeepSpeed JSON's ``"gradient_centralization"`` block or ``--gc-config``.

The public API is ``__all__`` below plus the integration modules ``dist_gc.deepspeed``
(``initialize``), ``dist_gc.accelerate`` (``attach`` after ``accelerator.prepare``,
``log_stats``), ``dist_gc.integrations.transformers`` and
``dist_gc.integrations.lightning`` (callbacks), ``dist_gc.run`` (the launcher wrapper)
and ``dist_gc.configs`` (the shipped example configs), each imported on demand.
Everything else (``dist_gc.core``, ``dist_gc.engine``, ``dist_gc.adapters``,
``dist_gc.planner``) is internal and may change between releases.

``import dist_gc`` imports nothing but the standard library: the names below are
loaded on first use (PEP 562), so the launcher wrapper's bootstrap, which runs in
every Python process of a launch, does not pay for torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "attach",
    "GCConfig",
    "GCHandle",
    "GCStats",
    "centralize_",
    "clip_grad_norm_",
    "hooks",
]

# name -> submodule that defines it (loaded on first access)
_EXPORTS = {
    "attach": ".attach",
    "GCHandle": ".attach",
    "GCConfig": ".core.config",
    "GCStats": ".engine.engine",
    "centralize_": ".core.centralize",
    "clip_grad_norm_": ".clip",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from . import hooks
    from .attach import GCHandle, attach
    from .clip import clip_grad_norm_
    from .core.centralize import centralize_
    from .core.config import GCConfig
    from .engine.engine import GCStats


def __getattr__(name: str) -> Any:
    if name == "hooks":
        return importlib.import_module(".hooks", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dist_gc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``dist_gc.attach`` the function. The function shares its name with the
    submodule that defines it (``dist_gc/attach.py``); when that submodule is first
    imported (by ``dist_gc.deepspeed``, say), the import system sets the package
    attribute ``attach`` to the module, which would hide the function. With eager
    imports ``from .attach import attach`` rebound it; lazily, this guard does."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "attach" and isinstance(value, types.ModuleType):
            return  # the submodule stays reachable as sys.modules["dist_gc.attach"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
