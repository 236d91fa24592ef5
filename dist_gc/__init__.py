"""dist_gc: gradient centralization that is exact under DDP, FSDP and DeepSpeed ZeRO.

Gradient centralization (Yong et al., "Gradient Centralization: A New Optimization
Technique for Deep Neural Networks", ECCV 2020, arXiv 2004.01461) subtracts from each
weight gradient its mean over every dim except the output dim (``mode="channel"``) or
over the whole tensor (``mode="tensor"``), immediately before the optimizer update.

    import dist_gc
    gc = dist_gc.attach(optimizer, model=model)      # GCConfig() defaults

The public API is ``__all__`` below plus the integration modules ``dist_gc.deepspeed``
(``initialize``), ``dist_gc.accelerate`` (``attach`` after ``accelerator.prepare``) and
``dist_gc.integrations.transformers`` (a Trainer callback), each imported on demand.
Everything else (``dist_gc.core``, ``dist_gc.engine``, ``dist_gc.adapters``,
``dist_gc.planner``) is internal and may change between releases.
"""

from . import hooks
from .attach import GCHandle, attach
from .clip import clip_grad_norm_
from .core.centralize import centralize_
from .core.config import GCConfig
from .engine.engine import GCStats

__version__ = "0.1.0"

__all__ = [
    "attach",
    "GCConfig",
    "GCHandle",
    "GCStats",
    "centralize_",
    "clip_grad_norm_",
    "hooks",
]
