"""Engine adapters: each says where the gradients an engine hands its optimizer live.

An adapter module exposes ``describe(target, model) -> Description | None`` and returns
``None`` when ``target`` is not its engine's. It reads the engine's partition metadata,
refuses what it cannot describe exactly (``ValueError`` naming the parameter or option),
and offers a value check; it never selects targets or builds plans (that is
:func:`dist_gc.planner.plan`, once, for every engine). It imports its engine lazily
(only when the engine's module is already loaded), so ``import dist_gc`` needs only
torch. :func:`describe` asks the adapters in ``ADAPTERS`` order; the first answer wins.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..core.select import Role
from ..engine.layout import TensorLayout

__all__ = ["Description", "ADAPTERS", "describe", "Source"]

Source = Callable[[], "torch.Tensor | None"]

#: Adapter modules, most specific first; ``plain`` (any torch optimizer) is last.
#: ``accelerated`` comes first: accelerate's wrapper subclasses ``torch.optim.Optimizer``
#: without running its ``__init__`` (hooks on it never fire), so it must be unwrapped
#: before any other adapter looks at it.
ADAPTERS = [
    "dist_gc.adapters.accelerated",
    "dist_gc.adapters.zero",
    "dist_gc.adapters.fsdp1",
    "dist_gc.adapters.fsdp2",
    "dist_gc.adapters.plain",
]


@dataclass(kw_only=True, slots=True)
class Description:
    """What an adapter found: the optimizer whose step applies the update (GC runs in
    its step pre-hook) and where every parameter it updates lives on this rank."""

    optimizer: torch.optim.Optimizer
    layouts: list[TensorLayout]
    sources: list[Source]
    """``sources[i]()``: the current local gradient buffer that layouts with
    ``where.source == i`` live in (``None`` when it has none this step)."""
    label: str
    """Human-readable engine configuration, e.g. ``"DeepSpeed ZeRO-2 (bf16, ...)"``."""
    roles: dict[str, Role] = field(default_factory=dict)
    """What each parameter is to its module (:func:`~dist_gc.core.select.resolve_roles`):
    decides its output channel. Empty without a model (output dim 0 assumed)."""
    phases: int = 1
    """How many ``step`` calls of ``optimizer`` make one training step: DeepSpeed ZeRO-1/2
    steps one param group per call, ZeRO-3 one sub-group (``TensorLayout.phase``)."""
    phase_of: Callable[[torch.optim.Optimizer], int] | None = None
    """With ``phases > 1``: which phase the optimizer is stepping now (called in its step
    pre-hook). Every rank must step the phases in the same order (collectives match)."""
    check: Callable[[], None] | None = None
    """Optional value check run once at attach, on every rank, after the collectives
    were verified (e.g. the layout against the fp32 master values)."""
    on_remove: list[Callable[[], None]] = field(default_factory=list)
    step_count: Callable[[], int] | None = None
    """Optimizer steps the engine has completed (restored from its checkpoints), when it
    counts them itself (DeepSpeed's ``global_steps``); else GC counts, and saves the
    count in the optimizer's state dict."""
    peer_groups: tuple = ()
    """Process groups whose ranks hold the same parameters and so must run the same GC
    setup, compared in full at attach (DDP's group, FSDP's replicate groups, a pipeline
    stage's data-parallel group, MoE's expert-data-parallel groups). Groups the plans
    reduce or sum statistics over are compared too, on what concerns them (their ranks
    may hold different parameters: MoE experts, pipeline stages); see
    :class:`~dist_gc.engine.agreement.Agreements`."""
    replannable: bool = False
    """Whether the layout can be re-derived on this rank alone when the optimizer's
    parameters change (whole tensors: single process, DDP); sharded layouts cannot."""


def describe(target: Any, model: Any) -> Description:
    """The first adapter's description of ``target`` (see ``ADAPTERS``)."""
    for path in ADAPTERS:
        found = importlib.import_module(path).describe(target, model)
        if found is not None:
            return found
    raise TypeError(
        f"dist_gc.attach: cannot attach to a {type(target).__module__}.{type(target).__qualname__}; "
        "expected a torch.optim.Optimizer, an FSDP optimizer with model=, a DeepSpeedEngine, "
        "or accelerate's AcceleratedOptimizer"
    )
