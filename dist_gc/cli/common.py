"""Helpers shared by the training loop and ``--verify``: engine facts, data loaders and
attaching GC through the accelerate adapter."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from ..core.config import GCConfig
from .tasks import EpochShuffleSampler

from .. import accelerate as gc_accelerate
from ..accelerate import uses_deepspeed as is_deepspeed

__all__ = ["gc_accelerate", "is_deepspeed", "zero_stage", "engine_clip", "make_loader", "resolve_gc_config", "attach_gc"]


def deepspeed_config(accelerator: Any) -> dict:
    """The DeepSpeed config as accelerate resolved it (``"auto"`` values filled)."""
    return accelerator.state.deepspeed_plugin.deepspeed_config


def zero_stage(accelerator: Any) -> int | None:
    """ZeRO stage under DeepSpeed, ``None`` otherwise."""
    if not is_deepspeed(accelerator):
        return None
    return int(deepspeed_config(accelerator).get("zero_optimization", {}).get("stage", 0))


def engine_clip(accelerator: Any, max_grad_norm: float | None) -> float | None:
    """The gradient-norm clipping the engine applies before the optimizer step.

    DeepSpeed clips inside ``engine.step`` using the JSON's ``gradient_clipping`` (and
    accelerate's ``clip_grad_norm_`` is then a no-op); otherwise the script clips with
    ``accelerator.clip_grad_norm_(max_grad_norm)``. Either way GC runs after clipping."""
    if is_deepspeed(accelerator):
        clip = float(deepspeed_config(accelerator).get("gradient_clipping", 0.0) or 0.0)
        return clip if clip > 0 else None
    return max_grad_norm if max_grad_norm and max_grad_norm > 0 else None


def make_loader(dataset: Any, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    """A loader whose order is a function of ``(seed, epoch)`` (see EpochShuffleSampler).
    ``drop_last`` keeps every rank's micro-batch the same size, so the mean of the
    per-rank mean losses (what data parallelism averages) is the global-batch mean."""
    sampler = EpochShuffleSampler(len(dataset), seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=shuffle)


def resolve_gc_config(accelerator: Any, path: str | None) -> GCConfig:
    """The GC settings the run uses, validated before any work. Under DeepSpeed they come
    from the DeepSpeed JSON's ``"gradient_centralization"`` block (giving a file too is
    an error; without a block, from ``path``); otherwise from ``path``, or channel mode
    with full statistics when no file is given. A bad config exits with the adapter's message (key, value, allowed)."""
    if path is None and not is_deepspeed(accelerator):
        return GCConfig(full_stats=True)
    try:
        return gc_accelerate.read_config(accelerator, path)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def attach_gc(accelerator: Any, optimizer: Any, model: Any, config: GCConfig) -> Any:
    """Attach GC after ``accelerator.prepare``. Under DeepSpeed the adapter reads the
    JSON block itself (passing ``config=`` there is an error by design)."""
    if is_deepspeed(accelerator):
        return gc_accelerate.attach(accelerator, optimizer, model)
    return gc_accelerate.attach(accelerator, optimizer, model, config=config)
