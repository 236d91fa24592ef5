"""Layouts: where each tensor's gradient lives on this rank, and the plans the engine runs.

An engine adapter describes every parameter the optimizer updates as a
:class:`TensorLayout` — the user's name, the GLOBAL shape, and where this rank holds it:

* :class:`Whole` — the rank holds the whole gradient: single process, DDP, replicas,
  FSDP ``NO_SHARD``, or a tensor stored whole inside an unsharded flat buffer;
* :class:`FlatShard` — a flat 1-D buffer holds elements ``ranges[rank]`` of the tensor's
  flattening, the other ranks of ``group`` hold the other ranges (ZeRO-1/2/3, FSDP1);
* :class:`Block` — an N-D block of the tensor (a DTensor's local shard); each
  :class:`ShardAxis` names the process group of a mesh axis and the tensor dim it cuts
  (FSDP2, HSDP, tensor parallelism);
* :class:`Split` — the tensor is cut along one dim into contiguous pieces over a group
  (DeepSpeed AutoTP's tensor-parallel shards, possibly uneven), and this rank's piece is
  itself held as a :class:`Whole` or :class:`FlatShard` describes (a ZeRO partition of
  the local TP shard): a flat data-parallel partition composed with a TP block.

From a layout and the tensor's :class:`~dist_gc.core.centralize.Geometry`,
:func:`plan_tensor` builds a :class:`TensorPlan`:

* ``regions`` — views of local gradient buffers, each paired with a slice of the
  tensor's fp32 ``sums`` vector it contributes to (no per-element index tensors: every
  region is a reshaped slice, so its partial sums are one ``sum`` call);
* ``reductions`` — slices of ``sums`` whose elements other ranks also hold, with the
  process group over which they are summed.

Everything here is derived from global facts only (shapes, ranges of every rank), so
every rank derives the same message sizes: a rank whose shard is empty still joins
the collective. Nothing here imports an engine or communicates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence, Union

from ..core.centralize import Geometry

if TYPE_CHECKING:
    from ..core.select import Target

__all__ = [
    "Whole",
    "FlatShard",
    "ShardAxis",
    "Block",
    "Split",
    "Placement",
    "TensorLayout",
    "Region",
    "Reduction",
    "TensorPlan",
    "plan_tensor",
    "plan_whole",
    "plan_flat_shard",
    "plan_block",
    "plan_split",
    "split_local_shape",
    "flat_regions",
    "split_channels",
    "local_numel",
]


# --------------------------------------------------------------------------- layouts
@dataclass(frozen=True, slots=True)
class Whole:
    """This rank holds the whole gradient in ``sources[source]``.

    ``offset=None``: the source IS the gradient (any shape). An integer: the source is
    a flat buffer and the gradient's row-major elements sit at ``[offset, offset+numel)``
    (DeepSpeed's fused fp16 master, FSDP1's unsharded flat gradient in a comm hook)."""

    source: int
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class FlatShard:
    """The gradient's flattening is cut into ``ranges`` — one ``[start, end)`` per rank
    of ``group``, in group-rank order, possibly empty ``(0, 0)`` — and this rank's piece
    sits at ``sources[source][offset : offset + end - start]``."""

    source: int
    offset: int
    ranges: tuple[tuple[int, int], ...]
    rank: int
    """This rank's index in ``group``."""
    group: Any


@dataclass(frozen=True, slots=True)
class ShardAxis:
    """A mesh axis that shards a tensor: its process group and the tensor dim it cuts."""

    group: Any
    dim: int
    size: int = 1
    """Ranks on the axis."""
    index: int = 0
    """This rank's coordinate on the axis."""
    strided: bool = False
    """``_StridedShard`` (FSDP2 over TP ``ColwiseParallel``): the dim is cut into strided
    pieces rather than ``torch.chunk``'s contiguous ones."""


@dataclass(frozen=True, slots=True)
class Block:
    """This rank holds an N-D block of the gradient, of shape ``local_shape``, as
    ``sources[source]`` (a DTensor's local tensor). ``shard_axes`` lists every mesh axis
    that shards the tensor, in mesh order (``Replicate`` axes are left out: replicas hold
    identical, fully reduced gradients)."""

    source: int
    local_shape: tuple[int, ...]
    shard_axes: tuple[ShardAxis, ...]


@dataclass(frozen=True, slots=True)
class Split:
    """The tensor is cut along ``dim`` into contiguous pieces of ``sizes`` elements (one
    per rank of ``group``, in group-rank order; uneven allowed, as ``torch.split``), and
    this rank holds piece ``index`` — global indices ``[sum(sizes[:index]), ... +
    sizes[index])`` of ``dim`` — as a tensor of its own, the *local piece*, whose
    gradient lives as ``inner`` says (``inner``'s ranges and offsets are in the local
    piece's flattening).

    DeepSpeed AutoTP: ``group`` is the tensor-parallel group; a column-parallel
    ``LinearLayer`` weight ``(out, in)`` is split on dim 0 (whole output channels per
    rank), a row-parallel ``LinearAllreduce`` weight on dim 1 (every output channel cut
    across the group); ZeRO-1/2/3 then partition the local pieces over the data-parallel
    group (``inner`` a :class:`FlatShard`), ZeRO-0 keeps them whole (:class:`Whole`).

    Planning (see :func:`plan_split`): a split along a kept dim (the output dim in
    channel mode, a batch dim) gives each rank whole channels — no communication over
    ``group``; a split along an averaged dim makes every mean span the group: the local
    channel sums are completed over ``inner``'s group and then over ``group``."""

    group: Any
    dim: int
    sizes: tuple[int, ...]
    index: int
    """This rank's index in ``group``."""
    inner: Union[Whole, FlatShard]


Placement = Union[Whole, FlatShard, Block, Split]


@dataclass(frozen=True, slots=True)
class TensorLayout:
    """One parameter the optimizer updates, as an adapter describes it."""

    name: str
    """The user's own parameter name (wrapper prefixes removed; see ``clean_name``)."""
    shape: tuple[int, ...]
    """GLOBAL shape (unsharded, unflattened)."""
    where: Placement
    phase: int = 0
    """Which ``step`` call of the optimizer updates it, when the engine steps the
    optimizer once per part of the parameters (DeepSpeed: one param group / sub-group
    per call); 0 otherwise."""
    stat_groups: tuple = ()
    """Further groups whose ranks hold OTHER tensors than this rank (beyond the
    placement's own partition group), over which model-wide statistics are summed:
    MoE experts over the expert-parallel group (each rank holds different experts),
    pipeline stages over the pipe group (each stage its own layers). GC itself never
    communicates over them."""
    replica: bool = False
    """This rank's copy duplicates one that another rank of a stat group counts (the
    later pipeline stages' copy of a tied weight): it is centralized like any other,
    but left out of model-wide statistics so the tensor counts once."""


def split_local_shape(shape: Sequence[int], split: Split) -> tuple[int, ...]:
    """Shape of the local piece of a tensor of global ``shape`` under ``split``."""
    out = list(shape)
    out[split.dim] = split.sizes[split.index]
    return tuple(out)


def local_numel(layout: TensorLayout) -> int:
    """Elements of the tensor this rank holds."""
    where = layout.where
    if isinstance(where, Split):
        return local_numel(TensorLayout(layout.name, split_local_shape(layout.shape, where), where.inner))
    if isinstance(where, FlatShard):
        start, end = where.ranges[where.rank]
        return end - start
    if isinstance(where, Block):
        n = 1
        for s in where.local_shape:
            n *= s
        return n
    n = 1
    for s in layout.shape:
        n *= s
    return n


# --------------------------------------------------------------------------- plans
@dataclass(frozen=True, slots=True)
class Region:
    """A view of one local gradient and the slice of ``sums`` its channels map to.

    The view is ``source.view(-1)[start:stop].view(shape)``, or the source tensor
    itself when ``shape`` is ``None``. ``sums[sum_start:sum_stop]`` is viewed as
    ``sum_shape``, broadcastable against the view (size 1 on averaged dims)."""

    source: int
    start: int
    stop: int
    shape: tuple[int, ...] | None
    sum_start: int
    sum_stop: int
    sum_shape: tuple[int, ...]
    source_shape: tuple[int, ...] | None = None
    """With ``shape`` ``None``: the source's own shape (the whole tensor for
    :func:`plan_whole`, the local block for :func:`plan_block`), which the engine's
    kernels and batches need (the view itself may have any strides)."""


@dataclass(frozen=True, slots=True)
class Reduction:
    """``sums[sum_start:sum_stop]`` is completed by an all-reduce (sum) over ``group``."""

    group: Any
    sum_start: int
    sum_stop: int


@dataclass(frozen=True, slots=True)
class TensorPlan:
    """Everything the engine needs for one GC target on this rank."""

    name: str
    geometry: Geometry
    num_sums: int
    regions: tuple[Region, ...]
    reductions: tuple[Reduction, ...] = ()
    shard_groups: tuple[Any, ...] = ()
    """Groups whose ranks hold disjoint pieces of this tensor (global statistics are
    summed over them); empty when this rank holds the whole tensor."""
    count: int | None = None
    """Elements each mean averages, when it is not ``geometry.count`` (a :class:`Split`
    along an averaged dim: ``geometry`` is the local piece's, the means the global
    tensor's)."""
    counted: bool = True
    """Whether this rank's copy enters model-wide statistics (see ``TensorLayout.replica``)."""

    @property
    def elements_per_mean(self) -> int:
        return self.geometry.count if self.count is None else self.count


def plan_tensor(layout: TensorLayout, target: "Target") -> TensorPlan:
    """The plan of one GC target (see :func:`~dist_gc.core.select.resolve_targets`)
    from its layout (statistics groups and replicas applied)."""
    plan = _plan_placement(layout, target)
    if layout.stat_groups or layout.replica:
        plan = replace(plan, shard_groups=tuple(dict.fromkeys((*plan.shard_groups, *layout.stat_groups))),
                       counted=not layout.replica)
    return plan


def _plan_placement(layout: TensorLayout, target: "Target") -> TensorPlan:
    where, geo = layout.where, target.geometry
    if isinstance(where, Split):
        return plan_split(layout.name, target, shape=layout.shape, split=where)
    if isinstance(where, Whole):
        return plan_whole(layout.name, geo, layout.shape, target.output_dim, source=where.source, offset=where.offset)
    if isinstance(where, FlatShard):
        return plan_flat_shard(layout.name, geo, ranges=where.ranges, rank=where.rank, group=where.group,
                               source=where.source, offset=where.offset)
    if isinstance(where, Block):
        return plan_block(layout.name, geo, shape=layout.shape, local_shape=where.local_shape, kept_dims=target.kept_dims,
                          grouped_dim=target.batch_dims if target.groups > 1 else None, shard_axes=where.shard_axes,
                          source=where.source)
    raise TypeError(f"dist_gc: {layout.name!r}: unknown placement {where!r}")


def plan_whole(name: str, geo: Geometry, shape: Sequence[int], output_dim: int | None, *, source: int, offset: int | None = None) -> TensorPlan:
    """A tensor held whole by this rank: no communication. With ``offset`` the tensor
    sits flat inside a larger buffer and is viewed through :func:`flat_regions`; a
    blocked geometry (``groups > 1``) views it as ``(groups, outer, channels, inner)``."""
    if offset is not None:
        return TensorPlan(name, geo, geo.num_channels, tuple(flat_regions(geo, 0, geo.numel, source, offset)))
    if geo.groups > 1:
        region = Region(source, 0, geo.numel, (geo.groups, geo.outer, geo.channels, geo.inner), 0, geo.num_channels,
                        (geo.groups, 1, geo.channels, 1))
        return TensorPlan(name, geo, geo.num_channels, (region,))
    sum_shape = [1] * len(shape)
    if output_dim is not None:
        sum_shape[output_dim] = geo.channels
    region = Region(source, 0, 0, None, 0, geo.channels, tuple(sum_shape), tuple(shape))
    return TensorPlan(name, geo, geo.channels, (region,))


def flat_regions(geo: Geometry, start: int, end: int, source: int, offset: int) -> list[Region]:
    """Regions for elements ``[start, end)`` of a tensor's flattening, stored at
    ``source[offset : offset + end - start]``. ``sums`` is indexed by global channel.

    Within one group (the whole tensor unless the geometry is blocked) a range splits
    into: a head inside one period (partial channel block, whole channel blocks
    ``(k, inner)``, partial block), whole periods ``(m, channels, inner)``, and a tail
    inside one period. For output dim 0 the period is the whole tensor, so this is just
    partial row / whole rows / partial row. Runs of whole groups are one region
    ``(m, outer, channels, inner)``."""
    regions: list[Region] = []
    size, C = geo.group_numel, geo.channels
    pos = start
    while pos < end:
        g = pos // size
        if geo.groups > 1 and pos % size == 0 and end - pos >= size:
            m = (end - pos) // size
            regions.append(Region(source, offset + pos - start, offset + pos + m * size - start, (m, geo.outer, C, geo.inner),
                                  g * C, (g + m) * C, (m, 1, C, 1)))
            pos += m * size
            continue
        stop = min(end, (g + 1) * size)
        regions += _group_regions(geo, pos - g * size, stop - g * size, source, offset + pos - start, g * C)
        pos = stop
    return regions


def _group_regions(geo: Geometry, start: int, end: int, source: int, offset: int, c_base: int) -> list[Region]:
    """:func:`flat_regions` within one group: ``[start, end)`` of the group's elements,
    stored from ``source[offset]``; the group's channels start at ``c_base`` of ``sums``."""
    regions: list[Region] = []
    period, inner, C = geo.period, geo.inner, geo.channels

    def add(lo: int, hi: int, shape: tuple[int, ...], c0: int, c1: int, sum_shape: tuple[int, ...]) -> None:
        regions.append(Region(source, offset + lo - start, offset + hi - start, shape, c_base + c0, c_base + c1, sum_shape))

    def within_period(lo: int, hi: int) -> None:
        base = lo - lo % period
        pos, stop = lo - base, hi - base
        if pos % inner:
            nxt = min(stop, pos - pos % inner + inner)
            add(base + pos, base + nxt, (1, nxt - pos), pos // inner, pos // inner + 1, (1, 1))
            pos = nxt
        k = (stop - pos) // inner
        if k:
            add(base + pos, base + pos + k * inner, (k, inner), pos // inner, pos // inner + k, (k, 1))
            pos += k * inner
        if pos < stop:
            add(base + pos, base + stop, (1, stop - pos), pos // inner, pos // inner + 1, (1, 1))

    pos = start
    if pos % period:
        nxt = min(end, pos - pos % period + period)
        within_period(pos, nxt)
        pos = nxt
    m = (end - pos) // period
    if m:
        add(pos, pos + m * period, (m, C, inner), 0, C, (1, C, 1))
        pos += m * period
    if pos < end:
        within_period(pos, end)
    return regions


def _touched(geo: Geometry, start: int, end: int) -> list[tuple[int, int]]:
    """Global channel intervals ``[lo, hi)`` that elements ``[start, end)`` touch
    (disjoint)."""
    out: list[tuple[int, int]] = []
    size, C = geo.group_numel, geo.channels
    pos = start
    while pos < end:
        g = pos // size
        if pos % size == 0 and end - pos >= size:
            m = (end - pos) // size
            out.append((g * C, (g + m) * C))
            pos += m * size
            continue
        stop = min(end, (g + 1) * size)
        out += [(g * C + lo, g * C + hi) for lo, hi in _touched_in_group(geo, pos - g * size, stop - g * size)]
        pos = stop
    return out


def _touched_in_group(geo: Geometry, start: int, end: int) -> list[tuple[int, int]]:
    """Channel intervals of one group that its elements ``[start, end)`` touch."""
    if end <= start:
        return []
    period, inner, C = geo.period, geo.inner, geo.channels
    if end - start >= period:
        return [(0, C)]
    c0, c1 = (start % period) // inner, ((end - 1) % period) // inner
    if start // period == (end - 1) // period:
        return [(c0, c1 + 1)]
    return [(0, C)] if c1 + 1 >= c0 else [(c0, C), (0, c1 + 1)]


def split_channels(geo: Geometry, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Channel intervals held (in part) by two or more of ``ranges`` — the only sums
    that need communicating. Depends only on global facts, so all ranks agree."""
    events: list[tuple[int, int]] = []
    for s, e in ranges:
        for lo, hi in _touched(geo, s, e):
            events += [(lo, 1), (hi, -1)]
    events.sort()
    out: list[tuple[int, int]] = []
    depth, open_at = 0, None
    for pos, delta in events:
        depth += delta
        if depth >= 2 and open_at is None:
            open_at = pos
        elif depth < 2 and open_at is not None:
            if pos > open_at:
                if out and out[-1][1] == open_at:
                    out[-1] = (out[-1][0], pos)
                else:
                    out.append((open_at, pos))
            open_at = None
    return out


def plan_flat_shard(
    name: str,
    geo: Geometry,
    *,
    ranges: Sequence[tuple[int, int]],
    rank: int,
    group: Any,
    source: int,
    offset: int,
) -> TensorPlan:
    """A tensor whose flattening is split into ``ranges`` (one ``[start, end)`` per rank
    of ``group``, possibly empty); this rank's piece sits at ``source[offset:]``."""
    start, end = ranges[rank]
    regions = flat_regions(geo, start, end, source, offset) if end > start else []
    reductions = tuple(Reduction(group, lo, hi) for lo, hi in split_channels(geo, ranges))
    # The group partitions the buffer: for global statistics every tensor's pieces are
    # summed over it, even one that lies wholly on another rank. A single range means
    # this rank holds the whole tensor: nothing to sum over.
    shard_groups = (group,) if len(ranges) > 1 else ()
    return TensorPlan(name, geo, geo.num_channels, tuple(regions), reductions, shard_groups)


def plan_block(
    name: str,
    geo: Geometry,
    *,
    shape: Sequence[int],
    local_shape: Sequence[int],
    kept_dims: Sequence[int],
    shard_axes: Sequence[ShardAxis],
    source: int,
    grouped_dim: int | None = None,
) -> TensorPlan:
    """A tensor of which this rank holds an N-D block (a DTensor's local shard).

    ``kept_dims``: the tensor dims that identify a channel — the output dim in
    ``mode="channel"`` plus any batch dims; the other dims are averaged. The whole local
    tensor is one region; ``sums`` is indexed by LOCAL channel. Its partial sums are
    completed over exactly the axes that shard an averaged dim — none when only kept
    dims are sharded (FSDP2's ``Shard(0)`` in channel mode: rows are whole on one rank,
    zero communication).

    Why local channel indexing is exact: the block is a product of per-dim index sets
    (``Shard`` and ``_StridedShard`` both cut one dim), and the sets along the kept
    dims depend only on the mesh coordinates of axes that shard kept dims. The ranks of
    a group that shards an averaged dim differ only in that axis's coordinate, so they
    hold the same channels in the same local order: summing ``sums`` elementwise over
    the group adds matching channels.

    ``grouped_dim`` (a grouped ``ConvTranspose``, see :class:`Geometry`): that dim is
    ``(groups, d / groups)``, a kept and an averaged factor in one dim. Unsharded, the
    local block is viewed with the two factors apart; cut by ONE ``Shard`` axis alone
    (FSDP2's default ``Shard(0)``), the block is a contiguous range of the flattening on
    every rank of that axis and is planned as a :class:`FlatShard`. Anything else raises
    ``ValueError`` naming the parameter."""
    ndim = len(local_shape)
    kept = set(kept_dims)
    if grouped_dim is not None:
        cutting = [a for a in shard_axes if a.dim == grouped_dim]
        if cutting:
            if len(shard_axes) != 1 or cutting[0].strided:
                raise ValueError(
                    f"dist_gc: {name!r}: a grouped ConvTranspose weight ({geo.groups} groups in dim {grouped_dim}) sharded by "
                    f"{list(shard_axes)}; dist_gc handles it whole or cut on dim {grouped_dim} by one Shard axis alone "
                    "(exclude it, or shard it that way)"
                )
            return _plan_dim0_shard(name, geo, shape, local_shape, cutting[0], source)
        g = geo.groups
        view = (*local_shape[:grouped_dim], g, local_shape[grouped_dim] // g, *local_shape[grouped_dim + 1 :])
        sum_shape = [1] * len(view)
        sum_shape[grouped_dim] = g
        for d in kept:
            sum_shape[d + 1 if d > grouped_dim else d] = int(local_shape[d])
        num_sums = math.prod(sum_shape)
        region = Region(source, 0, math.prod(local_shape), tuple(view), 0, num_sums, tuple(sum_shape))
    else:
        sum_shape = [int(local_shape[d]) if d in kept else 1 for d in range(ndim)]
        num_sums = math.prod(sum_shape)
        region = Region(source, 0, 0, None, 0, num_sums, tuple(sum_shape), tuple(int(d) for d in local_shape))
    reductions = tuple(Reduction(a.group, 0, num_sums) for a in shard_axes if a.dim not in kept)
    shard_groups = tuple(dict.fromkeys(a.group for a in shard_axes))
    return TensorPlan(name, geo, num_sums, (region,), reductions, shard_groups)


def _plan_dim0_shard(name: str, geo: Geometry, shape: Sequence[int], local_shape: Sequence[int], axis: ShardAxis, source: int) -> TensorPlan:
    """A tensor cut on dim 0 by one ``Shard`` axis: ``torch.chunk`` pieces, i.e. rank ``r``
    holds rows ``[r * c, (r + 1) * c)`` of ``c = ceil(d_0 / size)`` — a flat range."""
    rows, row = int(shape[0]), math.prod(shape[1:])
    chunk = -(-rows // axis.size)
    ranges = tuple((min(r * chunk, rows) * row, min((r + 1) * chunk, rows) * row) for r in range(axis.size))
    start, end = ranges[axis.index]
    if end - start != math.prod(local_shape):
        raise RuntimeError(f"dist_gc: {name!r}: local block {tuple(local_shape)} is not rows [{start // row}, {end // row}) "
                           f"of {tuple(shape)} as torch.chunk over {axis.size} ranks gives; unrecognised DTensor sharding")
    return plan_flat_shard(name, geo, ranges=ranges, rank=axis.index, group=axis.group, source=source, offset=0)


def _local_geometry(target: "Target", local_shape: Sequence[int], name: str) -> Geometry:
    """The geometry of a local piece, with the target's own selection (mode, output dim,
    batch dims, ConvTranspose groups)."""
    from ..core.centralize import geometry_of

    mode = "tensor" if target.output_dim is None else "channel"
    return geometry_of(local_shape, mode, target.output_dim or 0, batch_dims=target.batch_dims, groups=target.groups, name=name)


def plan_split(name: str, target: "Target", *, shape: Sequence[int], split: Split) -> TensorPlan:
    """A tensor cut along ``split.dim`` over ``split.group``, this rank's piece held as
    ``split.inner`` says (see :class:`Split`).

    The local piece is planned like a tensor of its own (``inner``: whole, or a flat
    partition over the data-parallel group), with the piece's geometry, then:

    * split along a kept dim (output dim in channel mode, a batch dim): the piece holds
      whole channels, so its means are final within ``inner``'s group — nothing over
      ``split.group``. ``sums`` is indexed by the piece's own channels: ``inner``'s
      group shares ``split.index``, hence the same piece and the same local order.
    * split along an averaged dim: the piece holds every channel (the kept dims are
      whole), so local channel ``c`` IS global channel ``c``, and each mean averages
      ``target.geometry.count`` elements spread over the whole group. Every channel's
      sum is all-reduced over ``inner``'s group and then over ``split.group`` (a sum
      over both groups in either order: the two collectives commute).

    Why every channel over ``inner``'s group, not only the channels a flat boundary
    cuts (as :func:`plan_flat_shard` does): the TP peers' pieces are flattened and
    partitioned separately (uneven ``sizes`` give different shapes), so a channel held
    whole by data-parallel rank ``j`` on one TP rank may sit on rank ``j' != j`` on
    another; only sums completed over the data-parallel group are aligned across the
    TP group. Cost: 4 B x channels per such tensor and group, still independent of the
    tensor's size.

    Raises ``ValueError`` naming the parameter when the pieces do not add up to the
    global dim, or when a grouped ``ConvTranspose`` weight is split on its grouped dim
    (a piece would cut through channel blocks)."""
    geo = target.geometry
    if not 0 <= split.dim < len(shape) or sum(split.sizes) != shape[split.dim] or not 0 <= split.index < len(split.sizes):
        raise ValueError(f"dist_gc: {name!r}: split of dim {split.dim} into {list(split.sizes)} (piece {split.index}) does not "
                         f"fit its global shape {tuple(shape)}")
    if target.groups > 1 and split.dim == target.batch_dims:
        raise ValueError(f"dist_gc: {name!r}: a grouped ConvTranspose weight ({target.groups} groups in dim {split.dim}) split "
                         "on that dim across ranks cannot be centralized exactly by dist_gc; exclude it")
    local_shape = split_local_shape(shape, split)
    local = _local_geometry(target, local_shape, name)
    inner = split.inner
    if isinstance(inner, Whole):
        base = plan_whole(name, local, local_shape, target.output_dim, source=inner.source, offset=inner.offset)
    elif isinstance(inner, FlatShard):
        if inner.ranges and max(e for _, e in inner.ranges) > math.prod(local_shape):
            raise ValueError(f"dist_gc: {name!r}: flat ranges {list(inner.ranges)} exceed its local piece {local_shape}")
        base = plan_flat_shard(name, local, ranges=inner.ranges, rank=inner.rank, group=inner.group,
                               source=inner.source, offset=inner.offset)
    else:
        raise TypeError(f"dist_gc: {name!r}: a Split holds its piece as Whole or FlatShard, not {inner!r}")
    groups = (*base.shard_groups, split.group) if len(split.sizes) > 1 else base.shard_groups
    if split.dim in target.kept_dims or len(split.sizes) == 1:
        return replace(base, shard_groups=groups)
    n = base.num_sums
    reductions = tuple(Reduction(g, 0, n) for g in base.shard_groups) + (Reduction(split.group, 0, n),)
    return replace(base, reductions=reductions, shard_groups=groups, count=geo.count)
