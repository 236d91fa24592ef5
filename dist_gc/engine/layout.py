"""Layouts: which elements of which global tensors a rank's local gradient holds.

An engine adapter describes every GC target as a :class:`TensorPlan`:

* ``regions`` — views of local gradient buffers, each paired with a slice of the
  tensor's fp32 ``sums`` vector it contributes to (no per-element index tensors:
  every region is a reshaped slice, so its partial sums are one ``sum`` call);
* ``reductions`` — slices of ``sums`` whose elements other ranks also hold, with the
  process group over which they are summed.

Adapters that see flat 1-D shards (ZeRO-1/2/3, FSDP1) call :func:`plan_flat_shard`
with the element range every rank of the group holds; it works out the regions and the
channels that straddle shard boundaries from global facts only, so every rank derives
the same message size (a rank whose shard is empty still joins the collective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..core.centralize import Geometry

__all__ = [
    "Region",
    "Reduction",
    "TensorPlan",
    "plan_full_tensor",
    "plan_flat_shard",
    "plan_block",
    "flat_regions",
    "split_channels",
]


@dataclass(frozen=True, slots=True)
class Region:
    """A view of one local gradient and the slice of ``sums`` its channels map to.

    The view is ``source[lo:hi].view(shape)`` of the flattened source, or the source
    tensor itself when ``shape`` is ``None``. ``bshape`` is the shape of
    ``sums[sum_lo:sum_hi]`` broadcast against the view (size 1 on averaged dims)."""

    source: int
    lo: int
    hi: int
    shape: tuple[int, ...] | None
    sum_lo: int
    sum_hi: int
    bshape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Reduction:
    """``sums[lo:hi]`` is completed by an all-reduce (sum) over ``group``."""

    group: Any
    lo: int
    hi: int


@dataclass(frozen=True, slots=True)
class TensorPlan:
    """Everything the engine needs for one GC target on this rank."""

    name: str
    geometry: Geometry
    num_sums: int
    regions: tuple[Region, ...]
    reductions: tuple[Reduction, ...] = ()
    partition_groups: tuple[Any, ...] = ()
    """Groups whose ranks hold disjoint pieces of this tensor (for global statistics);
    empty when the rank holds the whole tensor (single process, DDP, replicas)."""


def plan_full_tensor(name: str, geometry: Geometry, source: int, shape: Sequence[int], output_dim: int | None) -> TensorPlan:
    """A tensor held whole by this rank: one region, no communication."""
    bshape = [1] * len(shape)
    if output_dim is not None:
        bshape[output_dim] = geometry.channels
    region = Region(source, 0, 0, None, 0, geometry.channels, tuple(bshape))
    return TensorPlan(name, geometry, geometry.channels, (region,))


def flat_regions(geo: Geometry, start: int, end: int, source: int, offset: int) -> list[Region]:
    """Regions for elements ``[start, end)`` of a tensor's flattening, stored at
    ``source[offset : offset + end - start]``. ``sums`` is indexed by global channel.

    A range splits into: a head inside one period (partial channel block, whole channel
    blocks ``(k, inner)``, partial block), whole periods ``(m, channels, inner)``, and a
    tail inside one period. For output dim 0 the period is the whole tensor, so this is
    just partial row / whole rows / partial row."""
    regions: list[Region] = []
    period, inner, C = geo.period, geo.inner, geo.channels

    def add(lo: int, hi: int, shape: tuple[int, ...], c0: int, c1: int, bshape: tuple[int, ...]) -> None:
        regions.append(Region(source, offset + lo - start, offset + hi - start, shape, c0, c1, bshape))

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
    # this rank holds the whole tensor (e.g. FSDP NO_SHARD): nothing to sum over.
    partition = (group,) if len(ranges) > 1 else ()
    return TensorPlan(name, geo, geo.channels, tuple(regions), reductions, partition)


def plan_block(
    name: str,
    geo: Geometry,
    *,
    local_shape: Sequence[int],
    output_dim: int | None,
    shard_groups: Sequence[tuple[Any, int]],
    source: int,
) -> TensorPlan:
    """A tensor of which this rank holds an N-D block (a DTensor's local shard).

    ``shard_groups`` lists, for every mesh axis that shards the tensor, the axis's
    process group and the tensor dim it shards (Replicate axes are left out: replicas
    already hold identical, fully reduced gradients). ``output_dim`` is ``None`` in
    ``mode="tensor"``. The whole local tensor is one region; ``sums`` is indexed by
    LOCAL channel. Its partial sums are completed over exactly the groups that shard an
    averaged dim — none when only the output dim is sharded (FSDP2's ``Shard(0)`` in
    channel mode: rows are whole on one rank, zero communication).

    Why local channel indexing is exact: the block is a product of per-dim index sets
    (``Shard`` and ``_StridedShard`` both cut one dim), and the set along the output
    dim depends only on the mesh coordinates of axes that shard the output dim. The
    ranks of a group that shards an averaged dim differ only in that axis's
    coordinate, so they hold the same channels in the same local order: summing
    ``sums`` elementwise over the group adds matching channels."""
    ndim = len(local_shape)
    bshape = [1] * ndim
    if output_dim is not None:
        bshape[output_dim] = int(local_shape[output_dim])
    num_sums = bshape[output_dim] if output_dim is not None else 1
    region = Region(source, 0, 0, None, 0, num_sums, tuple(bshape))
    reductions = tuple(Reduction(g, 0, num_sums) for g, d in shard_groups if d != output_dim)
    partition = tuple(dict.fromkeys(g for g, _ in shard_groups))
    return TensorPlan(name, geo, num_sums, (region,), reductions, partition)
