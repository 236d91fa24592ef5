"""A ``transformers.Trainer`` callback: GC on, and ``gc/*`` statistics in the Trainer's
logs — ``trainer.state.log_history``, every ``report_to`` tracker and the console.

    from dist_gc.integrations.transformers import DistGCCallback
    trainer = Trainer(model=model, args=TrainingArguments(..., deepspeed="ds_config.json"),
                      train_dataset=ds, callbacks=[DistGCCallback()])
    trainer.train()

(or with no code change: ``torchrun -m dist_gc.run train.py`` / ``accelerate launch -m
dist_gc.run train.py``: the launcher wrapper adds this callback to every Trainer.)

Settings: under DeepSpeed, the ``"gradient_centralization"`` block of the DeepSpeed JSON
(absent: GC stays off; giving ``config=`` too is an error); otherwise ``config=`` (a
:class:`~dist_gc.GCConfig`, dict or path), else ``DIST_GC_CONFIG`` (the wrapper's
``--gc-config``), else ``GCConfig()`` defaults — adding the callback is the opt-in.

Where GC runs: the Trainer clips (``max_grad_norm``, or DeepSpeed's
``gradient_clipping``) and, under fp16, unscales before the optimizer steps; GC runs in
that step, after clipping and unscaling, right before the update. It attaches at
``on_train_begin``, once the Trainer has created the optimizer and run
``accelerator.prepare``; a handle that already exists on that optimizer (the wrapper's,
or the script's own ``dist_gc.attach``) is used instead — exactly one attach. The hook
the callback attached is removed when training ends.

Stats: the callback puts itself **first** in the Trainer's callback list (at
``on_init_end``, or at ``on_train_begin`` when it was added later), so its ``on_log``
adds ``gc/<stat>`` to the logs dict before any tracker (TensorBoard: ``train/gc/<stat>``)
or the console printer sees it; and, because ``Trainer.log`` appends its copy to
``state.log_history`` before calling ``on_log``, it updates that entry too. Only
training-step logs (those with ``"loss"``) get GC stats; evaluation and the final
summary stay as they are. With ``logging_steps > 1`` the values are those of the last
step of the window.

Why the callback looks for its Trainer: the callback events pass the unwrapped model and
accelerate's optimizer wrapper, but neither the prepared model (``DeepSpeedEngine``,
DDP/FSDP) nor the ``Accelerator``. ``DistGCCallback()`` therefore finds the Trainer
whose callback list holds it (the Trainer is the caller of ``on_init_end``: its frames
are walked and the match is checked by identity); ``DistGCCallback(trainer)`` is
accepted too. Without a Trainer found it attaches from the event's optimizer and model
(single process, DDP, FSDP; not DeepSpeed).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .._extras import require

require("transformers", "transformers", "dist_gc.integrations.transformers")

from transformers import TrainerCallback  # noqa: E402

from ..attach import GCHandle, attach_auto, handle_for  # noqa: E402
from ..core.config import GCConfig  # noqa: E402

__all__ = ["DistGCCallback"]


def _find_trainer(callback: "DistGCCallback") -> Any:
    """The ``transformers.Trainer`` up the call stack whose callback handler holds ``callback``."""
    from transformers import Trainer

    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, Trainer) and any(c is callback for c in getattr(getattr(obj, "callback_handler", None), "callbacks", ())):
            return obj
        frame = frame.f_back
    return None


def _has_block(accelerator: Any) -> bool:
    from ..core.config import DEEPSPEED_CONFIG_KEY

    return DEEPSPEED_CONFIG_KEY in accelerator.state.deepspeed_plugin.deepspeed_config


class DistGCCallback(TrainerCallback):
    """GC for a ``transformers.Trainer``, stats as ``gc/<stat>`` in its logs (see the module docstring).

    ``trainer``: optional (found automatically). ``config``: GC settings for non-DeepSpeed
    runs. ``handle``: the :class:`~dist_gc.GCHandle` once training began."""

    def __init__(self, trainer: Any = None, config: GCConfig | dict | str | os.PathLike | None = None, *, auto: bool = False) -> None:
        if trainer is not None and not hasattr(trainer, "accelerator"):
            raise ValueError(f"DistGCCallback(trainer=...): expected a transformers.Trainer, got {type(trainer).__name__}")
        self.trainer = trainer
        self.config = config
        self.auto = auto  # added by the launcher wrapper: settings from the wrapper only, origin "auto"
        self.handle: GCHandle | None = None
        self._owns_handle = False

    # ------------------------------------------------------------------ placement
    def _move_first(self) -> None:
        callbacks = getattr(getattr(self.trainer, "callback_handler", None), "callbacks", None)
        if callbacks is None or (callbacks and callbacks[0] is self):
            return
        # Safe while the handler iterates this list (call_event): the callbacks before
        # us shift by one, the one after us keeps its index, none is skipped or repeated.
        callbacks[:] = [self] + [c for c in callbacks if c is not self]

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None:
            self.trainer = _find_trainer(self)
        self._move_first()

    # ------------------------------------------------------------------ attach
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        t = self.trainer
        self._move_first()
        optimizer = t.optimizer if t is not None else optimizer
        existing = handle_for(optimizer)
        if existing is None and t is not None and getattr(t, "is_deepspeed_enabled", False):
            existing = getattr(t.model_wrapped, "dist_gc", None)
        if existing is not None:  # the wrapper's or the script's: exactly one attach
            self.handle, self._owns_handle = existing, False
            return
        self.handle = self._attach(t, optimizer, model)
        self._owns_handle = self.handle is not None and self.handle.enabled

    def _attach(self, t: Any, optimizer: Any, model: Any) -> GCHandle | None:
        from .. import _autopatch
        from ..accelerate import attach as attach_accelerate, read_config, uses_deepspeed

        env, env_source = _autopatch.env_config()
        if self.auto:
            # The wrapper: DeepSpeed engines were attached at deepspeed.initialize (none
            # found means its block was absent or off); otherwise DIST_GC_CONFIG.
            if env is None or (t is not None and uses_deepspeed(t.accelerator)):
                return None
            config = read_config(t.accelerator, env)
            return attach_auto(t.optimizer, model=t.model_wrapped, config=config, source=env_source)
        config = self.config
        if config is None and env is not None:
            config = env
        if t is None:
            import warnings

            warnings.warn("DistGCCallback: no transformers.Trainer found for this callback; attaching to the optimizer "
                          "and model the callback events pass (not supported under DeepSpeed: pass DistGCCallback(trainer))")
            from ..attach import attach

            return attach(getattr(optimizer, "optimizer", optimizer), model=model,
                          config=config if not isinstance(config, (str, os.PathLike)) else GCConfig.from_file(config))
        if uses_deepspeed(t.accelerator) and self.config is None and _has_block(t.accelerator):
            config = None  # the DeepSpeed JSON's block is the one source; DIST_GC_CONFIG only without one
        return attach_accelerate(t.accelerator, t.optimizer, t.model_wrapped, config=config)

    # ------------------------------------------------------------------ stats
    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs or self.handle is None:
            return  # training-step logs only: evaluation and the final summary stay clean
        stats = self.handle.stats_dict(prefix="gc/")
        if not stats:
            return
        logs.update(stats)  # every tracker and the console run after us (we are first)
        # Trainer.log appended {**logs, "step": global_step} to log_history before on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step and "loss" in state.log_history[-1]:
            state.log_history[-1].update(stats)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.handle is not None and self._owns_handle:
            self.handle.remove()
