"""dist_gc: gradient centralization that is exact under DDP, FSDP and DeepSpeed ZeRO.

Gradient centralization (Yong et al., "Gradient Centralization: A New Optimization
Technique for Deep Neural Networks", ECCV 2020, arXiv 2004.01461) subtracts from each
weight gradient its mean over every dim except the output dim (``mode="channel"``) or
over the whole tensor (``mode="tensor"``), immediately before the optimizer update.

    import dist_gc
    gc = dist_gc.attach(optimizer, model=model)      # GCConfig() defaults
"""

from . import hooks
from .attach import GCHandle, attach
from .core.centralize import Geometry, centralize_, geometry_of
from .core.config import DEEPSPEED_CONFIG_KEY, GCConfig
from .core.select import clean_name, detect_output_dims
from .engine.engine import GCEngine, GCStats

__version__ = "0.1.0"

__all__ = [
    "attach",
    "hooks",
    "GCHandle",
    "GCConfig",
    "GCStats",
    "GCEngine",
    "DEEPSPEED_CONFIG_KEY",
    "centralize_",
    "geometry_of",
    "Geometry",
    "clean_name",
    "detect_output_dims",
]
