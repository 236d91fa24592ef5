"""FSDP2 (``fully_shard``) and any DTensor parameters (HSDP, tensor parallelism).

What the optimizer sees: DTensor parameters whose ``.grad`` are DTensors with the same
placements. The local gradient is an N-D block of the global gradient: each mesh axis
with ``Shard(d)`` (or ``_StridedShard(d)``, which FSDP2 uses on top of TP
``ColwiseParallel``) cuts dim ``d``; ``Replicate`` axes hold identical, already
reduced copies. :func:`~dist_gc.engine.layout.plan_block` gives each tensor one region
(the whole local block) with sums indexed by local channel, completed over exactly the
mesh axes that shard an AVERAGED dim:

* ``mode="channel"`` averages every dim but the output dim. FSDP2's default
  ``Shard(0)`` cuts only the output dim of Linear/Conv/Embedding weights: every row is
  whole on one rank, so GC is local and exact with zero communication (also under HSDP
  and with ``ColwiseParallel``). ``shard_placement_fn`` returning ``Shard(1)``,
  ``RowwiseParallel`` (``Shard(1)`` on the TP axis), ConvTranspose (output dim 1) or
  HF ``Conv1D`` (output dim -1) under ``Shard(0)`` cut averaged dims: their per-channel
  sums are all-reduced over those axes' groups.
* ``mode="tensor"`` averages all dims: one scalar per tensor, all-reduced over every
  axis that shards the tensor.

The engine puts every tensor's partial sums for one process group into ONE all-reduce
per step (DTensor's own ``.mean()`` would issue one collective per tensor).

Where GC runs: in the optimizer's step pre-hook, i.e. after FSDP2's reduce-scatter
(and the HSDP all-reduce), after ``torch.nn.utils.clip_grad_norm_`` and before the
update rule. With ``MixedPrecisionPolicy`` the optimizer sees the gradient in the
sharded parameter's dtype; statistics are accumulated in fp32 whatever the dtype.

Placements other than ``Shard``/``_StridedShard``/``Replicate`` (e.g. ``Partial``)
raise, naming the parameter and the placement.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..core.config import GCConfig
from ..core.select import detect_output_dims, resolve_targets
from ..engine.layout import TensorPlan, plan_block, plan_full_tensor
from . import Binding
from .plain import named_optimizer_params

__all__ = ["bind", "shard_groups_of"]

_DTENSOR_MODULE = "torch.distributed.tensor"


def _dtensor_class() -> Any:
    mod = sys.modules.get(_DTENSOR_MODULE)
    return None if mod is None else getattr(mod, "DTensor", None)


def _shard_dim(placement: Any) -> int | None:
    """The tensor dim a placement cuts, ``None`` for Replicate; raises otherwise."""
    from torch.distributed.tensor import placement_types as pt

    if isinstance(placement, pt.Replicate):
        return None
    # FSDP2 over TP ColwiseParallel uses _StridedShard: it cuts one dim into strided
    # pieces. Only WHICH dim is cut matters to the block plan (see plan_block), so it
    # is exact. (Not a Shard subclass in torch 2.13.)
    strided = getattr(pt, "_StridedShard", ())
    if isinstance(placement, (pt.Shard, strided)):
        return placement.dim
    raise ValueError(f"unsupported placement {placement!r}")


def shard_groups_of(name: str, p: Any) -> list[tuple[Any, int]]:
    """``[(process group of mesh axis a, tensor dim it shards)]`` for every sharding
    axis of DTensor ``p``, in mesh-axis order (Replicate axes left out)."""
    mesh, out = p.device_mesh, []
    for axis, placement in enumerate(p.placements):
        try:
            dim = _shard_dim(placement)
        except ValueError as exc:
            raise ValueError(
                f"dist_gc.attach: parameter {name!r} has placement {placement!r} on mesh axis {axis} of "
                f"{mesh}: {exc}; dist_gc handles Shard, _StridedShard and Replicate"
            ) from None
        if dim is not None:
            out.append((mesh.get_group(mesh_dim=axis), dim % p.dim()))
    return out


def _local_grad_source(name: str, p: Any, dtensor_cls: Any):
    placements, mesh, local_shape = tuple(p.placements), p.device_mesh, tuple(p.to_local().shape)

    def source() -> torch.Tensor | None:
        g = p.grad
        if g is None:
            return None
        # The plan was derived from the parameter's placements; a gradient laid out
        # differently (e.g. Partial, or another mesh) would be centralized wrongly.
        if not isinstance(g, dtensor_cls) or tuple(g.placements) != placements or g.device_mesh != mesh:
            got = f"{tuple(g.placements)} on {g.device_mesh}" if isinstance(g, dtensor_cls) else f"a {type(g).__name__}"
            raise RuntimeError(f"dist_gc: gradient of {name!r} is {got}, expected placements {placements} on {mesh} like the parameter")
        local = g.to_local()
        if tuple(local.shape) != local_shape:
            raise RuntimeError(f"dist_gc: local gradient of {name!r} has shape {tuple(local.shape)}, expected {local_shape}")
        return local

    return source


def bind(optimizer: Any, model: Any, config: GCConfig) -> Binding | None:
    dtensor_cls = _dtensor_class()
    if dtensor_cls is None or not isinstance(optimizer, torch.optim.Optimizer):
        return None
    named = named_optimizer_params(optimizer, model)
    if not any(isinstance(p, dtensor_cls) for _, p in named):
        return None
    # DTensor.shape is the GLOBAL shape, as resolve_targets needs.
    targets = resolve_targets([(n, tuple(p.shape)) for n, p in named], config, detect_output_dims(model) if model is not None else {})
    plans: list[TensorPlan] = []
    sources: list = []
    meshes: dict[Any, None] = {}
    for name, p in named:
        t = targets[name]
        if t.geometry is None:
            continue
        if isinstance(p, dtensor_cls):
            groups = shard_groups_of(name, p)
            meshes[p.device_mesh] = None
            plans.append(plan_block(name, t.geometry, local_shape=tuple(p.to_local().shape), output_dim=t.output_dim, shard_groups=groups, source=len(sources)))
            sources.append(_local_grad_source(name, p, dtensor_cls))
        else:
            plans.append(plan_full_tensor(name, t.geometry, len(sources), t.shape, t.output_dim))
            sources.append(lambda p=p: p.grad)
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", ())
    kind = "FSDP2" if model is not None and any(isinstance(m, fsdp_module) for m in model.modules()) else "DTensor"
    return Binding(optimizer, plans, sources, targets, engine=f"{kind} (meshes: {', '.join(map(str, meshes))})")
