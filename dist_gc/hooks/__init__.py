"""Communication hooks: GC before the reduction (pre-reduce strategy, zero extra bytes)."""

from .ddp import GCHookState, gc_allreduce_hook, gc_wrapper

__all__ = ["GCHookState", "gc_allreduce_hook", "gc_wrapper"]
