"""FSDP1 (``FullyShardedDataParallel``): exact GC on FlatParameter shards.

What the optimizer sees. Each FSDP unit flattens its original tensors into one
``FlatParameter``: the tensors back to back (with ``use_orig_params=True``, alignment
padding between them), padded at the end to a multiple of the shard-group size ``W``
and cut into ``W`` equal shards of ``S`` elements: rank ``r`` of the shard group holds
``[r*S, (r+1)*S)`` of the padded flat. With ``use_orig_params=False`` the optimizer's
params are the FlatParameters (``.grad`` = the local flat shard); with ``True`` they are
the original parameters, each a 1-D view of the rank's piece (size 0 when the rank
holds none of it), whose ``.grad`` is the matching piece of the flat gradient.

So every original tensor's element range on EVERY rank of the shard group is a global
fact (shapes, numels and padding are identical on all ranks): :func:`plan_flat_shard`
turns it into per-rank regions and the few channel sums that straddle shard
boundaries, completed by one all-reduce per step over the shard group.

* ``FULL_SHARD`` / ``SHARD_GRAD_OP``: shard group = the FSDP process group.
* ``HYBRID_SHARD`` / ``_HYBRID_SHARD_ZERO2``: gradients are reduce-scattered within
  the shard group and then all-reduced across replicas, so every replica holds the
  same shard: statistics travel only within the shard group (``handle.process_group``).
* ``NO_SHARD``: every rank holds the whole, all-reduced flat gradient: no communication.

``CPUOffload(offload_params=True)``: the optimizer steps CPU parameters whose gradients
are CPU tensors with the same layout (the shard of the flat gradient copied to host).
Only the message moves: the engine all-reduces it on the group's comm device (CUDA
for NCCL) and copies it back. (On a machine without an accelerator FSDP1 offload does
not run: it pins memory and synchronizes a stream unconditionally.)

Where GC runs: in the optimizer's step pre-hook, i.e. after FSDP's reduce-scatter (and
the HSDP all-reduce), after ``fsdp_model.clip_grad_norm_`` and before the update rule
(before Adam's moments and decoupled weight decay). With ``MixedPrecision`` the
optimizer sees the full-precision sharded gradient (or the low-precision one with
``keep_low_precision_grads=True``); statistics are accumulated in fp32 either way.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from ..core.select import clean_name, resolve_roles
from ..engine.layout import FlatShard, TensorLayout, Whole
from . import Description
from ._common import equal_partition_ranges, named_optimizer_params, param_names, require_attrs, warn_if_untested
from .plain import describe_params

__all__ = ["describe", "FlatTensor", "FlatUnit", "describe_units", "TESTED_TORCH"]

#: torch versions whose FSDP1 internals (``torch/distributed/fsdp/_flat_param.py``) this
#: adapter was validated against. Other versions are checked attribute by attribute and
#: against FSDP's own per-rank shard metadata, and warn once.
TESTED_TORCH = ("2.13",)

_FSDP_MODULE = "torch.distributed.fsdp.fully_sharded_data_parallel"
_HANDLE_ATTRS = ("flat_param", "process_group", "rank", "world_size", "uses_sharded_strategy", "_sharding_strategy", "_use_orig_params")
_FLAT_ATTRS = ("_fqns", "_shapes", "_numels", "_numels_with_padding", "_is_padding_mask", "_num_params", "_shard_param_infos", "_sharded_size", "_unpadded_unsharded_size", "_param_extensions")


@dataclass(frozen=True, slots=True)
class FlatTensor:
    """One original tensor inside a FlatParameter."""

    name: str
    """Clean name (the user's own, FSDP wrapper parts removed)."""
    shape: tuple[int, ...]
    flat_offset: int
    """Where the tensor starts in the (unsharded, unpadded-at-end) flat parameter."""
    ranges: tuple[tuple[int, int], ...]
    """Element range ``[start, end)`` of the tensor's flattening that each rank of the
    shard group holds, in group-rank order (empty ranges allowed)."""
    offset_in_shard: int
    """Where this rank's piece starts in its local flat shard (0 when it holds none)."""
    param: torch.nn.Parameter | None
    """The original parameter with ``use_orig_params=True``, else ``None``."""


@dataclass(frozen=True, slots=True)
class FlatUnit:
    """One FSDP unit (one FlatParameter) and the layout of its original tensors."""

    name: str
    module: Any
    handle: Any
    flat_param: torch.nn.Parameter
    tensors: tuple[FlatTensor, ...]
    group: Any
    """The shard group (``None`` for NO_SHARD: nothing is sharded)."""
    rank: int
    """This rank's index in ``group`` (0 for NO_SHARD)."""
    strategy: str


def _require(obj: Any, attrs: tuple[str, ...], what: str) -> None:
    require_attrs(obj, attrs, what, package="torch", version=torch.__version__, tested=TESTED_TORCH)


def _fsdp_class() -> Any:
    mod = sys.modules.get(_FSDP_MODULE)
    return None if mod is None else mod.FullyShardedDataParallel


def describe_units(model: torch.nn.Module) -> list[FlatUnit]:
    """The FlatParameter layout of every FSDP1 unit in ``model``, in module order (the
    same on every rank). Raises on internals it does not recognise, on FSDP1 + tensor
    parallel extensions, and when its layout disagrees with FSDP's shard metadata."""
    fsdp_cls = _fsdp_class()
    units: list[FlatUnit] = []
    if fsdp_cls is None:
        return units
    for unit_name, module in model.named_modules():
        if not isinstance(module, fsdp_cls) or getattr(module, "_handle", None) is None:
            continue
        handle = module._handle
        _require(handle, _HANDLE_ATTRS, "FlatParamHandle")
        flat = handle.flat_param
        _require(flat, _FLAT_ATTRS, "FlatParameter")
        strategy = getattr(handle._sharding_strategy, "name", str(handle._sharding_strategy))
        prefix = f"{unit_name}." if unit_name else ""
        names = [clean_name(prefix + fqn) for fqn in flat._fqns]
        if any(ext is not None for ext in flat._param_extensions):
            raise ValueError(
                f"dist_gc: FSDP1 unit {unit_name or '<root>'!r} flattens tensor-parallel DTensor shards "
                f"(FSDP extensions on {', '.join(n for n, e in zip(names, flat._param_extensions) if e is not None)}); "
                "their FlatParameter shapes are local TP shards, not global tensors. Use FSDP2 (fully_shard) with TP"
            )
        sharded = bool(handle.uses_sharded_strategy)
        W, rank = (int(handle.world_size), int(handle.rank)) if sharded else (1, 0)
        S = int(flat._sharded_size.numel())
        total = int(flat._unpadded_unsharded_size.numel())
        # FSDP cuts the flat parameter with torch.chunk(W) and pads every shard to the
        # first one's size: S = ceil(total / W), rank r holds [r*S, (r+1)*S).
        if (S if sharded else total) != -(-total // W):
            raise RuntimeError(
                f"dist_gc: FSDP1 unit {unit_name or '<root>'!r}: shard size {S} for {W} rank(s) is not "
                f"ceil({total} / {W}); unrecognised FlatParameter layout"
            )
        # Start of each original tensor in the flat parameter (padding entries skipped).
        starts, pos = [], 0
        for numel, is_pad in zip(flat._numels_with_padding, flat._is_padding_mask):
            if not is_pad:
                starts.append(pos)
            pos += numel
        if len(starts) != flat._num_params or pos != total:
            raise RuntimeError(f"dist_gc: FSDP1 unit {unit_name or '<root>'!r}: FlatParameter numels do not add up ({pos} vs {total})")
        orig = list(flat._params) if handle._use_orig_params else [None] * len(starts)
        tensors = []
        for i, (name, shape, numel, start) in enumerate(zip(names, flat._shapes, flat._numels, starts)):
            shape = tuple(int(s) for s in shape)
            chunk = S if sharded else total
            ranges = equal_partition_ranges(start, numel, chunk, W)
            s, e = ranges[rank]
            offset = max(start - rank * chunk, 0) if e > s else 0
            _cross_check(unit_name, name, flat._shard_param_infos[i], s, e, offset)
            tensors.append(FlatTensor(name, shape, start, ranges, offset, orig[i]))
        units.append(FlatUnit(unit_name, module, handle, flat, tuple(tensors), handle.process_group if sharded else None, rank, strategy))
    return units


def _cross_check(unit: str, name: str, info: Any, start: int, end: int, offset: int) -> None:
    """Our ranges come from global facts; FSDP's ``_shard_param_infos`` is its own view of
    this rank's piece. They must agree, or we refuse rather than centralize wrongly."""
    ok = bool(info.in_shard) == (end > start)
    if ok and end > start:
        ok = (info.offset_in_shard, info.intra_param_start_idx, info.intra_param_end_idx) == (offset, start, end - 1)
    if not ok:
        raise RuntimeError(
            f"dist_gc: FSDP1 unit {unit or '<root>'!r}, parameter {name!r}: derived shard piece "
            f"[{start}, {end}) at offset {offset} disagrees with FSDP's shard metadata {info}"
        )


def is_fsdp1_orig_param(p: torch.Tensor) -> bool:
    """A parameter FSDP1 has flattened (a FlatParameter, or an original parameter
    re-registered as a view of one with ``use_orig_params=True``)."""
    return bool(getattr(p, "_fsdp_flattened", False))


def tensor_layout(unit: FlatUnit, t: FlatTensor, source: int, offset: int) -> TensorLayout:
    """The layout of original tensor ``t`` of ``unit`` whose rank-local piece starts at
    ``sources[source][offset]`` (NO_SHARD: the whole tensor, flat at ``offset``)."""
    if unit.group is None:
        return TensorLayout(t.name, t.shape, Whole(source, offset))
    return TensorLayout(t.name, t.shape, FlatShard(source, offset, t.ranges, unit.rank, unit.group))


def describe(optimizer: Any, model: Any) -> Description | None:
    if not isinstance(optimizer, torch.optim.Optimizer) or _fsdp_class() is None:
        return None
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    units = describe_units(model) if model is not None else []
    if not units:
        flattened = [p for p in opt_params if is_fsdp1_orig_param(p)]
        if flattened:
            raise ValueError(
                f"dist_gc.attach: the optimizer holds {len(flattened)} FSDP1-flattened parameter(s) "
                f"(e.g. shape {tuple(flattened[0].shape)}) but no FSDP1 unit was found; pass "
                "model=<the FullyShardedDataParallel-wrapped model> so dist_gc can read their layout"
            )
        return None
    warn_if_untested("torch", torch.__version__, TESTED_TORCH,
                     "the FSDP1 adapter reads FlatParameter internals; layouts are cross-checked against FSDP's own "
                     "shard metadata and fail loudly on a mismatch")
    in_opt = {id(p) for p in opt_params}
    use_orig = {bool(u.handle._use_orig_params) for u in units}
    if len(use_orig) != 1:
        raise ValueError("dist_gc: FSDP1 units mix use_orig_params=True and False; use one setting for the whole model")
    use_orig_params = use_orig.pop()

    layouts: list[TensorLayout] = []
    sources: list = []
    source_of: dict[int, int] = {}
    claimed: set[int] = set()
    for u in units:
        for t in u.tensors:
            key = id(t.param) if use_orig_params else id(u.flat_param)
            if key not in in_opt:
                continue
            claimed.add(key)
            if use_orig_params:
                # The optimizer steps the original parameter: its .grad is exactly this
                # rank's piece (1-D when sharded, full shape for NO_SHARD), starting at 0.
                layouts.append(tensor_layout(u, t, len(sources), 0))
                s, e = t.ranges[u.rank] if u.group is not None else (0, 1)
                # A rank that holds none of the tensor has no piece to read: its .grad is
                # size 0, or None under CPUOffload(offload_params=True) (FSDP then never
                # sets it). Its plan has no regions and still joins the all-reduce.
                sources.append((lambda p=t.param: p.grad) if e > s else (lambda: None))
            else:
                if id(u.flat_param) not in source_of:
                    source_of[id(u.flat_param)] = len(sources)
                    sources.append(lambda f=u.flat_param: f.grad)
                layouts.append(tensor_layout(u, t, source_of[id(u.flat_param)], t.offset_in_shard))
    # Parameters FSDP does not manage (ignored modules): whole tensors on every rank.
    others = [(n, p) for n, p in named_optimizer_params(optimizer, param_names(model)) if id(p) not in claimed]
    for n, p in others:
        if is_fsdp1_orig_param(p):
            raise ValueError(f"dist_gc.attach: FSDP1-flattened parameter {n!r} belongs to no FSDP1 unit of the model passed as model=")
    whole, whole_sources = describe_params(others, first_source=len(sources))
    strategies = "/".join(sorted({u.strategy for u in units}))
    return Description(
        optimizer=optimizer,
        layouts=layouts + whole,
        sources=sources + whole_sources,
        label=f"FSDP1 {strategies} (use_orig_params={use_orig_params}, {len(units)} unit(s))",
        # Shard groups, and HSDP's replicate groups: their ranks must run the same GC.
        peer_groups=tuple(dict.fromkeys(g for u in units for g in (u.module.process_group, getattr(u.module, "_inter_node_pg", None)) if g is not None)),
        roles=resolve_roles(model),
    )
