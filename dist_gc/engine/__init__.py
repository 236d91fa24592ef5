"""Layouts of sharded gradients and the shared engine that centralizes them."""

from .engine import GCEngine, GCStats
from .layout import Reduction, Region, TensorPlan, flat_regions, plan_block, plan_flat_shard, plan_full_tensor, split_channels

__all__ = ["GCEngine", "GCStats", "Region", "Reduction", "TensorPlan", "flat_regions", "plan_block", "plan_flat_shard", "plan_full_tensor", "split_channels"]
