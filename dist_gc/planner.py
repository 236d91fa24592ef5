"""The one planner: layouts + config -> which tensors GC centralizes, and how.

Every entry point goes through :func:`plan`: ``dist_gc.attach`` (for every engine
adapter), both communication hooks and the CLI's oracle. Adapters only say WHERE each
parameter's gradient lives (:class:`~dist_gc.engine.layout.TensorLayout`); the planner
applies the selection rules once (``include``/``exclude`` patterns, ``min_ndim``,
output dims, degenerate tensors — :func:`~dist_gc.core.select.resolve_targets`) to the
ORIGINAL names and GLOBAL shapes, so the same rules hold on every engine, and builds
the :class:`~dist_gc.engine.layout.TensorPlan` of every target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from .core.config import GCConfig
from .core.select import Role, Target, resolve_targets
from .engine.layout import TensorLayout, TensorPlan, plan_tensor

__all__ = ["Plan", "plan"]


@dataclass(frozen=True, slots=True)
class Plan:
    """The GC decision for every described parameter and the plans of the targets."""

    targets: dict[str, Target]
    """``{name: Target}`` for every parameter described (skipped ones included)."""
    phases: tuple[tuple[TensorPlan, ...], ...]
    """Plans of the centralized targets, one tuple per optimizer phase."""

    @property
    def centralized(self) -> list[str]:
        return [p.name for phase in self.phases for p in phase]

    @property
    def skipped(self) -> dict[str, str]:
        """``{name: reason}`` for every parameter GC leaves alone."""
        return {n: t.reason for n, t in self.targets.items() if t.geometry is None}

    @property
    def plans(self) -> list[TensorPlan]:
        return [p for phase in self.phases for p in phase]


def plan(layouts: Sequence[TensorLayout], config: GCConfig, roles: Mapping[str, Role | int] | None = None, *, phases: int = 1) -> Plan:
    """Select targets among ``layouts`` by ``config`` and plan each one.

    ``roles``: what each parameter is to its module (:func:`~dist_gc.core.select.resolve_roles`),
    which decides its output dim (``config.output_dim`` overrides it; absent names get
    dim 0). ``phases``: how many ``step`` calls make one optimizer
    step (``TensorLayout.phase`` indexes them). A disabled config selects nothing.

    Raises ``ValueError`` (naming the key, the value and what is allowed) when a pattern
    matches no parameter, an ``output_dim`` override is out of range, or — with
    ``skip_degenerate=False`` — a selected tensor has single-element means; and when
    two layouts share a name or a phase is out of range (an adapter bug)."""
    names = [layout.name for layout in layouts]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"dist_gc: parameters described twice: {', '.join(dup[:5])}")
    targets = resolve_targets([(layout.name, layout.shape) for layout in layouts], config, roles)
    if not config.enabled:
        targets = {n: Target(t.name, t.shape, None, None, "disabled") for n, t in targets.items()}
    if config.enabled and not config.allow_empty and targets and all(t.geometry is None for t in targets.values()):
        raise ValueError(_nothing_selected(targets, config))
    per_phase: list[list[TensorPlan]] = [[] for _ in range(phases)]
    for layout in layouts:
        t = targets[layout.name]
        if t.geometry is None:
            continue
        if not 0 <= layout.phase < phases:
            raise ValueError(f"dist_gc: {layout.name!r} is described in phase {layout.phase} of {phases}")
        per_phase[layout.phase].append(plan_tensor(layout, t))
    return Plan(targets, tuple(tuple(p) for p in per_phase))


def _nothing_selected(targets: dict[str, Target], config: GCConfig) -> str:
    """Which keys left every parameter out, with counts (the most common first)."""
    causes: dict[str, int] = {}
    for t in targets.values():
        r = t.reason
        key = ("min_ndim" if r.startswith("ndim") else "include" if r.startswith("matches no include")
               else "exclude" if r.startswith("excluded") else r.split(":")[0])
        causes[key] = causes.get(key, 0) + 1
    shown = {"min_ndim": f"min_ndim={config.min_ndim}", "include": f"include={list(config.include)}",
             "exclude": f"exclude={list(config.exclude)}"}
    parts = [f"{shown.get(k, k)} leaves out {n}" for k, n in sorted(causes.items(), key=lambda kv: -kv[1])]
    largest = max(len(t.shape) for t in targets.values())
    return (f"gradient centralization is enabled but selects none of the {len(targets)} parameters: {'; '.join(parts)} "
            f"(largest ndim {largest}). Allowed: change those keys, enabled=false to turn GC off, or allow_empty=true")
