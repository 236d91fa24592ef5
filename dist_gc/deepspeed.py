"""``dist_gc.deepspeed``: the DeepSpeed entry points (DeepSpeed is imported lazily).

    import dist_gc.deepspeed
    engine, optimizer, _, _ = dist_gc.deepspeed.initialize(model=model, config="ds_config.json")
"""

from .adapters.deepspeed import TESTED_VERSIONS
from .integrations.deepspeed import HANDLE_ATTRIBUTE, initialize, read_config

__all__ = ["initialize", "read_config", "HANDLE_ATTRIBUTE", "TESTED_VERSIONS"]
