"""Wrapper mode: switch GC on from the config a program already launches with.

Installed only by the launcher wrapper (``dist-gc-run`` / ``python -m dist_gc.run``,
through ``dist_gc/_bootstrap/sitecustomize.py``); nothing is patched otherwise.
:func:`install` registers post-import hooks and imports nothing; each patch runs when
the program itself imports the library it patches. Integrations stay thin: every
attach goes through :func:`dist_gc.attach.attach_auto` (adapters describe, the planner
plans), with ``origin="auto"``, so that a script that also calls dist_gc gets exactly
one attach per optimizer.

Where each engine is attached:

* **DeepSpeed**, whoever calls ``deepspeed.initialize`` (raw scripts, accelerate's
  DeepSpeed plugin, the HF Trainer's ``deepspeed=``, Lightning's DeepSpeedStrategy —
  all look the function up at call time): right after it returns, from the
  ``"gradient_centralization"`` block of the config the engine was built from; with no
  block, from ``DIST_GC_CONFIG`` (``--gc-config``: accelerate's YAML-only DeepSpeed
  configs); a block and a ``--gc-config`` that disagree raise naming both.
* **Everything else** (DDP, FSDP1, FSDP2 ``fully_shard`` under accelerate, the Trainer or
  a plain torchrun script): lazily, at each optimizer's first ``step``, through torch's
  global optimizer step pre-hook, with the settings of ``DIST_GC_CONFIG``. The model
  comes from recorders on the ``DistributedDataParallel`` / ``FullyShardedDataParallel``
  constructors, ``fully_shard`` and ``Accelerator.prepare``: the recorded model whose
  parameters include all of the optimizer's (the largest such). By the first step every
  ``prepare`` call is done. The per-optimizer hook the attach registers runs in the same
  ``step`` (torch iterates the global hooks, then the optimizer's own), wrapping a
  closure if there is one (GC after its backward).
* **HF Trainer** and **Lightning**: their ``Trainer.__init__`` also gets dist_gc's
  callback (first in the Trainer's list, so ``gc/*`` stats reach ``log_history``, every
  tracker and the console), which attaches at train / fit start.
"""

from __future__ import annotations

import functools
import os
import sys
import weakref
from typing import Any

from . import _posthook

__all__ = ["install", "env_config", "ENV_RUN", "ENV_CONFIG"]

ENV_RUN = "DIST_GC_RUN"
"""Set to ``1`` by the wrapper: the bootstrap installs the hooks only then."""
ENV_CONFIG = "DIST_GC_CONFIG"
"""Absolute path of the GC settings file given with ``--gc-config``."""

_installed = False
_models: "weakref.WeakSet[Any]" = weakref.WeakSet()  # candidate model roots (DDP, FSDP1, fully_shard, prepare)
_seen: "weakref.WeakSet[Any]" = weakref.WeakSet()  # optimizers the global step pre-hook has looked at
_claimed: "weakref.WeakSet[Any]" = weakref.WeakSet()  # DeepSpeed's optimizers: handled at deepspeed.initialize
_noted: set[str] = set()
_config_cache: dict[str, Any] = {}


def installed() -> bool:
    return _installed


def install() -> None:
    """Register the post-import hooks (idempotent; imports nothing)."""
    global _installed
    if _installed:
        return
    _installed = True
    on = _posthook.when_imported
    on("torch.optim.optimizer", _patch_optim)  # runs inside `import torch`: cheap work only
    on("torch.nn.parallel.distributed", _patch_ddp)
    on("torch.distributed.fsdp.fully_sharded_data_parallel", _patch_fsdp1)
    # fully_shard: hook the PACKAGES that re-export it, never the defining submodule. Its
    # body calls the module global `fully_shard.state(...)` (an attribute @contract sets),
    # so that global must stay the original; and a hook on the submodule fires while the
    # package is half-initialised, before it binds the re-export.
    on("torch.distributed.fsdp", _patch_fully_shard)
    on("torch.distributed._composable.fsdp", _patch_fully_shard)
    on("deepspeed", _patch_deepspeed)
    on("accelerate.accelerator", _patch_accelerate)
    on("transformers.trainer", _patch_hf_trainer)
    on("lightning.pytorch.trainer.trainer", _patch_lightning)


# --------------------------------------------------------------------------- notes
def _rank() -> int:
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # pragma: no cover - defensive
        pass
    return int(os.environ.get("RANK", "0") or 0)


def note(message: str, *, key: str | None = None) -> None:
    """One ``[dist_gc]`` line on stderr, rank 0 only (once per ``key``)."""
    if key is not None:
        if key in _noted:
            return
        _noted.add(key)
    if _rank() == 0 and os.environ.get("DIST_GC_LOG_LEVEL", "INFO").upper() not in ("WARNING", "ERROR", "CRITICAL"):
        print(f"[dist_gc] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- settings
def env_config() -> tuple[Any, str] | tuple[None, None]:
    """``(GCConfig, source)`` from ``DIST_GC_CONFIG``, or ``(None, None)`` when unset.
    A bad file raises ``ValueError`` naming the key, the value and what is allowed."""
    path = os.environ.get(ENV_CONFIG)
    if not path:
        return None, None
    if path not in _config_cache:
        from .core.config import GCConfig

        _config_cache[path] = GCConfig.from_file(path)
    return _config_cache[path], f"{ENV_CONFIG}={path} (--gc-config)"


_OFF = (f"GC off: no --gc-config / {ENV_CONFIG} given, and DeepSpeed's config has no 'gradient_centralization' "
        "block (for DDP/FSDP give dist-gc-run --gc-config PATH)")


# --------------------------------------------------------------------------- patching
def _after(owner: Any, name: str, then: Any) -> None:
    """Replace ``owner.name`` (a function or method) by one that calls the original and
    then ``then(result, *args, **kwargs)``; once (a second call is a no-op).
    ``functools.wraps`` keeps the original reachable as ``__wrapped__`` and copies its
    ``__dict__`` (``fully_shard.state`` & co. stay reachable)."""
    original = getattr(owner, name, None)
    if original is None or getattr(original, "_dist_gc_patched", False):
        return

    @functools.wraps(original)
    def patched(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        then(out, *args, **kwargs)
        return out

    patched._dist_gc_patched = True  # type: ignore[attr-defined]
    setattr(owner, name, patched)


# --------------------------------------------------------------------------- DeepSpeed
def _patch_deepspeed(ds: Any) -> None:
    # dist_gc.deepspeed.initialize calls the original through __wrapped__.
    _after(ds, "initialize", lambda result, *a, **k: _on_deepspeed_engine(result[0]))


def _claim(optimizer: Any) -> None:
    """Mark DeepSpeed's optimizer and the ones it wraps, so the global step hook leaves them alone."""
    for _ in range(4):
        if optimizer is None:
            return
        try:
            _claimed.add(optimizer)
        except TypeError:  # pragma: no cover - not weak-referenceable
            pass
        optimizer = getattr(optimizer, "optimizer", None)


def _on_deepspeed_engine(engine: Any) -> None:
    if getattr(engine, "optimizer", None) is None:
        return  # an inference engine (HF evaluation, Lightning predict): nothing to centralize
    _claim(engine.optimizer)
    from .attach import attach_auto, engine_block

    block, where = engine_block(engine) or (None, None)
    env, env_source = env_config()
    if block is not None and env is not None and block != env:
        raise ValueError(f"dist_gc: the DeepSpeed config's 'gradient_centralization' block ({block.to_dict()}) and "
                         f"{env_source} ({env.to_dict()}) disagree; give the settings in one place")
    config, source = (block, where) if block is not None else (env, env_source)
    if config is None:
        note(_OFF, key="off")
        engine.dist_gc = None
        return
    handle = attach_auto(engine, config=config, source=source)
    engine.dist_gc = handle if handle.enabled else None


# --------------------------------------------------------------------------- model recorders
def _record_after_init(cls: Any) -> None:
    _after(cls, "__init__", lambda _, self, *a, **k: _models.add(self))


def _patch_ddp(module: Any) -> None:
    _record_after_init(module.DistributedDataParallel)


def _patch_fsdp1(module: Any) -> None:
    _record_after_init(module.FullyShardedDataParallel)


def _record_all(out: Any, *args: Any, keep: Any = lambda m: True) -> None:
    for m in out if isinstance(out, (list, tuple)) else (out,):
        if keep(m):
            _models.add(m)


def _patch_fully_shard(package: Any) -> None:
    # Patch the re-export on torch.distributed.fsdp, never the defining module: the
    # function looks up its own name there.
    _after(package, "fully_shard", lambda out, *a, **k: _record_all(out))


def _patch_accelerate(module: Any) -> None:
    _after(module.Accelerator, "prepare",
           lambda out, *a, **k: _record_all(out, keep=lambda m: callable(getattr(m, "named_parameters", None))))


def _owner(optimizer: Any) -> Any:
    """The recorded model whose parameters include every parameter of ``optimizer``
    (the largest such), or ``None``."""
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    best = None
    for model in list(_models):
        mids = {id(p) for p in model.parameters()}
        if ids <= mids and (best is None or len(mids) > best[0]):
            best = (len(mids), model)
    return None if best is None else best[1]


def _first_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    """torch's global optimizer step pre-hook: a set lookup after each optimizer's first step."""
    if optimizer in _seen:
        return None
    _seen.add(optimizer)
    if optimizer in _claimed:
        return None
    from .attach import attach_auto, handle_for

    if handle_for(optimizer) is not None:
        return None  # the script (or a Trainer callback) attached already
    config, source = env_config()
    if config is None:
        note(_OFF, key="off")
        return None
    model = _owner(optimizer)
    if model is None:
        note(f"GC not attached to {type(optimizer).__name__}: no DDP / FSDP / fully_shard / accelerate-prepared model "
             "owns its parameters (a single-process script: call dist_gc.attach(optimizer, model=model))",
             key=f"noowner-{type(optimizer).__name__}")
        return None
    attach_auto(optimizer, model=model, config=config, source=source)
    return None  # the handle's own pre-hook, registered just now, runs next in this step


def _patch_optim(module: Any) -> None:
    module.register_optimizer_step_pre_hook(_first_step)


# --------------------------------------------------------------------------- Trainer callbacks
def _add_hf_callback(_: Any, trainer: Any, *args: Any, **kwargs: Any) -> None:
    from .integrations.transformers import DistGCCallback

    callbacks = trainer.callback_handler.callbacks
    mine = [c for c in callbacks if isinstance(c, DistGCCallback)]
    callback = mine[0] if mine else DistGCCallback(auto=True)
    callback.trainer = trainer
    if callback in callbacks:
        callbacks.remove(callback)
    callbacks.insert(0, callback)  # first: its on_log runs before every tracker and the console


def _patch_hf_trainer(module: Any) -> None:
    _after(module.Trainer, "__init__", _add_hf_callback)


def _add_lightning_callback(_: Any, trainer: Any, *args: Any, **kwargs: Any) -> None:
    from .integrations.lightning import DistGCCallback

    if not any(isinstance(c, DistGCCallback) for c in trainer.callbacks):
        trainer.callbacks.append(DistGCCallback(auto=True))


def _patch_lightning(module: Any) -> None:
    _after(module.Trainer, "__init__", _add_lightning_callback)
