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

The same description covers the large-model compositions (torchtitan's recipe), whose
layouts are all DTensor blocks:

* expert parallelism: stacked expert weights ``(E, out, in)`` ``Shard(0)`` on the EP
  axis, sharded again by FSDP2 (``(_StridedShard(0), Shard(0))`` by default, or
  ``Shard(1)``/``Shard(2)`` from ``shard_placement_fn``) on their own mesh; dim 0 is a
  batch dim (kept: see ``GCConfig.batch_dims``), so only axes cutting ``in`` (or
  ``out`` in tensor mode) communicate;
* pipeline stages: each stage's optimizer holds its own FSDP2 layers (attach per
  stage); ``torch.distributed.pipelining`` reduce-scatters once after the last
  micro-batch, and GC runs in that stage optimizer's ``step``;
* context parallelism: parameters are replicated over CP in the math and FSDP2-sharded
  on the flattened ``dp x cp`` mesh: plain ``Shard(0)`` blocks;
* ``torch.compile`` per block: parameters and gradients are unchanged DTensors
  (names may carry ``_orig_mod``, which ``clean_name`` removes);
* ``CPUOffloadPolicy``: local gradients are CPU tensors; the engine all-reduces its
  message on the group's comm device (see ``GCEngine``).

Gradients on several meshes in one optimizer are fine here (one all-reduce per
process group); clipping them needs :func:`dist_gc.clip_grad_norm_`.

Placements other than ``Shard``/``_StridedShard``/``Replicate`` (e.g. ``Partial``)
raise, naming the parameter and the placement.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..core.select import resolve_roles
from ..engine.layout import Block, ShardAxis, TensorLayout, Whole
from . import Description
from ._common import named_optimizer_params, param_names

__all__ = ["describe", "shard_axes_of"]

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


def _is_strided(placement: Any) -> bool:
    from torch.distributed.tensor import placement_types as pt

    strided = getattr(pt, "_StridedShard", None)
    return strided is not None and isinstance(placement, strided)


def shard_axes_of(name: str, p: Any) -> tuple[ShardAxis, ...]:
    """The process group and the tensor dim of every mesh axis that shards DTensor
    ``p``, in mesh-axis order (Replicate axes left out)."""
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
            out.append(ShardAxis(mesh.get_group(mesh_dim=axis), dim % p.dim(), mesh.size(axis), mesh.get_local_rank(axis), _is_strided(placement)))
    return tuple(out)


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


def describe(optimizer: Any, model: Any) -> Description | None:
    dtensor_cls = _dtensor_class()
    if dtensor_cls is None or not isinstance(optimizer, torch.optim.Optimizer):
        return None
    named = named_optimizer_params(optimizer, param_names(model))
    if not any(isinstance(p, dtensor_cls) for _, p in named):
        return None
    layouts: list[TensorLayout] = []
    sources: list = []
    meshes: dict[Any, None] = {}
    for name, p in named:
        # DTensor.shape is the GLOBAL shape, as the planner needs.
        if isinstance(p, dtensor_cls):
            meshes[p.device_mesh] = None
            where = Block(len(sources), tuple(p.to_local().shape), shard_axes_of(name, p))
            sources.append(_local_grad_source(name, p, dtensor_cls))
        else:
            where = Whole(len(sources))
            sources.append(lambda p=p: p.grad)
        layouts.append(TensorLayout(name, tuple(p.shape), where))
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", ())
    kind = "FSDP2" if model is not None and any(isinstance(m, fsdp_module) for m in model.modules()) else "DTensor"
    return Description(
        optimizer=optimizer,
        layouts=layouts,
        sources=sources,
        label=f"{kind} (meshes: {', '.join(map(str, meshes))})",
        # Every mesh axis, Replicate ones included: their ranks must run the same GC.
        peer_groups=tuple(dict.fromkeys(m.get_group(mesh_dim=a) for m in meshes for a in range(m.ndim))),
        roles=resolve_roles(model) if model is not None else {},
    )
