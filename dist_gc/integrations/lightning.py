"""A PyTorch Lightning (``lightning`` package) callback: GC on every optimizer the
Trainer steps, ``gc/*`` statistics through ``self.log``.

    import lightning.pytorch as pl
    from dist_gc.integrations.lightning import DistGCCallback

    trainer = pl.Trainer(strategy="ddp", callbacks=[DistGCCallback()])   # or DistGCCallback(config={...})
    trainer.fit(module, loader)

(or with no code change: ``python -m dist_gc.run --gc-config gc/channel.yaml train.py``:
the launcher wrapper adds this callback to every Lightning Trainer.)

Settings: ``config=`` (a :class:`~dist_gc.GCConfig`, dict or path), else
``DIST_GC_CONFIG`` (the wrapper's ``--gc-config``), else ``GCConfig()`` defaults; under
the DeepSpeed strategy the ``"gradient_centralization"`` block of its config.

Where GC runs. At ``on_fit_start`` the strategy has wrapped the model (DDP, FSDP,
``fully_shard`` in ``configure_model``, a ``DeepSpeedEngine``) and built the optimizers;
the callback attaches to each (``dist_gc.attach``, or the engine under DeepSpeed).
*Automatic optimization* steps ``optimizer.step(closure)``, and the closure runs the
forward, the backward, ``on_before_optimizer_step`` and gradient clipping; dist_gc wraps
the closure, so GC runs after all of them, right before the update. *Manual
optimization* (``self.optimizers().step()``) reaches the same torch optimizer, whose
hook runs GC after the user's backward and before the update. A handle that already
exists on an optimizer (the wrapper's, or the module's own ``dist_gc.attach``) is used
instead: exactly one attach. Hooks this callback attached are removed at
``on_fit_end``.

Stats: logged with ``pl_module.log_dict`` at ``on_train_batch_end`` (GC stats exist only
after the step), ``on_step=True, on_epoch=False``, keys ``gc/<stat>``; with several
optimizers, ``gc/opt<i>/<stat>`` for the ones after the first. dist_gc's statistics are
already global (or the same on every rank), so ``sync_dist`` stays off.

Strategies tested: DDP (CPU, 2 processes, against the single-process oracle, automatic
and manual optimization) and ``ModelParallelStrategy`` (FSDP2, CPU). Lightning runs its
DeepSpeed and FSDP strategies on CUDA only; their GPU tests are guarded.
"""

from __future__ import annotations

import os
from typing import Any

from .._extras import require

require("lightning", "lightning", "dist_gc.integrations.lightning")

import lightning.pytorch as pl  # noqa: E402

from ..attach import GCHandle, attach, attach_auto, handle_for  # noqa: E402
from ..core.config import GCConfig  # noqa: E402

__all__ = ["DistGCCallback"]


def _is_deepspeed_engine(model: Any) -> bool:
    import sys

    if "deepspeed" not in sys.modules:
        return False
    from deepspeed.runtime.engine import DeepSpeedEngine

    return isinstance(model, DeepSpeedEngine)


class DistGCCallback(pl.Callback):
    """GC for a Lightning Trainer (see the module docstring). ``handles``: one
    :class:`~dist_gc.GCHandle` per optimizer once fitting started."""

    def __init__(self, config: GCConfig | dict | str | os.PathLike | None = None, *, auto: bool = False) -> None:
        self.config = config
        self.auto = auto  # added by the launcher wrapper: settings from the wrapper only, origin "auto"
        self.handles: list[GCHandle] = []
        self._owned: list[GCHandle] = []

    def _settings(self) -> tuple[GCConfig | None, str]:
        from .. import _autopatch

        env, env_source = _autopatch.env_config()
        if self.auto:
            return env, env_source or ""
        if self.config is not None:
            config = self.config
            if isinstance(config, (str, os.PathLike)):
                return GCConfig.from_file(config), f"DistGCCallback(config={os.fspath(config)!r})"
            return (GCConfig.from_dict(config) if isinstance(config, dict) else config), "DistGCCallback(config=...)"
        if env is not None:
            return env, env_source
        return GCConfig(), "GCConfig() defaults"

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.handles, self._owned = [], []
        model = trainer.strategy.model  # DDP(...) / FSDP(...) / DeepSpeedEngine / the module (fully_shard)
        config, source = self._settings()
        if _is_deepspeed_engine(model):
            handle = handle_for(model.optimizer) or getattr(model, "dist_gc", None)
            if handle is None and not self.auto:  # (the wrapper attached at deepspeed.initialize already)
                # The strategy's DeepSpeed config block wins; explicit settings must agree with it.
                handle = attach(model, config=None if source == "GCConfig() defaults" else config)
                self._owned.append(handle)
            self.handles = [handle] if handle is not None else []
            return
        if config is None:
            return  # wrapper without --gc-config: its one-line note says GC is off
        for optimizer in trainer.optimizers:
            handle = handle_for(optimizer)
            if handle is None:
                if self.auto:
                    handle = attach_auto(optimizer, model=model, config=config, source=source)
                else:
                    handle = attach(optimizer, model=model, config=config)
                    self._owned.append(handle)
            self.handles.append(handle)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        values: dict[str, float] = {}
        for i, handle in enumerate(self.handles):
            prefix = "gc/" if i == 0 else f"gc/opt{i}/"
            values.update({k: float(v) for k, v in handle.stats_dict(prefix=prefix).items()})
        if values:
            pl_module.log_dict(values, on_step=True, on_epoch=False, prog_bar=False, logger=True, sync_dist=False)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        for handle in self._owned:
            handle.remove()
        self._owned = []
