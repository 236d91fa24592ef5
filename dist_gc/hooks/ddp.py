"""DDP communication hooks that centralize gradients BEFORE the all-reduce.

GC is a linear projection ``P`` applied per tensor, so ``P(mean_r g_r) = mean_r P(g_r)``:
centralizing each rank's local bucket gradients and then averaging gives exactly the
centralized averaged gradient, with zero extra communication. Because it runs before
the reduction it also runs before gradient clipping: it equals the optimizer-hook
strategy (``dist_gc.attach``) exactly when no clipping is active. With clipping, clip
then sees the centralized gradient (the norm of the centralized gradient is clipped),
which is a different — documented — order.

Example::

    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
    state = dist_gc.hooks.GCHookState.from_model(ddp_model, config)
    ddp_model.register_comm_hook(state, dist_gc.hooks.gc_allreduce_hook)
    # or, composed with another hook (GC first, then compression + all-reduce):
    ddp_model.register_comm_hook(state, dist_gc.hooks.gc_wrapper(bf16_compress_hook))
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at runtime
# (`bucket: dist.GradBucket`).
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from ..core.centralize import centralize_
from ..core.config import GCConfig
from ..core.select import Target, clean_name, detect_output_dims, resolve_targets

__all__ = ["GCHookState", "gc_allreduce_hook", "gc_wrapper"]

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future]


@dataclass(slots=True)
class GCHookState:
    """State of the GC comm hooks: per-parameter GC decisions, the process group for
    :func:`gc_allreduce_hook`, and the state handed to a wrapped hook."""

    config: GCConfig
    targets: dict[int, Target]
    """``{id(param): Target}`` for every parameter of the DDP model."""
    process_group: Any = None
    inner_state: Any = None
    """Passed to the hook that :func:`gc_wrapper` wraps (e.g. a process group)."""
    skipped: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_model(cls, ddp_model: torch.nn.Module, config: "GCConfig | dict | None" = None, *, process_group: Any = None, inner_state: Any = None) -> "GCHookState":
        config = GCConfig.from_dict(config) if isinstance(config, dict) else (config or GCConfig())
        named = [(clean_name(n), p) for n, p in ddp_model.named_parameters()]
        targets = resolve_targets([(n, tuple(p.shape)) for n, p in named], config, detect_output_dims(ddp_model))
        if not config.enabled:
            targets = {n: Target(t.name, t.shape, None, None, "disabled") for n, t in targets.items()}
        by_id = {id(p): targets[n] for n, p in named}
        skipped = {n: t.reason for n, t in targets.items() if t.geometry is None}
        return cls(config, by_id, process_group, inner_state if inner_state is not None else process_group, skipped)


def _centralize_bucket(state: GCHookState, bucket: dist.GradBucket) -> None:
    with torch.no_grad():
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            t = state.targets.get(id(p))
            if t is None:
                raise RuntimeError(f"dist_gc: DDP bucket holds a parameter of shape {tuple(p.shape)} the GC hook state does not know")
            if t.geometry is not None:
                centralize_(g, mode=state.config.mode, output_dim=t.output_dim or 0)


def gc_allreduce_hook(state: GCHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Centralize the bucket's gradients locally, then average them like DDP's default
    all-reduce hook."""
    _centralize_bucket(state, bucket)
    return default_hooks.allreduce_hook(state.process_group, bucket)


def gc_wrapper(hook: Hook) -> Hook:
    """Wrap another comm hook so that GC runs first on the uncompressed local gradient;
    ``hook`` is then called with ``state.inner_state``."""

    def gc_wrapped_hook(state: GCHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        _centralize_bucket(state, bucket)
        return hook(state.inner_state, bucket)

    gc_wrapped_hook.__name__ = f"gc_{getattr(hook, '__name__', 'hook')}"
    return gc_wrapped_hook
