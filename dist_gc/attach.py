"""``dist_gc.attach``: turn GC on for whatever optimizer an engine steps.

GC runs in a ``register_step_pre_hook`` of the optimizer that updates the (master)
parameters. That hook fires after the engine's gradient reduction, loss-scale
unscaling and gradient clipping, and before the update rule (so before Adam's moment
estimates and before decoupled weight decay) — where the paper's SGD_GC/Adam_GC apply
it. An engine that skips a step (fp16 overflow) does not call ``step``, so GC skips too.
When ``step`` is given a closure (LBFGS, SAM, PyTorch Lightning's automatic
optimization), the closure is wrapped so that GC runs right after each of its backward
passes, on the gradients the update rule then consumes.

Exactly one handle per optimizer (``_HANDLES``). A handle has an ``origin``: ``"user"``
(:func:`attach`, and everything built on it) or ``"auto"`` (the launcher wrapper
``dist-gc-run`` / ``python -m dist_gc.run``, through :func:`attach_auto`). An automatic
attach that finds a handle returns it (the script's own call wins); a user attach that
finds an automatic handle returns it when the settings are equal and raises naming both
otherwise; a second user attach raises.

The pipeline: an adapter describes where each gradient lives
(:func:`dist_gc.adapters.describe`), the planner selects and plans the targets once
(:func:`dist_gc.planner.plan`), and one :class:`~dist_gc.engine.engine.GCEngine` per
optimizer phase runs them. At every ``step`` the handle checks, by identity, that the
optimizer still holds the tensors that were planned.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import sys
import warnings
import weakref
from typing import Any, Callable

import torch

from .adapters import Description, describe
from .core.config import DEEPSPEED_CONFIG_KEY, GCConfig
from .core.select import warn_optimizer_risks
from .engine.agreement import Agreements, group_ranks
from .engine.engine import GCEngine, GCStats
from .planner import Plan, plan

__all__ = ["attach", "GCHandle", "attach_auto", "handle_for"]

log = logging.getLogger("dist_gc")

#: The key GC's step count is saved under in the optimizer's state dict.
_STATE_KEY = "dist_gc"

#: The handle attached to each optimizer (one attach per optimizer).
_HANDLES: "weakref.WeakKeyDictionary[Any, GCHandle]" = weakref.WeakKeyDictionary()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (as ``logging.lastResort`` does),
    so redirections made after import are honoured."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging() -> None:
    """The ``dist_gc`` logger prints INFO lines to stderr by default, like DeepSpeed's
    (``DIST_GC_LOG_LEVEL`` changes the level; a handler the user adds replaces ours)."""
    if getattr(log, "_dist_gc_configured", False):
        return
    log._dist_gc_configured = True  # type: ignore[attr-defined]
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[dist_gc] %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(os.environ.get("DIST_GC_LOG_LEVEL", "INFO").upper())


def _is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _param_ids(optimizer: Any) -> tuple[int, ...]:
    return tuple(id(p) for g in optimizer.param_groups for p in g["params"])


class GCHandle:
    """Returned by :func:`attach`. ``stats`` describes the last step; ``remove()``
    restores plain behaviour exactly."""

    def __init__(self, description: Description | None, gc_plan: Plan | None, config: GCConfig, *,
                 redescribe: Callable[[], Description] | None = None, origin: str = "user", source: str = "config=") -> None:
        self.config = config
        self.origin = origin
        """``"user"`` (:func:`attach`) or ``"auto"`` (the launcher wrapper)."""
        self.source = source
        """Where the settings came from, e.g. ``"the 'gradient_centralization' block of the DeepSpeed config"``."""
        self.description = description
        self.plan = gc_plan
        self.engines: tuple[GCEngine, ...] = ()
        self.replans = 0
        """How many times the plan was re-derived because the optimizer's parameters changed."""
        self._redescribe = redescribe
        self._agreement: Agreements | None = None
        self._steps_done = 0
        self._state_hooks: list = []
        self._hook = None
        self._stats = GCStats()
        if description is None or gc_plan is None:
            return
        self._build(description, gc_plan)
        opt = description.optimizer
        self._hook = opt.register_step_pre_hook(self._pre_step)
        # GC's step count travels with the optimizer's checkpoint, so stats.step continues
        # after a resume (DeepSpeed: taken from the engine's own global_steps instead).
        self._state_hooks = [opt.register_state_dict_post_hook(self._save_step),
                             opt.register_load_state_dict_pre_hook(self._load_step)]
        _HANDLES[opt] = self

    def _build(self, description: Description, gc_plan: Plan) -> None:
        self.description, self.plan = description, gc_plan
        self._stats = GCStats(centralized=gc_plan.centralized, skipped=gc_plan.skipped)
        # One engine per phase when the optimizer is stepped once per part of the
        # parameters (see Description.phases); each step call then centralizes its part.
        self.engines = tuple(GCEngine(plans, description.sources, full_stats=self.config.full_stats) for plans in gc_plan.phases)
        # What the optimizer holds, by identity: checked at every step (cheap: no data).
        self._planned_ids = None if description.phase_of is not None else _param_ids(description.optimizer)
        # Every rank GC talks to must have the same setup: compared through the store
        # BEFORE any collective (a per-rank difference would otherwise hang or diverge),
        # group by group (see Agreements). The number and sizes of every later GC
        # collective over a group follow from the facts its ranks compare.
        groups = self._coupled_groups()
        self._agreement = Agreements(list(groups), description.label) if groups else None
        if self._agreement is not None:
            self._agreement.compare({ranks: self._facts(ranks, peer) for ranks, peer in groups.items()})
        if description.check is not None:
            description.check()

    def _coupled_groups(self) -> dict[tuple[int, ...], bool]:
        """``{ranks: shares everything}`` for every group of two or more ranks that GC's
        setup couples: the adapter's peer groups (True: their ranks hold the same
        parameters) and every group a plan reduces or sums statistics over (False unless
        also a peer group: its ranks may hold different parameters — MoE experts,
        pipeline stages)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return {}
        out: dict[tuple[int, ...], bool] = {}
        for g in self.description.peer_groups:
            out[group_ranks(g)] = True
        for p in self.plan.plans:
            for g in (*p.shard_groups, *(r.group for r in p.reductions)):
                out.setdefault(group_ranks(g), False)
        return {r: peer for r, peer in out.items() if len(r) > 1}

    def _facts(self, ranks: tuple[int, ...], peer: bool) -> dict:
        """What the ranks of one group must share: the settings and engine; for a peer
        group every centralized target, its geometry and the phases; for any other group
        the targets GC reduces over it; and the sizes of GC's collectives over it."""
        def over(g: Any) -> bool:
            return group_ranks(g) == ranks

        names = set(self.plan.centralized) if peer else {p.name for p in self.plan.plans if any(over(r.group) for r in p.reductions)}
        geometry = hashlib.sha1(json.dumps(
            [[t.name, list(t.shape), t.output_dim, t.batch_dims, t.groups] for t in self.plan.targets.values() if t.name in names]
        ).encode()).hexdigest()[:16]
        facts = {
            "settings": self.config.to_dict(),
            "engine": self.description.label,
            "centralized" if peer else "centralized (reduced over these ranks)": sorted(names),
            "output channels (digest)": geometry,
            "GC all-reduce sizes": [[b.size for b in e.buckets if over(b.group)] for e in self.engines],
        }
        if peer:
            facts["phases"] = len(self.engines)
        if self.config.full_stats:
            facts["statistics all-reduces"] = [sum(over(g) for slot in e.compiled.stat_groups for g in slot) for e in self.engines]
        return facts

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
        """Optimizer steps GC has run on, counting those before a checkpoint resume."""
        return self._steps_done

    def _next_step(self) -> int:
        count = self.description.step_count
        return count() + 1 if count is not None else self._steps_done + 1

    def _save_step(self, optimizer: Any, state_dict: dict) -> dict:
        state_dict[_STATE_KEY] = {"step": self._steps_done}
        return state_dict

    def _load_step(self, optimizer: Any, state_dict: dict) -> dict:
        state_dict = dict(state_dict)
        saved = state_dict.pop(_STATE_KEY, None)
        if isinstance(saved, dict) and isinstance(saved.get("step"), int):
            self._steps_done = saved["step"]
        return state_dict

    @property
    def stats(self) -> GCStats:
        """Statistics of the last step (see :class:`~dist_gc.GCStats`)."""
        return self._stats

    # ------------------------------------------------------------------ per step
    def _pre_step(self, optimizer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        phase = self._check_optimizer(optimizer)
        if phase == 0 and self._agreement is not None:
            self._agreement.check_removed(self._next_step())  # before any GC collective of this step
        # torch passes the bound call's args: (optimizer, closure?) — see
        # torch/optim/optimizer.py, Optimizer.profile_hook_step.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._run_phase(phase)
            return None
        if self.description.phase_of is not None:
            raise RuntimeError(f"dist_gc: {self.label} steps its optimizer in phases; a closure cannot be centralized there")

        def gc_closure():
            # The optimizer calls this (under torch.enable_grad) where it would call the
            # user's closure: GC runs right after the closure's backward, on exactly the
            # gradients the update rule reads next.
            loss = closure()
            self._run_phase(phase)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": gc_closure}
        return (args[0], gc_closure, *args[2:]), kwargs

    def _check_optimizer(self, optimizer: Any) -> int:
        """The phase this ``step`` runs, after checking that the optimizer still holds the
        planned tensors; re-plans where the layout can be re-derived locally."""
        d = self.description
        if d.phase_of is not None:
            return d.phase_of(optimizer)  # raises naming the tensor when it is not planned
        if _param_ids(optimizer) == self._planned_ids:
            return 0
        before = set(self._planned_ids)
        now = [(gi, i, p) for gi, g in enumerate(optimizer.param_groups) for i, p in enumerate(g["params"])]
        added = [f"param_groups[{gi}][{i}] {tuple(p.shape)}" for gi, i, p in now if id(p) not in before]
        change = f"{len(added)} tensor(s) new to dist_gc ({', '.join(added[:3])}{', ...' if len(added) > 3 else ''})"
        if self._redescribe is None:
            raise RuntimeError(
                f"dist_gc: the parameters of the optimizer {self.label} steps changed after dist_gc.attach: {change}; "
                "their layout cannot be re-derived on this rank alone. Call handle.remove() and attach again, "
                "on every rank, after changing them"
            )
        try:
            description = self._redescribe()
        except (ValueError, TypeError) as exc:
            raise RuntimeError(
                f"dist_gc: the optimizer's parameters changed after dist_gc.attach ({change}) and cannot be re-planned: "
                f"{exc}. If an engine took the optimizer over (deepspeed.initialize, accelerator.prepare), attach after it, "
                "to the engine: dist_gc.attach(engine) / dist_gc.accelerate.attach(accelerator, optimizer, model)"
            ) from None
        if description.optimizer is not optimizer:
            raise RuntimeError(f"dist_gc: the optimizer's parameters changed after attach ({change}) and now belong to "
                               f"{description.label}; attach to that engine instead")
        self._build(description, plan(description.layouts, self.config, description.roles, phases=description.phases))
        self.replans += 1
        log.info("dist_gc: re-planned after the optimizer's parameters changed (%s): %s", change, _summary(self))
        return 0

    def _run_phase(self, phase: int) -> None:
        stats = GCStats(skipped=self._stats.skipped)
        stats = self.engines[phase].step(stats)
        # Phase 0 opens a training step; later phases add to its statistics.
        if phase == 0:
            self._steps_done = stats.step = self._next_step()
            self._stats = stats
        else:
            self._stats = self._stats.merge(stats)

    def step(self) -> GCStats:
        """Centralize the current gradients now, every phase in order (for code that
        applies the update itself, without ``optimizer.step``)."""
        for phase in range(len(self.engines)):
            self._run_phase(phase)
        return self._stats

    def remove(self) -> None:
        """Detach GC; the optimizer behaves exactly as before ``attach``.

        Collective: call it on every rank, at the same point. A rank that still runs GC
        after a peer removed it raises at its next step (instead of hanging in a GC
        collective or silently updating differently)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            for h in self._state_hooks:
                h.remove()
            if self._agreement is not None:
                self._agreement.mark_removed(self._steps_done)
            if _HANDLES.get(self.description.optimizer) is self:
                del _HANDLES[self.description.optimizer]
        if self.description is not None:
            for fn in self.description.on_remove:
                fn()
            self.description.on_remove.clear()

    def stats_dict(self, prefix: str = "gc/") -> dict[str, int | float]:
        """The last step's scalar statistics as plain ``int``/``float`` values with keys
        prefixed ``prefix`` — what trackers accept (``accelerator.log``, Lightning's
        ``log_dict``, the Trainer's logs). Empty when GC is disabled."""
        if self.description is None:
            return {}
        return {f"{prefix}{k}": (v if isinstance(v, int) and not isinstance(v, bool) else float(v))
                for k, v in self._stats.as_dict().items()}

    def __repr__(self) -> str:
        if self.description is None:
            return "GCHandle(disabled)"
        return (
            f"GCHandle(engine={self.label!r}, mode={self.config.mode!r}, "
            f"centralized={len(self.plan.centralized)}, skipped={len(self.plan.skipped)})"
        )


def _summary(handle: GCHandle) -> str:
    """One line: what GC does on this job (engine, mode, targets, traffic, assumptions)."""
    p, c = handle.plan, handle.config
    traffic = sum(b.size for e in handle.engines for b in e.buckets) * 4
    collectives = sum(1 for e in handle.engines for b in e.buckets if b.size)
    line = (f"GC ON: {handle.label}, mode={c.mode}, {len(p.centralized)} tensor(s) centralized, {len(p.skipped)} skipped, "
            f"GC traffic {traffic} B/step in {collectives} all-reduce(s)")
    # An output_dim pattern the user wrote is not an assumption.
    unknown = [t for t in p.targets.values() if t.geometry is not None and (t.role is None or not t.role.known)
               and not any(fnmatch.fnmatchcase(t.name, pat) for pat in c.output_dim)]
    if unknown and c.mode == "channel":
        shown = ", ".join(f"{t.name} ({t.role.kind if t.role else 'no module found'}: dim {t.output_dim})" for t in unknown[:5])
        line += f"; output dim assumed (module type not recognised, or a stacked expert layout shapes cannot tell; set output_dim to override) for {len(unknown)}: {shown}"
        line += ", ..." if len(unknown) > 5 else ""
    return line


def _coerce(config: Any) -> GCConfig | None:
    if config is None or isinstance(config, GCConfig):
        return config
    if isinstance(config, dict):
        return GCConfig.from_dict(config)
    raise ValueError(f"config={config!r} (allowed: a dist_gc.GCConfig, a dict of its fields, or None)")


def engine_block(target: Any) -> tuple[GCConfig | None, str] | None:
    """For a ``DeepSpeedEngine``: the settings of the ``"gradient_centralization"`` block
    of the config the engine was built from (``None`` when it has none) and a
    description of that source; ``None`` for any other target. The engine keeps the
    resolved dict it was built from, unknown top-level keys and accelerate's / the
    Trainer's filled-in ``"auto"`` values included (``engine._config._param_dict``)."""
    if "deepspeed" not in sys.modules:
        return None
    from deepspeed.runtime.engine import DeepSpeedEngine

    if not isinstance(target, DeepSpeedEngine):
        return None
    params = getattr(getattr(target, "_config", None), "_param_dict", None)
    if not isinstance(params, dict):
        raise ValueError("dist_gc.attach: this DeepSpeedEngine keeps no config dict (engine._config._param_dict); "
                         "unknown DeepSpeed internals")
    where = "the DeepSpeed engine's config"
    return GCConfig.block_of(params, where=where), f"the {DEEPSPEED_CONFIG_KEY!r} block of {where}"


def handle_for(optimizer: Any) -> GCHandle | None:
    """The enabled handle attached to ``optimizer`` or to an optimizer it wraps
    (accelerate's ``AcceleratedOptimizer``, DeepSpeed's ZeRO optimizers: ``.optimizer``
    chains), or ``None``."""
    seen = 0
    while optimizer is not None and seen < 4:
        try:
            handle = _HANDLES.get(optimizer)
        except TypeError:  # not weak-referenceable
            handle = None
        if handle is not None and handle.enabled:
            return handle
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return None


def _disagreement(first: GCConfig, second: GCConfig) -> tuple[str, str]:
    """The fields on which two configs differ, as two dicts (``"{'mode': 'channel'}"``)."""
    a, b = first.to_dict(), second.to_dict()
    keys = [k for k in a if a[k] != b[k]]
    return str({k: a[k] for k in keys}), str({k: b[k] for k in keys})


def attach(target: Any, *, model: Any = None, config: GCConfig | dict | None = None) -> GCHandle:
    """Apply gradient centralization before every update ``target`` makes.

    ``target``: a ``torch.optim.Optimizer`` (single process, DDP, FSDP1/FSDP2 with
    ``model=``), a ``deepspeed.DeepSpeedEngine``, or accelerate's
    ``AcceleratedOptimizer``. ``model``: the (wrapped) model, used for parameter names
    and output dims. ``config``: a :class:`GCConfig` or a dict of its fields
    (default ``GCConfig()``: channel mode, every tensor with >= 2 dims).

    DeepSpeed: ``attach(engine)`` reads the ``"gradient_centralization"`` block of the
    engine's own config (absent: ``GCConfig()`` defaults; ``"enabled": false``: a
    disabled handle); a ``config=`` that disagrees with a present block raises
    ``ValueError`` naming both.

    Must be called on every rank (it may run one small collective to check that all
    ranks derived the same layout), once per optimizer: a second ``attach`` raises
    ``ValueError`` naming the first handle (``handle.remove()`` it first). Under the
    launcher wrapper (``dist-gc-run``), which attaches by itself, ``attach`` returns the
    wrapper's handle when the settings are equal and raises naming both otherwise. Invalid
    configs raise ``ValueError`` before any collective; so do engine configurations
    dist_gc cannot handle exactly (naming the option and why) and parameters it
    cannot centralize (sparse gradients). Rank 0 logs one line saying what GC does.

    Example::

        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gc = dist_gc.attach(opt, model=model)
        ...
        loss.backward(); opt.step()          # GC runs inside step, before AdamW's update
        print(gc.stats.max_abs_mean_before)
    """
    return _attach(target, model=model, config=_coerce(config), origin="user", source="config=")


def attach_auto(target: Any, *, model: Any = None, config: GCConfig | None = None, source: str) -> GCHandle:
    """The launcher wrapper's attach (``origin="auto"``): like :func:`attach`, but when
    the optimizer already has a handle (the script attached itself) that handle is
    returned unchanged."""
    return _attach(target, model=model, config=config, origin="auto", source=source)


def _attach(target: Any, *, model: Any, config: GCConfig | None, origin: str, source: str) -> GCHandle:
    _setup_logging()
    found = engine_block(target)
    if found is not None and found[0] is not None:
        block, where = found
        if config is not None and config != block:
            mine, theirs = _disagreement(config, block)
            raise ValueError(
                f"dist_gc.attach: {source} gives {mine}, but {where} gives {theirs}; "
                "give the settings in one place (the block, or config= with no block)"
            )
        config, source = block, where
    elif config is None:
        config, source = GCConfig(), "GCConfig() defaults"
    if not config.enabled:
        if _is_rank0():
            log.info("GC OFF (config: enabled=false, from %s)", source)
        return GCHandle(None, None, config, origin=origin, source=source)
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"dist_gc.attach: model= is a {type(model).__module__}.{type(model).__qualname__}; expected the (wrapped) "
            "torch.nn.Module whose parameters the optimizer updates (its names and layer types decide the output dims)"
        )
    description = describe(target, model)
    existing = _HANDLES.get(description.optimizer)
    if existing is not None and existing.enabled:
        if origin == "auto":
            return existing  # the script attached itself: exactly one attach per optimizer
        if existing.origin == "auto":
            if existing.config == config:
                return existing
            theirs, mine = _disagreement(existing.config, config)
            raise ValueError(
                f"dist_gc.attach: the launcher wrapper (dist-gc-run) already attached GC to this optimizer with "
                f"{theirs} from {existing.source}; this call's {source} gives {mine}. Give the settings in one place"
            )
        raise ValueError(
            f"dist_gc.attach: GC is already attached to this optimizer ({existing!r}); call .remove() on that handle "
            "first, or keep using it"
        )
    gc_plan = plan(description.layouts, config, description.roles, phases=description.phases)
    warn_optimizer_risks(description.optimizer)
    if not description.roles and config.mode == "channel" and gc_plan.centralized and _is_rank0():
        warnings.warn(
            f"dist_gc.attach without model=: output dim 0 assumed for all {len(gc_plan.centralized)} centralized tensors "
            f"({', '.join(gc_plan.centralized[:4])}{', ...' if len(gc_plan.centralized) > 4 else ''}); pass model= so "
            "ConvTranspose, Hugging Face Conv1D and other layers get their own output dim",
            stacklevel=2,
        )
    # Single process / DDP layouts can be re-derived locally when the optimizer's
    # parameters change (a new param group); sharded engines' cannot.
    redescribe = (lambda: describe(target, model)) if description.replannable else None
    handle = GCHandle(description, gc_plan, config, redescribe=redescribe, origin=origin, source=source)
    if _is_rank0():
        log.info(_summary(handle) + f" (settings: {source}{'; attached by dist-gc-run' if origin == 'auto' else ''})")
    return handle
