"""``dist_gc.attach``: turn GC on for whatever optimizer an engine steps.

GC runs in a ``register_step_pre_hook`` of the optimizer that updates the (master)
parameters. That hook fires after the engine's gradient reduction, loss-scale
unscaling and gradient clipping, and before the update rule (so before Adam's moment
estimates and before decoupled weight decay) — where the paper's SGD_GC/Adam_GC apply
it. An engine that skips a step (fp16 overflow) does not call ``step``, so GC skips too.

The pipeline: an adapter describes where each gradient lives
(:func:`dist_gc.adapters.describe`), the planner selects and plans the targets once
(:func:`dist_gc.planner.plan`), and one :class:`~dist_gc.engine.engine.GCEngine` per
optimizer phase runs them.
"""

from __future__ import annotations

import logging
from typing import Any

from .adapters import Description, describe
from .core.config import GCConfig
from .core.select import warn_optimizer_risks
from .engine.engine import GCEngine, GCStats
from .planner import Plan, plan

__all__ = ["attach", "GCHandle"]

log = logging.getLogger("dist_gc")


class GCHandle:
    """Returned by :func:`attach`. ``stats`` describes the last step; ``remove()``
    restores plain behaviour exactly."""

    def __init__(self, description: Description | None, gc_plan: Plan | None, config: GCConfig) -> None:
        self.config = config
        self.description = description
        self.plan = gc_plan
        self.engines: tuple[GCEngine, ...] = ()
        self._hook = None
        self._stats = GCStats()
        if description is None or gc_plan is None:
            return
        self._stats.centralized = gc_plan.centralized
        self._stats.skipped = gc_plan.skipped
        # One engine per phase when the optimizer is stepped once per part of the
        # parameters (see Description.phases); each step call then centralizes its part.
        self.engines = tuple(GCEngine(plans, description.sources, full_stats=config.full_stats) for plans in gc_plan.phases)
        # Message sizes are derived independently on each rank; check they agree once
        # (collective, on every rank) so a layout bug fails here instead of hanging.
        for engine in self.engines:
            engine.verify_collectives()
        if description.check is not None:
            description.check()
        self._hook = description.optimizer.register_step_pre_hook(self._pre_step)

    @property
    def enabled(self) -> bool:
        return self._hook is not None

    @property
    def optimizer(self):
        """The optimizer whose step pre-hook runs GC (DeepSpeed's inner optimizer, the
        optimizer inside accelerate's wrapper, or the one passed to ``attach``)."""
        return None if self.description is None else self.description.optimizer

    @property
    def label(self) -> str:
        """The engine configuration, e.g. ``"DeepSpeed ZeRO-2 (bf16, ...)"``."""
        return "disabled" if self.description is None else self.description.label

    @property
    def steps(self) -> int:
        """Optimizer steps GC has run on (each phase-0 step opens one)."""
        return self.engines[0].steps if self.engines else 0

    @property
    def stats(self) -> GCStats:
        """Statistics of the last step (see :class:`~dist_gc.GCStats`)."""
        return self._stats

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        phase_of = self.description.phase_of
        self._run_phase(0 if phase_of is None else phase_of(optimizer))

    def _run_phase(self, phase: int) -> None:
        stats = GCStats(centralized=self._stats.centralized, skipped=self._stats.skipped)
        stats = self.engines[phase].step(stats)
        # Phase 0 opens a training step; later phases add to its statistics.
        self._stats = stats if phase == 0 else self._stats.merge(stats)

    def step(self) -> GCStats:
        """Centralize the current gradients now, every phase in order (for code that
        applies the update itself, without ``optimizer.step``)."""
        for phase in range(len(self.engines)):
            self._run_phase(phase)
        return self._stats

    def remove(self) -> None:
        """Detach GC; the optimizer behaves exactly as before ``attach``."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.description is not None:
            for fn in self.description.on_remove:
                fn()

    def __repr__(self) -> str:
        if self.description is None:
            return "GCHandle(disabled)"
        return (
            f"GCHandle(engine={self.label!r}, mode={self.config.mode!r}, "
            f"centralized={len(self._stats.centralized)}, skipped={len(self._stats.skipped)})"
        )


def attach(target: Any, *, model: Any = None, config: GCConfig | dict | None = None) -> GCHandle:
    """Apply gradient centralization before every update ``target`` makes.

    ``target``: a ``torch.optim.Optimizer`` (single process, DDP, FSDP1/FSDP2 with
    ``model=``), a ``deepspeed.DeepSpeedEngine``, or accelerate's
    ``AcceleratedOptimizer``. ``model``: the (wrapped) model, used for parameter names
    and output dims. ``config``: a :class:`GCConfig` or a dict of its fields
    (default ``GCConfig()``: channel mode, every tensor with >= 2 dims).

    Must be called on every rank (it may run one small collective to check that all
    ranks derived the same layout). Invalid configs raise ``ValueError`` before any
    collective; so do engine configurations dist_gc cannot handle exactly (naming the
    option and why).

    Example::

        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gc = dist_gc.attach(opt, model=model)
        ...
        loss.backward(); opt.step()          # GC runs inside step, before AdamW's update
        print(gc.stats.max_abs_mean_before)
    """
    if config is None:
        config = GCConfig()
    elif isinstance(config, dict):
        config = GCConfig.from_dict(config)
    elif not isinstance(config, GCConfig):
        raise ValueError(f"config={config!r} (allowed: a dist_gc.GCConfig, a dict of its fields, or None)")
    if not config.enabled:
        log.info("dist_gc: gradient centralization is disabled by config")
        return GCHandle(None, None, config)
    description = describe(target, model)
    gc_plan = plan(description.layouts, config, description.output_dims, phases=description.phases)
    warn_optimizer_risks(description.optimizer)
    handle = GCHandle(description, gc_plan, config)
    log.info("dist_gc: %r", handle)
    return handle
