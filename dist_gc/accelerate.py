"""``dist_gc.accelerate``: attach GC to what ``accelerator.prepare`` built (accelerate is
imported lazily, by the objects you pass in).

    import dist_gc.accelerate
    gc = dist_gc.accelerate.attach(accelerator, optimizer, model)
"""

from .adapters.accelerate import TESTED_VERSIONS
from .integrations.accelerate import accelerator_kwargs, attach, read_config, uses_deepspeed

__all__ = ["attach", "read_config", "uses_deepspeed", "accelerator_kwargs", "TESTED_VERSIONS"]
