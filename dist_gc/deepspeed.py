"""``dist_gc.deepspeed.initialize``: ``deepspeed.initialize`` with the
``"gradient_centralization"`` block of the DeepSpeed config turned into GC.

    engine, optimizer, loader, scheduler = dist_gc.deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config="ds_config.json")
    engine.dist_gc.stats          # the GCHandle (None when the block is absent/disabled)

Same arguments and return value as ``deepspeed.initialize``. The block uses the
:class:`~dist_gc.GCConfig` schema, e.g.::

    "gradient_centralization": {"enabled": true, "mode": "channel", "exclude": ["*.bias"]}

An absent block means off; a present block means on unless it says
``"enabled": false`` (``{}`` is on); a misspelt top-level key
(``gradient_centralisation``, ``gc``, ...) warns. With no code change at all, launch
through the wrapper (``deepspeed --module dist_gc.run train.py``): it patches
``deepspeed.initialize`` to do the same.

DeepSpeed ignores unknown top-level keys, so dist_gc's validation is the only guard:
the block is validated on every rank BEFORE ``deepspeed.initialize`` (unknown keys and
bad values raise ``ValueError`` naming them, identically on every rank, before any
collective), the key is left in the config (DeepSpeed accepts and ignores it), and GC
is attached to the engine when enabled (the pattern checks against the model's
parameter names run there, again before any collective).
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from .adapters.zero import TESTED_VERSIONS
from .attach import GCHandle, attach
from .core.config import GCConfig, unique_pairs

__all__ = ["initialize", "read_config", "HANDLE_ATTRIBUTE", "TESTED_VERSIONS"]

#: The engine attribute that holds the :class:`~dist_gc.GCHandle` after ``initialize``.
HANDLE_ATTRIBUTE = "dist_gc"


def read_config(config: Any = None, args: Any = None) -> GCConfig:
    """The GC settings of a DeepSpeed config given as ``deepspeed.initialize`` takes it:
    ``config`` (dict or path) or ``args.deepspeed_config`` (or the deprecated
    ``args.deepscale_config``). An absent block means GC disabled."""
    if config is None:
        for attr in ("deepspeed_config", "deepscale_config"):
            if getattr(args, attr, None) is not None:
                config = getattr(args, attr)
                break
    if config is None:
        return GCConfig(enabled=False)
    if isinstance(config, (str, os.PathLike)):
        return _read_file(os.fspath(config))
    if hasattr(config, "items"):
        return GCConfig.from_deepspeed_config(dict(config))
    raise ValueError(f"dist_gc.deepspeed: config must be a dict or a path, got {type(config).__name__}")


def _read_file(path: str) -> GCConfig:
    """DeepSpeed reads its JSON config with hjson (comments, trailing commas allowed);
    read it the same way when hjson is there (it is a DeepSpeed dependency)."""
    try:
        import hjson
    except ImportError:
        return GCConfig.from_deepspeed_config(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = hjson.load(f, object_pairs_hook=unique_pairs(path))
    except OSError as exc:
        raise ValueError(f"cannot read DeepSpeed config {path!r}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file ({exc})") from None
    except hjson.HjsonDecodeError as exc:
        raise ValueError(f"{path}: not a valid DeepSpeed JSON config: {exc}") from None
    return GCConfig.from_deepspeed_config(dict(data), where=path)


def initialize(*args: Any, **kwargs: Any):
    """Drop-in for ``deepspeed.initialize`` (same arguments, same return value) that
    applies gradient centralization when the config's ``"gradient_centralization"``
    block is present and not ``"enabled": false``. The handle is ``engine.dist_gc``
    (``None`` when off). GC runs on the fp32 master partition after DeepSpeed's
    reduction, unscaling and ``gradient_clipping``, right before the update."""
    import deepspeed

    # Under the launcher wrapper deepspeed.initialize is patched to attach by itself;
    # call the original so that this function is the only attach.
    ds_initialize = inspect.unwrap(deepspeed.initialize)
    bound = inspect.signature(ds_initialize).bind(*args, **kwargs)
    given = bound.arguments
    config = given.get("config")
    if config is None:
        config = given.get("config_params")
    gc_config = read_config(config, given.get("args"))  # raises ValueError on every rank
    result = ds_initialize(*args, **kwargs)
    engine = result[0]
    # attach(engine) reads the block again, from the dict the engine was built from.
    handle: GCHandle | None = attach(engine) if gc_config.enabled else None
    setattr(engine, HANDLE_ATTRIBUTE, handle)
    return result
