"""accelerate's wrappers: ``AcceleratedOptimizer`` (and ``DeepSpeedOptimizerWrapper``).

accelerate wraps the optimizer the user built in an ``AcceleratedOptimizer`` that
forwards ``step`` to it — only on gradient-sync steps under gradient accumulation, and
through ``GradScaler.step`` (unscale, skip on inf) under fp16. The wrapper never runs
``Optimizer.__init__``, so step hooks registered on it would never fire: GC must hook
the inner optimizer. This adapter unwraps and hands the inner optimizer to the adapter
of whatever accelerate built (DDP/MULTI_CPU -> plain, FSDP1, FSDP2, DeepSpeed).

Under DeepSpeed, ``accelerator.backward`` already calls ``engine.step()`` and the
wrapper's ``step`` is a no-op; GC lives on the optimizer DeepSpeed steps, which the
DeepSpeed adapter finds from the engine — pass ``model=`` the model
``accelerator.prepare`` returned (the ``DeepSpeedEngine``), or use
:func:`dist_gc.accelerate.attach`, which finds it on the accelerator.
"""

from __future__ import annotations

import sys
from typing import Any

from . import Description
from ._common import warn_if_untested

__all__ = ["describe", "TESTED_VERSIONS"]

#: accelerate ``major.minor`` versions this adapter was tested against.
TESTED_VERSIONS = ("1.15",)


def describe(target: Any, model: Any) -> Description | None:
    if "accelerate" not in sys.modules or type(target).__module__.split(".")[0] != "accelerate":
        return None
    from accelerate.optimizer import AcceleratedOptimizer

    from . import describe as describe_any

    if not isinstance(target, AcceleratedOptimizer):
        raise ValueError(
            f"dist_gc.attach: got accelerate's {type(target).__name__}; expected the AcceleratedOptimizer that "
            "accelerator.prepare returned"
        )
    _check_version()
    inner = getattr(target, "optimizer", None)
    if inner is None:
        raise ValueError(f"dist_gc.attach: accelerate's {type(target).__name__} holds no .optimizer (unknown accelerate internals)")
    if type(target).__name__ == "DeepSpeedOptimizerWrapper":
        engine = _deepspeed_engine(model)
        if engine.optimizer is not inner:
            raise ValueError(
                "dist_gc.attach: model= is a DeepSpeedEngine whose optimizer is not the one this accelerate wrapper "
                "holds; pass the model and optimizer returned by the same accelerator.prepare call"
            )
        found = describe_any(engine, None)
    else:
        found = describe_any(inner, model)
    found.label = f"accelerate/{found.label}"
    return found


def _check_version() -> None:
    import accelerate

    warn_if_untested("accelerate", accelerate.__version__, TESTED_VERSIONS, "its wrappers are unwrapped through .optimizer, which is checked")


def _deepspeed_engine(model: Any) -> Any:
    from deepspeed.runtime.engine import DeepSpeedEngine

    if isinstance(model, DeepSpeedEngine):
        return model
    raise ValueError(
        "dist_gc.attach: this is accelerate's DeepSpeed optimizer wrapper; pass model=<the model accelerator.prepare "
        "returned (a DeepSpeedEngine)>, or call dist_gc.accelerate.attach(accelerator, optimizer, model)"
    )
