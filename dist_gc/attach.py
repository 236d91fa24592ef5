"""``dist_gc.attach``: turn GC on for whatever optimizer an engine steps.

GC runs in a ``register_step_pre_hook`` of the optimizer that updates the (master)
parameters. That hook fires after the engine's gradient reduction, loss-scale
unscaling and gradient clipping, and before the update rule (so before Adam's moment
estimates and before decoupled weight decay) — where the paper's SGD_GC/Adam_GC apply
it. An engine that skips a step (fp16 overflow) does not call ``step``, so GC skips too.
"""

from __future__ import annotations

import logging
from typing import Any

from .adapters import Binding, bind
from .core.config import GCConfig
from .core.select import warn_optimizer_risks
from .engine.engine import GCEngine, GCStats

__all__ = ["attach", "GCHandle"]

log = logging.getLogger("dist_gc")


class GCHandle:
    """Returned by :func:`attach`. ``stats`` describes the last step; ``remove()``
    restores plain behaviour exactly."""

    def __init__(self, binding: Binding | None, config: GCConfig) -> None:
        self.config = config
        self.binding = binding
        self.engine: GCEngine | None = None
        self.engines: list[GCEngine] = []
        self._hook = None
        self._stats = GCStats()
        if binding is None:
            return
        self._stats.centralized = [p.name for p in binding.plans]
        self._stats.skipped = {n: t.reason for n, t in binding.targets.items() if t.geometry is None}
        temp = max(64 * 2**20, sum(_local_bytes(s) for s in binding.sources) // 100)
        # One engine per phase when the optimizer is stepped once per part of the
        # parameters (see Binding.phases); each step call then centralizes only its part.
        phases = binding.phases if binding.phases is not None else [list(range(len(binding.plans)))]
        self.engines = [
            GCEngine([binding.plans[i] for i in idx], binding.sources, temp_limit_bytes=temp, full_stats=config.full_stats)
            for idx in phases
        ]
        self.engine = self.engines[0]
        # Message sizes are derived independently on each rank; check they agree once
        # (collective, on every rank) so a layout bug fails here instead of hanging.
        for engine in self.engines:
            engine.verify_collectives()
        if binding.verify is not None:
            binding.verify()
        self._hook = binding.optimizer.register_step_pre_hook(self._pre_step)

    @property
    def enabled(self) -> bool:
        return self._hook is not None

    @property
    def optimizer(self):
        return None if self.binding is None else self.binding.optimizer

    @property
    def stats(self) -> GCStats:
        """Statistics of the last step (see :class:`~dist_gc.GCStats`)."""
        return self._stats

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        phase = 0 if self.binding.phase is None else self.binding.phase(optimizer)
        stats = GCStats(centralized=self._stats.centralized, skipped=self._stats.skipped)
        stats = self.engines[phase].step(stats)
        # Phase 0 opens a training step; later phases add to its statistics.
        self._stats = stats if phase == 0 else _merge_stats(self._stats, stats)

    def step(self) -> GCStats:
        """Centralize the current gradients now (for code that steps the update
        itself, without ``optimizer.step``)."""
        if self.binding is not None and self.binding.phase is not None:
            for k, engine in enumerate(self.engines):  # every phase, in order
                stats = engine.step(GCStats(centralized=self._stats.centralized, skipped=self._stats.skipped))
                self._stats = stats if k == 0 else _merge_stats(self._stats, stats)
        else:
            self._pre_step(None, (), {})
        return self._stats

    def remove(self) -> None:
        """Detach GC; the optimizer behaves exactly as before ``attach``."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.binding is not None:
            for fn in self.binding.on_remove:
                fn()

    def __repr__(self) -> str:
        if self.binding is None:
            return "GCHandle(disabled)"
        return (
            f"GCHandle(engine={self.binding.engine!r}, mode={self.config.mode!r}, "
            f"centralized={len(self._stats.centralized)}, skipped={len(self._stats.skipped)})"
        )


def _merge_stats(a: GCStats, b: GCStats) -> GCStats:
    """Statistics of one training step made of several phases (disjoint parameters)."""

    def norm(x: float | None, y: float | None) -> float | None:
        return None if x is None or y is None else (x * x + y * y) ** 0.5

    a.max_abs_mean_before = max(a.max_abs_mean_before, b.max_abs_mean_before)
    if a.max_abs_mean_after is not None and b.max_abs_mean_after is not None:
        a.max_abs_mean_after = max(a.max_abs_mean_after, b.max_abs_mean_after)
    a.grad_norm_before = norm(a.grad_norm_before, b.grad_norm_before)
    a.grad_norm_after = norm(a.grad_norm_after, b.grad_norm_after)
    a.bytes_communicated += b.bytes_communicated
    a.collectives += b.collectives
    a.seconds += b.seconds
    return a


def _local_bytes(source) -> int:
    try:
        g = source()
    except Exception:  # noqa: BLE001 - a source may only be valid during a step
        return 0
    return 0 if g is None else g.numel() * g.element_size()


def attach(target: Any, *, model: Any = None, config: GCConfig | dict | None = None) -> GCHandle:
    """Apply gradient centralization before every update ``target`` makes.

    ``target``: a ``torch.optim.Optimizer`` (single process, DDP, FSDP1/FSDP2 with
    ``model=``), a ``deepspeed.DeepSpeedEngine``, or accelerate's
    ``AcceleratedOptimizer``. ``model``: the (wrapped) model, used for parameter names
    and output dims. ``config``: a :class:`GCConfig` or a dict of its fields
    (default ``GCConfig()``: channel mode, every tensor with >= 2 dims).

    Must be called on every rank (it may run one small collective to check that all
    ranks derived the same layout). Invalid configs raise ``ValueError`` before any
    collective.

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
        return GCHandle(None, config)
    binding = bind(target, model, config)
    warn_optimizer_risks(binding.optimizer)
    handle = GCHandle(binding, config)
    log.info("dist_gc: %r", handle)
    return handle
