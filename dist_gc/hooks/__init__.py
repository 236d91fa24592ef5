"""Communication hooks: GC before the reduction (pre-reduce strategy, zero extra bytes)."""

from .ddp import GCHookState, gc_allreduce_hook, gc_wrapper
from .fsdp import FSDPGCHookState, gc_fsdp_hook, register_fsdp_gc_hook

__all__ = ["GCHookState", "gc_allreduce_hook", "gc_wrapper", "FSDPGCHookState", "gc_fsdp_hook", "register_fsdp_gc_hook"]
