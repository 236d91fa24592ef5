"""Engine adapters: each turns what an engine hands the optimizer into layouts.

An adapter module exposes ``bind(target, model, config) -> Binding | None`` and returns
``None`` when ``target`` is not its engine's. It imports its engine lazily (only when
the engine's module is already loaded), so ``import dist_gc`` needs only torch.
``dist_gc.attach`` asks the adapters in ``ADAPTERS`` order; the first binding wins.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..core.select import Target
from ..engine.layout import TensorPlan

__all__ = ["Binding", "ADAPTERS", "bind", "warn_if_untested"]

#: Adapter modules, most specific first; ``plain`` (any torch optimizer) is last.
#: ``accelerate`` comes first: its wrapper subclasses ``torch.optim.Optimizer`` without
#: running its ``__init__`` (hooks on it never fire), so it must be unwrapped before any
#: other adapter looks at it.
ADAPTERS = [
    "dist_gc.adapters.accelerate",
    "dist_gc.adapters.deepspeed",
    "dist_gc.adapters.fsdp1",
    "dist_gc.adapters.fsdp2",
    "dist_gc.adapters.plain",
]


@dataclass(slots=True)
class Binding:
    """What an adapter found: the optimizer whose step applies the update (GC hooks
    its step pre-hook) and the layouts of every GC target on this rank."""

    optimizer: torch.optim.Optimizer
    plans: list[TensorPlan]
    sources: list[Callable[[], "torch.Tensor | None"]]
    targets: dict[str, Target]
    engine: str
    """Human-readable name of the engine configuration (for logs and errors)."""
    extras: dict[str, Any] = field(default_factory=dict)
    on_remove: list[Callable[[], None]] = field(default_factory=list)
    verify: Callable[[], None] | None = None
    """Optional check run once after the hook is in place (e.g. layout vs values)."""
    phases: list[list[int]] | None = None
    """Optional: when the engine steps ``optimizer`` several times per training step,
    each time on a different part of the parameters (DeepSpeed ZeRO-1/2 steps one param
    group at a time, ZeRO-3 one sub-group at a time), the indices into ``plans`` of each
    part. ``None``: every ``step`` call covers all plans."""
    phase: Callable[[torch.optim.Optimizer], int] | None = None
    """With ``phases``: which phase the optimizer is stepping now (called in its step
    pre-hook). Every rank must step the phases in the same order (collectives match)."""


def warn_if_untested(package: str, version: str, tested: tuple[str, ...], safeguard: str) -> None:
    """Warn (once per call site) when ``package`` is not a ``major.minor`` version the
    adapter was tested with. Internals the adapter does not recognise raise separately;
    ``safeguard`` says what still protects an untested version."""
    if not any(version == v or version.startswith(v + ".") for v in tested):
        import warnings

        warnings.warn(
            f"dist_gc: {package} {version} is untested (tested: {', '.join(v + '.x' for v in tested)}); {safeguard}",
            stacklevel=4,
        )


def bind(target: Any, model: Any, config: Any) -> Binding:
    for path in ADAPTERS:
        binding = importlib.import_module(path).bind(target, model, config)
        if binding is not None:
            return binding
    raise TypeError(
        f"dist_gc.attach: cannot attach to a {type(target).__module__}.{type(target).__qualname__}; "
        "expected a torch.optim.Optimizer, an FSDP optimizer with model=, a DeepSpeedEngine, "
        "or accelerate's AcceleratedOptimizer"
    )
