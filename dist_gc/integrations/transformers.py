"""A ``transformers.Trainer`` callback that attaches GC once the Trainer has prepared
the model and optimizer with accelerate.

    from dist_gc.integrations.transformers import DistGCCallback
    trainer = Trainer(model=model, args=TrainingArguments(..., deepspeed="ds_config.json"), train_dataset=ds)
    trainer.add_callback(DistGCCallback(trainer))
    trainer.train()

Under DeepSpeed the settings come from the DeepSpeed JSON's ``"gradient_centralization"``
block (absent: GC stays off); otherwise from ``DistGCCallback(trainer, config=...)`` (a
:class:`~dist_gc.GCConfig`, dict or path; default ``GCConfig()``). The Trainer clips
(``max_grad_norm``, or DeepSpeed's ``gradient_clipping``) before the optimizer steps, so
GC runs after clipping and unscaling, right before the update. ``callback.handle`` is
the :class:`~dist_gc.GCHandle`; its last-step stats are added to the Trainer's logs as
``gc/<stat>``. The hook is removed when training ends.

Why the callback takes the Trainer: the callback handler passes the unwrapped model and
accelerate's wrapper optimizer, but not the prepared model (the ``DeepSpeedEngine``,
the DDP/FSDP wrapper) nor the Trainer's ``Accelerator``, which GC needs.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from ..attach import GCHandle
from ..core.config import GCConfig
from ..accelerate import attach as attach_accelerate

__all__ = ["DistGCCallback"]


class DistGCCallback(TrainerCallback):
    def __init__(self, trainer: Any, config: GCConfig | dict | str | os.PathLike | None = None) -> None:
        if not hasattr(trainer, "accelerator"):
            raise ValueError(f"DistGCCallback(trainer=...): expected a transformers.Trainer, got {type(trainer).__name__}")
        self.trainer = trainer
        self.config = config
        self.handle: GCHandle | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Here the Trainer has created the optimizer and run accelerator.prepare.
        t = self.trainer
        self.handle = attach_accelerate(t.accelerator, t.optimizer, t.model_wrapped, config=self.config)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is not None and self.handle is not None and self.handle.enabled:
            logs.update({f"gc/{k}": v for k, v in self.handle.stats.as_dict().items()})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
