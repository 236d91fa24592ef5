"""TEMPORARY stand-in for ``dist_gc.accelerate`` (being written on main); delete when it lands.

Same API: ``attach(accelerator, optimizer, model=None, *, config=None)`` and
``read_config(accelerator, config=None)``.
"""

from __future__ import annotations

from typing import Any

from .attach import GCHandle, attach as _attach
from .core.config import GCConfig


def _is_deepspeed(accelerator: Any) -> bool:
    return str(accelerator.distributed_type).endswith("DEEPSPEED")


def read_config(accelerator: Any, config: Any = None) -> GCConfig:
    if _is_deepspeed(accelerator):
        if config is not None:
            raise ValueError("under DeepSpeed the GC settings come from the DeepSpeed JSON's block; pass no config")
        return GCConfig.from_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config)
    if config is None:
        return GCConfig()
    if isinstance(config, GCConfig):
        return config
    if isinstance(config, dict):
        return GCConfig.from_dict(config)
    return GCConfig.from_file(config)


def attach(accelerator: Any, optimizer: Any, model: Any = None, *, config: Any = None) -> GCHandle:
    cfg = read_config(accelerator, config)
    if _is_deepspeed(accelerator):
        return _attach(accelerator.deepspeed_engine_wrapped.engine, config=cfg)
    return _attach(getattr(optimizer, "optimizer", optimizer), model=model, config=cfg)
