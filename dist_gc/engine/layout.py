"""Layouts: where each tensor's gradient lives on this rank, and the plans the engine runs.

An engine adapter describes every parameter the optimizer updates as a
:class:`TensorLayout` — the user's name, the GLOBAL shape, and where this rank holds it:

* :class:`Whole` — the rank holds the whole gradient: single process, DDP, replicas,
  FSDP ``NO_SHARD``, or a tensor stored whole inside an unsharded flat buffer;
* :class:`FlatShard` — a flat 1-D buffer holds elements ``ranges[rank]`` of the tensor's
  flattening, the other ranks of ``group`` hold the other ranges (ZeRO-1/2/3, FSDP1);
* :class:`Block` — an N-D block of the tensor (a DTensor's local shard); each
  :class:`ShardAxis` names the process group of a mesh axis and the tensor dim it cuts
  (FSDP2, HSDP, tensor parallelism).

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

from dataclasses import dataclass
from typing import Any, Sequence, Union

from ..core.centralize import Geometry

__all__ = [
    "Whole",
    "FlatShard",
    "ShardAxis",
    "Block",
    "Placement",
    "TensorLayout",
    "Region",
    "Reduction",
    "TensorPlan",
    "plan_tensor",
    "plan_whole",
    "plan_flat_shard",
    "plan_block",
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


@dataclass(frozen=True, slots=True)
class Block:
    """This rank holds an N-D block of the gradient, of shape ``local_shape``, as
    ``sources[source]`` (a DTensor's local tensor). ``shard_axes`` lists every mesh axis
    that shards the tensor, in mesh order (``Replicate`` axes are left out: replicas hold
    identical, fully reduced gradients)."""

    source: int
    local_shape: tuple[int, ...]
    shard_axes: tuple[ShardAxis, ...]


Placement = Union[Whole, FlatShard, Block]


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


def local_numel(layout: TensorLayout) -> int:
    """Elements of the tensor this rank holds."""
    where = layout.where
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


def plan_tensor(layout: TensorLayout, geometry: Geometry, output_dim: int | None) -> TensorPlan:
    """The plan of one GC target from its layout. ``output_dim`` is the normalized
    output dim in ``mode="channel"``, ``None`` in ``mode="tensor"``."""
    where = layout.where
    if isinstance(where, Whole):
        return plan_whole(layout.name, geometry, layout.shape, output_dim, source=where.source, offset=where.offset)
    if isinstance(where, FlatShard):
        return plan_flat_shard(layout.name, geometry, ranges=where.ranges, rank=where.rank, group=where.group,
                               source=where.source, offset=where.offset)
    if isinstance(where, Block):
        return plan_block(layout.name, geometry, local_shape=where.local_shape, output_dim=output_dim,
                          shard_axes=where.shard_axes, source=where.source)
    raise TypeError(f"dist_gc: {layout.name!r}: unknown placement {where!r}")


def plan_whole(name: str, geo: Geometry, shape: Sequence[int], output_dim: int | None, *, source: int, offset: int | None = None) -> TensorPlan:
    """A tensor held whole by this rank: no communication. With ``offset`` the tensor
    sits flat inside a larger buffer and is viewed through :func:`flat_regions`."""
    if offset is not None:
        return TensorPlan(name, geo, geo.channels, tuple(flat_regions(geo, 0, geo.outer * geo.channels * geo.inner, source, offset)))
    sum_shape = [1] * len(shape)
    if output_dim is not None:
        sum_shape[output_dim] = geo.channels
    region = Region(source, 0, 0, None, 0, geo.channels, tuple(sum_shape))
    return TensorPlan(name, geo, geo.channels, (region,))


def flat_regions(geo: Geometry, start: int, end: int, source: int, offset: int) -> list[Region]:
    """Regions for elements ``[start, end)`` of a tensor's flattening, stored at
    ``source[offset : offset + end - start]``. ``sums`` is indexed by global channel.

    A range splits into: a head inside one period (partial channel block, whole channel
    blocks ``(k, inner)``, partial block), whole periods ``(m, channels, inner)``, and a
    tail inside one period. For output dim 0 the period is the whole tensor, so this is
    just partial row / whole rows / partial row."""
    regions: list[Region] = []
    period, inner, C = geo.period, geo.inner, geo.channels

    def add(lo: int, hi: int, shape: tuple[int, ...], c0: int, c1: int, sum_shape: tuple[int, ...]) -> None:
        regions.append(Region(source, offset + lo - start, offset + hi - start, shape, c0, c1, sum_shape))

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
    """Channel intervals ``[lo, hi)`` that elements ``[start, end)`` touch."""
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
    return TensorPlan(name, geo, geo.channels, tuple(regions), reductions, shard_groups)


def plan_block(
    name: str,
    geo: Geometry,
    *,
    local_shape: Sequence[int],
    output_dim: int | None,
    shard_axes: Sequence[ShardAxis],
    source: int,
) -> TensorPlan:
    """A tensor of which this rank holds an N-D block (a DTensor's local shard).

    ``output_dim`` is ``None`` in ``mode="tensor"``. The whole local tensor is one
    region; ``sums`` is indexed by LOCAL channel. Its partial sums are completed over
    exactly the axes that shard an averaged dim — none when only the output dim is
    sharded (FSDP2's ``Shard(0)`` in channel mode: rows are whole on one rank, zero
    communication).

    Why local channel indexing is exact: the block is a product of per-dim index sets
    (``Shard`` and ``_StridedShard`` both cut one dim), and the set along the output
    dim depends only on the mesh coordinates of axes that shard the output dim. The
    ranks of a group that shards an averaged dim differ only in that axis's
    coordinate, so they hold the same channels in the same local order: summing
    ``sums`` elementwise over the group adds matching channels."""
    ndim = len(local_shape)
    sum_shape = [1] * ndim
    if output_dim is not None:
        sum_shape[output_dim] = int(local_shape[output_dim])
    num_sums = sum_shape[output_dim] if output_dim is not None else 1
    region = Region(source, 0, 0, None, 0, num_sums, tuple(sum_shape))
    reductions = tuple(Reduction(a.group, 0, num_sums) for a in shard_axes if a.dim != output_dim)
    shard_groups = tuple(dict.fromkeys(a.group for a in shard_axes))
    return TensorPlan(name, geo, num_sums, (region,), reductions, shard_groups)
