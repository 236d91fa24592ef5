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

from ..adapters._common import param_names
from ..adapters.plain import describe_params
from ..core.config import GCConfig
from ..core.select import Target, resolve_roles
from ..engine.engine import GCEngine, GCStats
from ..engine.layout import TensorLayout, Whole, plan_tensor
from ..planner import plan

__all__ = ["GCHookState", "gc_allreduce_hook", "gc_wrapper"]

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future]


@dataclass(slots=True)
class GCHookState:
    """State of the GC comm hooks: the planner's GC decision per parameter, the process
    group for :func:`gc_allreduce_hook`, and the state handed to a wrapped hook."""

    config: GCConfig
    targets: dict[int, Target]
    """``{id(param): Target}`` for every parameter of the DDP model."""
    process_group: Any = None
    inner_state: Any = None
    """Passed to the hook that :func:`gc_wrapper` wraps (e.g. a process group)."""
    stats: GCStats = field(default_factory=GCStats)
    """Statistics of the last bucket centralized (``bytes_communicated`` is always 0)."""
    _engines: dict = field(default_factory=dict)
    _grads: list = field(default_factory=list)

    @classmethod
    def from_model(cls, ddp_model: torch.nn.Module, config: "GCConfig | dict | None" = None, *, process_group: Any = None, inner_state: Any = None) -> "GCHookState":
        """Plan GC for every parameter of ``ddp_model`` (raises ``ValueError`` on a config
        that does not fit the model, before any communication)."""
        config = GCConfig.from_dict(config) if isinstance(config, dict) else (config or GCConfig())
        names = param_names(ddp_model)
        named = [(names[id(p)], p) for p in ddp_model.parameters()]
        layouts, _ = describe_params(named)
        targets = plan(layouts, config, resolve_roles(ddp_model)).targets
        by_id = {id(p): targets[n] for n, p in named}
        return cls(config, by_id, process_group, inner_state if inner_state is not None else process_group)

    def _engine(self, params: list[torch.Tensor]) -> GCEngine:
        """The engine of one bucket's parameter list (DDP rebuilds its buckets after the
        first iteration, so engines are cached by the parameters they hold)."""
        key = tuple(id(p) for p in params)
        if key not in self._engines:
            plans = []
            for k, p in enumerate(params):
                t = self.targets.get(id(p))
                if t is None:
                    raise RuntimeError(f"dist_gc: DDP bucket holds a parameter of shape {tuple(p.shape)} the GC hook state does not know")
                if t.geometry is not None:
                    plans.append(plan_tensor(TensorLayout(t.name, t.shape, Whole(k)), t))
            n = len(params)
            self._engines[key] = GCEngine(plans, [lambda k=k: self._grads[k] for k in range(n)], full_stats=self.config.full_stats)
        return self._engines[key]


def _centralize_bucket(state: GCHookState, bucket: dist.GradBucket) -> None:
    engine = state._engine(list(bucket.parameters()))
    if not engine.plans:
        return
    state._grads = list(bucket.gradients())
    try:
        state.stats = engine.step()
    finally:
        state._grads = []


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
