"""FSDP1 communication hook that centralizes gradients BEFORE the reduce-scatter.

In FSDP1's post-backward, each unit hands its comm hook the rank's local, still
UNSHARDED flat gradient (padded to a multiple of the world size): every original
tensor is whole in it, at a known offset. GC is a linear projection per tensor, so
centralizing each rank's local gradient and then averaging (reduce-scatter /
all-reduce, exactly as FSDP's default hooks do) gives the centralized averaged
gradient: exact, with zero extra communication.

It runs before the reduction and therefore BEFORE gradient clipping
(``fsdp_model.clip_grad_norm_``) and before any loss-scale unscaling: it equals
``dist_gc.attach`` exactly when no clipping is active. With clipping, the clip sees the
already-centralized gradient (its norm is taken after GC), a different, documented
order. Use ``dist_gc.attach`` when clipping must come first. FSDP1 refuses comm hooks
under HYBRID_SHARD; use ``dist_gc.attach`` there.

Example::

    states = dist_gc.hooks.register_fsdp_gc_hook(fsdp_model, dist_gc.GCConfig(mode="channel"))
    # or composed with another FSDP hook (GC first, then e.g. bf16 compression):
    from torch.distributed.algorithms._comm_hooks import default_hooks
    dist_gc.hooks.register_fsdp_gc_hook(
        fsdp_model, config, hook=default_hooks.bf16_compress_hook,
        make_hook_state=lambda pg: default_hooks.LowPrecisionState(pg),
    )

Why a registration helper rather than a bare ``register_comm_hook(state, hook)``:
FSDP1 hands the SAME state object to every unit, and the hook receives only tensors,
so it cannot tell which unit's layout applies. ``register_fsdp_gc_hook`` registers
through ``FullyShardedDataParallel.register_comm_hook`` (which validates strategy and
uniqueness) and then gives each unit its own :class:`FSDPGCHookState`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..adapters.fsdp1 import describe_units
from ..core.config import GCConfig
from ..core.select import resolve_roles
from ..engine.engine import GCEngine, GCStats
from ..engine.layout import TensorLayout, Whole
from ..planner import plan

__all__ = ["FSDPGCHookState", "gc_fsdp_hook", "register_fsdp_gc_hook"]


@dataclass(slots=True)
class FSDPGCHookState:
    """One FSDP unit's GC hook state: the layout of its unsharded flat gradient (as an
    engine with no collectives) and the state of the reduction hook it then calls."""

    unit: str
    engine: GCEngine | None
    """``None`` for a unit without parameters (its hook is never called)."""
    hook: Callable[..., Any]
    hook_state: Any
    grad: list = field(default_factory=lambda: [None])
    stats: GCStats = field(default_factory=GCStats)
    """Statistics of the unit's last hook call (``bytes_communicated`` is always 0)."""


def gc_fsdp_hook(state: FSDPGCHookState, grad: torch.Tensor, output: torch.Tensor | None = None) -> None:
    """Centralize the local unsharded flat ``grad`` in place, then reduce it with
    ``state.hook`` (default: FSDP's ``reduce_scatter_hook`` for sharded strategies,
    ``allreduce_hook`` for NO_SHARD — the same averaging as FSDP's default path)."""
    if not isinstance(state, FSDPGCHookState):
        raise TypeError(
            "gc_fsdp_hook needs a per-unit FSDPGCHookState; register it with "
            "dist_gc.hooks.register_fsdp_gc_hook(fsdp_model, config) rather than fsdp_model.register_comm_hook"
        )
    if state.engine is not None:
        state.grad[0] = grad
        try:
            state.stats = state.engine.step()
        finally:
            state.grad[0] = None
    if output is None:
        state.hook(state.hook_state, grad)
    else:
        state.hook(state.hook_state, grad, output)


def _default_hook(state: Any, grad: torch.Tensor, output: torch.Tensor | None = None) -> None:
    from torch.distributed.algorithms._comm_hooks import default_hooks

    if output is None:
        default_hooks.allreduce_hook(state, grad)
    else:
        default_hooks.reduce_scatter_hook(state, grad, output)


def register_fsdp_gc_hook(
    fsdp_model: torch.nn.Module,
    config: GCConfig | dict | None = None,
    *,
    hook: Callable[..., Any] | None = None,
    make_hook_state: Callable[[Any], Any] | None = None,
) -> dict[str, FSDPGCHookState]:
    """Register :func:`gc_fsdp_hook` on the root FSDP1 module ``fsdp_model`` (call before
    the first forward, on every rank). ``hook(hook_state, grad[, output])`` does the
    reduction after GC (default: FSDP's own default reduction); ``make_hook_state(pg)``
    builds its state from the unit's process group (default ``DefaultState(pg)``).
    Returns ``{unit name: state}``."""
    from torch.distributed.algorithms._comm_hooks import default_hooks

    config = GCConfig.from_dict(config) if isinstance(config, dict) else (config or GCConfig())
    units = describe_units(fsdp_model)
    if not units:
        raise ValueError("register_fsdp_gc_hook: no FSDP1 (FullyShardedDataParallel) unit with parameters found in fsdp_model")
    # The local unsharded gradient holds every tensor of a unit whole, at its flat
    # offset: one source per unit, no reductions, no extra communication.
    layouts = [TensorLayout(t.name, t.shape, Whole(0, t.flat_offset), phase=k) for k, u in enumerate(units) for t in u.tensors]
    gc_plan = plan(layouts, config, resolve_roles(fsdp_model), phases=len(units))
    make_hook_state = make_hook_state or default_hooks.DefaultState
    hook = hook or _default_hook
    states: dict[str, FSDPGCHookState] = {}
    by_module: dict[int, FSDPGCHookState] = {}
    for u, plans in zip(units, gc_plan.phases):
        state = FSDPGCHookState(u.name, None, hook, make_hook_state(u.module.process_group))
        if plans:
            state.engine = GCEngine(plans, [lambda s=state: s.grad[0]], full_stats=config.full_stats)
        states[u.name] = state
        by_module[id(u.module)] = state
    fsdp_model.register_comm_hook(next(iter(states.values())), gc_fsdp_hook)
    # FSDP1 gave every unit the same state; give each its own layout instead.
    fsdp_cls = type(units[0].module)
    for m in fsdp_model.modules():
        if isinstance(m, fsdp_cls):
            if not hasattr(m, "_comm_hook_state"):
                raise RuntimeError(f"dist_gc: this torch {torch.__version__} FSDP1 has no _comm_hook_state; cannot install per-unit GC hook states")
            m._comm_hook_state = by_module.get(id(m), FSDPGCHookState(m.__class__.__name__, None, hook, make_hook_state(m.process_group)))
    return states
