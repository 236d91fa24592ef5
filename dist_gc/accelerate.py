"""``dist_gc.accelerate``: one call after ``accelerator.prepare`` turns GC on for
whatever accelerate built — MULTI_CPU/DDP, FSDP1, FSDP2 or DeepSpeed.

    accelerator = Accelerator()
    gc_config = dist_gc.accelerate.read_config(accelerator, "dist_gc/configs/gc/channel.yaml")  # fail fast
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    gc = dist_gc.accelerate.attach(accelerator, optimizer, model, config=gc_config)
    ...
    accelerator.backward(loss); accelerator.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()                  # GC runs inside, after clipping, before the update
    dist_gc.accelerate.log_stats(accelerator, gc, step=step)   # gc/* to every tracker, one call

Where the settings come from:

* **DeepSpeed** (``accelerator.distributed_type == DEEPSPEED``): the top-level
  ``"gradient_centralization"`` block of the DeepSpeed JSON (``deepspeed_config_file``
  in the accelerate YAML, or the plugin's dict); absent means disabled. accelerate's
  own YAML rejects unknown keys, so the block never goes there. Giving ``config=`` as
  well is an error (two sources of truth). A DeepSpeed config written in the accelerate
  YAML alone (no JSON, so no block) takes ``config=``.
* **Everything else**: ``config`` — a :class:`~dist_gc.GCConfig`, a dict of its
  fields, a path to a JSON/YAML GC file, or ``None`` for ``GCConfig()`` defaults.

Where GC runs: under DeepSpeed, ``accelerator.backward`` calls ``engine.step()``, which
steps the inner torch optimizer on the fp32 master partition after reduction, unscaling
and clipping — GC is a pre-hook of that optimizer. Otherwise ``optimizer.step()`` of the
``AcceleratedOptimizer`` forwards to the user's optimizer on gradient-sync steps only
(through ``GradScaler.step`` under fp16, after unscaling; skipped on overflow), so GC
runs once per real update, after ``accelerator.clip_grad_norm_``.
"""

from __future__ import annotations

import os
from typing import Any

from .adapters.accelerated import TESTED_VERSIONS
from .attach import GCHandle, attach as attach_target
from .core.config import GCConfig

__all__ = ["attach", "log_stats", "read_config", "uses_deepspeed", "accelerator_kwargs", "TESTED_VERSIONS"]


def accelerator_kwargs() -> dict[str, Any]:
    """``Accelerator(**accelerator_kwargs())`` runs the same script on GPUs and on a
    machine without GPUs (gloo), under every accelerate config. Empty when CUDA is there.

    Why: on a CPU-only machine accelerate 1.x picks multi-process MULTI_CPU only when
    told ``cpu=True`` — but ``cpu=True`` also switches DeepSpeed off. Under DeepSpeed
    (``ACCELERATE_USE_DEEPSPEED``, set by ``accelerate launch``) it must instead be given
    the gloo backend: without one it reports ``num_processes == 1`` on every rank
    while DeepSpeed partitions over all of them, so every rank would load the whole
    dataset."""
    import torch

    if torch.cuda.is_available():
        return {}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        from accelerate.utils import InitProcessGroupKwargs

        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


def uses_deepspeed(accelerator: Any) -> bool:
    return str(getattr(accelerator, "distributed_type", "")).upper().endswith("DEEPSPEED")


def read_config(accelerator: Any, config: GCConfig | dict | str | os.PathLike | None = None) -> GCConfig:
    """The GC settings :func:`attach` will use (see the module docstring). Call it
    right after ``Accelerator()`` to reject a bad config before any work: it raises
    ``ValueError`` naming the key, the value and what is allowed, identically on every
    rank, without communicating."""
    if uses_deepspeed(accelerator):
        plugin = accelerator.state.deepspeed_plugin
        where = getattr(plugin, "deepspeed_config_file", None) or "accelerate's DeepSpeed config"
        block = GCConfig.block_of(plugin.deepspeed_config, where=str(where))
        if block is not None and config is not None:
            raise ValueError(
                f"dist_gc.accelerate: config={config!r} given, but accelerate runs DeepSpeed with a "
                f"'gradient_centralization' block in its config ({where}): the block is the one source of truth; "
                "put the settings there and pass no config"
            )
        if block is not None:
            return block
        if config is None:  # no block: off, as DeepSpeed treats absent sections
            return GCConfig(enabled=False)
        # A DeepSpeed config written in accelerate's YAML (no JSON to hold a block):
        # the settings come from config= (the wrapper's --gc-config).
    if config is None:
        return GCConfig()
    if isinstance(config, GCConfig):
        return config
    if isinstance(config, dict):
        return GCConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return GCConfig.from_file(config)
    raise ValueError(f"dist_gc.accelerate: config={config!r} (allowed: a GCConfig, a dict of its fields, a path, or None)")


def attach(accelerator: Any, optimizer: Any, model: Any = None, *, config: GCConfig | dict | str | os.PathLike | None = None) -> GCHandle:
    """Attach GC to what ``accelerator.prepare`` returned. ``optimizer``: the prepared
    optimizer (an ``AcceleratedOptimizer``); ``model``: the prepared model (names and
    output dims; required for FSDP). Call on every rank. Returns a
    :class:`~dist_gc.GCHandle` (``handle.enabled`` is False when the settings disable
    GC)."""
    gc_config = read_config(accelerator, config)
    if uses_deepspeed(accelerator):
        wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
        if wrapped is None:
            raise ValueError("dist_gc.accelerate.attach: no DeepSpeed engine yet; call it after accelerator.prepare(model, optimizer, ...)")
        model = wrapped.engine
    return attach_target(optimizer, model=model, config=gc_config)


def log_stats(accelerator: Any, handle: GCHandle, step: int | None = None) -> dict[str, int | float]:
    """Send the last step's GC statistics to every tracker of ``accelerator`` in one
    ``accelerator.log`` call, keys prefixed ``gc/`` (``gc/max_abs_mean_before``, ...),
    values plain ``int``/``float`` (accelerate's trackers drop other types silently).
    Call it on every rank after ``optimizer.step()``; accelerate logs on the main
    process only, and is a no-op without ``log_with=`` / ``init_trackers``. Returns
    the dict it logged (empty when GC is disabled: nothing is logged)."""
    values = handle.stats_dict(prefix="gc/")
    if values:
        accelerator.log(values, step=step)
    return values
