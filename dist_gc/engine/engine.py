"""The shared engine: local fp32 partial sums -> one all-reduce per group -> subtract.

Bytes on the wire per optimizer step, per process group ``g``::

    4 * sum over targets t reduced over g of |split channels of t|

where a channel is "split" when two or more ranks of ``g`` hold some of its elements
(for output dim 0 that is at most one row per shard boundary; for a strided output
dim or ``mode="tensor"`` it is every channel of a tensor cut by a boundary). The size
is independent of tensor sizes and is reported in :attr:`GCStats.bytes_communicated`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from ..core.centralize import DEFAULT_TEMP_BYTES, add_sums_, centralize_in_one_pass_, is_small, scratch_for, subtract_means_
from .layout import Region, TensorPlan

__all__ = ["GCEngine", "GCStats"]

Source = Callable[[], "torch.Tensor | None"]


@dataclass(slots=True)
class GCStats:
    """What the last GC step did, on this rank (globally reduced where noted)."""

    step: int = 0
    centralized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """``{name: reason}`` for parameters GC leaves alone."""
    max_abs_mean_before: float = 0.0
    """Largest |channel mean| GC removed (this rank's channels; global with full_stats)."""
    max_abs_mean_after: float | None = None
    """Largest |channel mean| left after GC (must be ~0); with ``full_stats`` only."""
    grad_norm_before: float | None = None
    """L2 norm of the centralized targets' gradients before GC (global); ``full_stats`` only."""
    grad_norm_after: float | None = None
    bytes_communicated: int = 0
    """Payload bytes this rank all-reduced for GC in the step (statistics excluded)."""
    collectives: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Scalar statistics, ready for a tracker (``accelerator.log`` and friends)."""
        d = asdict(self)
        d["centralized"], d["skipped"] = len(self.centralized), len(self.skipped)
        return {k: v for k, v in d.items() if v is not None}


class _Bucket:
    """The slots of ``sums`` completed by one all-reduce over one group."""

    __slots__ = ("group", "slices", "size", "index")

    def __init__(self, group: Any) -> None:
        self.group, self.slices, self.size, self.index = group, [], 0, None


#: Batching of small final regions (see ``GCEngine._compile_batches``): tensors up to
#: this many elements, batches up to one CPU chunk.
BATCH_MAX_TENSOR_ELEMS = 2**16
BATCH_MAX_ELEMS = 2**20
_BATCH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class GCEngine:
    """Runs GC over a fixed set of :class:`TensorPlan` s.

    ``sources[i]()`` returns the current local gradient that regions with
    ``source == i`` view (or ``None`` when it has none this step: it then contributes
    zero partial sums and is not modified, but the collectives still run)."""

    def __init__(self, plans: Sequence[TensorPlan], sources: Sequence[Source], *, temp_limit_bytes: int | None = None, full_stats: bool = False) -> None:
        self.plans = list(plans)
        self.sources = list(sources)
        self.full_stats = full_stats
        self.temp_limit_bytes = temp_limit_bytes or DEFAULT_TEMP_BYTES
        self.offsets: list[int] = []
        counts: list[float] = []
        buckets: dict[Any, _Bucket] = {}
        total = 0
        for plan in self.plans:
            self.offsets.append(total)
            counts += [float(plan.geometry.count)] * plan.num_sums
            for red in plan.reductions:
                bucket = buckets.setdefault(red.group, _Bucket(red.group))
                bucket.slices.append((total + red.lo, total + red.hi))
                bucket.size += red.hi - red.lo
            total += plan.num_sums
        self.num_sums = total
        self.buckets = list(buckets.values())
        for b in self.buckets:
            b.index = torch.cat([torch.arange(lo, hi) for lo, hi in b.slices]) if b.slices else torch.empty(0, dtype=torch.long)
        self._counts = torch.tensor(counts, dtype=torch.float32)
        # Statistics slots: one per distinct tuple of partition groups, in plan order
        # (identical on every rank); slot 0 is "held whole by this rank".
        self._stat_keys: list[tuple[Any, ...]] = list(dict.fromkeys([(), *(p.partition_groups for p in self.plans)]))
        self._stat_slot = [self._stat_keys.index(p.partition_groups) for p in self.plans]
        self._items = self._compile()
        # Divisors applied after the collectives: final regions were divided already.
        deferred = list(counts)
        for _, lo, hi, *_, final in self._items:
            if final:
                deferred[lo:hi] = [1.0] * (hi - lo)
        self._deferred_counts = torch.tensor(deferred, dtype=torch.float32)
        self._counts_host = counts
        self._batches = self._compile_batches()
        self._device: torch.device | None = None
        self._buffers: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self.steps = 0

    def _compile(self) -> list[tuple[Region, int, int, tuple[int, ...], bool, int, bool]]:
        """Flatten plans into per-region items: (region, sums lo, sums hi, averaged
        dims, exclusive, stats slot, final). A region is *exclusive* when no other region
        of this rank writes its sums slice; its partial sums can then be written with
        one ``sum(out=...)`` call — per tensor, as few kernel calls as the per-tensor
        loop. It is *final* when, moreover, no collective completes that slice: its means
        are known as soon as it is summed, so it is centralized right away while it is
        still in cache (whole tensors, and whole rows inside a shard)."""
        items = []
        self._numels: list[int] = []
        for plan, base, slot in zip(self.plans, self.offsets, self._stat_slot):
            spans = [(r.sum_lo, r.sum_hi) for r in plan.regions]
            for r in plan.regions:
                g = plan.geometry
                self._numels.append(g.outer * g.channels * g.inner if r.shape is None else math.prod(r.shape))
                overlaps = sum(1 for lo, hi in spans if lo < r.sum_hi and r.sum_lo < hi)
                reduced = any(red.lo < r.sum_hi and r.sum_lo < red.hi for red in plan.reductions)
                dims = tuple(i for i, b in enumerate(r.bshape) if b == 1)
                items.append((r, base + r.sum_lo, base + r.sum_hi, dims, overlaps == 1 and bool(dims), slot, overlaps == 1 and not reduced))
        return items

    def _compile_batches(self) -> dict[int, tuple[list[int], int, int, int]]:
        """Runs of small final regions centralized together, keyed by the first item:
        (item indices, segment length, sums lo, sums hi).

        Why: per tensor the loop ``g.sub_(g.mean(...))`` costs two kernel calls (plus a
        cast each way for 16-bit gradients), which dominates for many small tensors —
        on CPU through per-call overhead, on GPUs through launches. A run of consecutive
        regions whose channels are contiguous segments of one common length, and whose
        sums slices are adjacent, is concatenated into one fp32 buffer (at most one CPU
        chunk), viewed as ``(segments, length)``, centralized with one mean and one
        subtraction, and copied back with one multi-tensor copy."""
        batches: dict[int, tuple[list[int], int, int, int]] = {}
        run: list[int] = []
        seglen = total = 0

        def close() -> None:
            if len(run) > 1:
                batches[run[0]] = (list(run), seglen, self._items[run[0]][1], self._items[run[-1]][2])
            run.clear()

        for k, (r, lo, hi, _, exclusive, _, final) in enumerate(self._items):
            numel = self._numels[k]
            segs = hi - lo
            ok = (final and exclusive and 0 < numel <= BATCH_MAX_TENSOR_ELEMS and segs > 0 and numel % segs == 0
                  and r.bshape[0] == segs and all(b == 1 for b in r.bshape[1:]))
            length = numel // segs if ok else 0
            if not ok or not run or length != seglen or lo != self._items[run[-1]][2] or total + numel > BATCH_MAX_ELEMS:
                close()
                total = 0
            if ok:
                run.append(k)
                seglen, total = length, total + numel
        close()
        return batches

    def _centralize_batch(self, grads: list[torch.Tensor | None], sums: torch.Tensor, batch: tuple[list[int], int, int, int]) -> bool:
        """Centralize one batch (see :meth:`_compile_batches`); False if this step's
        gradients do not allow it (a missing gradient, mixed or fp64 dtypes)."""
        idx, seglen, lo, hi = batch
        first = grads[self._items[idx[0]][0].source]
        if first is None or first.dtype not in _BATCH_DTYPES or (first.dtype == torch.float32 and first.device.type == "cpu"):
            return False  # (measured: on CPU fp32 tensors are as fast one by one: no casts to save)
        xs = [self._views(grads, self._items[k][0]) for k in idx]
        if any(x is None or x.dtype != first.dtype for x in xs):
            return False
        dtype = first.dtype
        flat = torch.cat([x.reshape(-1) for x in xs])
        rows = (flat if dtype == torch.float32 else flat.float()).view(-1, seglen)
        means = sums[lo:hi].view(-1, 1)
        torch.mean(rows, 1, keepdim=True, out=means)
        rows.sub_(means)
        pieces = torch.split(rows.view(-1), [self._numels[k] for k in idx])
        torch._foreach_copy_(xs, [p.view(x.shape) for p, x in zip(pieces, xs)])
        return True

    def _buffer(self, key: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A persistent fp32 sums buffer on the gradients' device, with one cached
        broadcast-shaped view per region (no per-step view construction)."""
        if key not in self._buffers:
            buf = torch.zeros(self.num_sums, dtype=torch.float32, device=self._device)
            views = [buf[lo:hi].view(r.bshape) for r, lo, hi, *_ in self._items]
            self._buffers[key] = (buf, views)
        return self._buffers[key]

    # ------------------------------------------------------------------ checks
    def verify_collectives(self) -> None:
        """Check, once, that every rank of every group derived the same message size.

        A disagreement would otherwise hang or corrupt silently; here it raises on
        every rank of the group (all see the same reduced values)."""
        for b in self.buckets:
            t = torch.tensor([b.size, -b.size], dtype=torch.int64, device=self._comm_device(b.group))
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=b.group)
            if t[0].item() != b.size or -t[1].item() != b.size:
                raise RuntimeError(
                    f"dist_gc: ranks disagree on the GC message size over a process group "
                    f"(this rank: {b.size}, max: {t[0].item()}, min: {-t[1].item()}); the layouts differ between ranks"
                )

    @staticmethod
    def _comm_device(group: Any) -> torch.device:
        backend = dist.get_backend(group)
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ step
    def _views(self, grads: list[torch.Tensor | None], region: Region) -> torch.Tensor | None:
        g = grads[region.source]
        if g is None:
            return None
        if region.shape is None:
            return g
        return g.view(-1)[region.lo : region.hi].view(region.shape)

    def _accumulate(self, grads: list[torch.Tensor | None], key: str, fuse: bool = False) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """Partial channel sums of every region into the ``key`` buffer. With
        ``full_stats`` also the squared norm per stats slot (see ``_stat_keys``). With
        ``fuse``, final regions are centralized right after their sums (their slice of
        the buffer then holds means)."""
        sums, views = self._buffer(key)
        sums.zero_()
        sq = torch.zeros(len(self._stat_keys), dtype=torch.float64) if self.full_stats else None
        scratch: torch.Tensor | None = None  # one fp32 chunk buffer, reused for the step
        one_pass = fuse and sq is None  # (full_stats needs each region's norm before GC)
        done_until = 0
        for k, ((r, lo, _, dims, exclusive, slot, final), view) in enumerate(zip(self._items, views)):
            if k < done_until:
                continue  # centralized with its batch
            if one_pass and k in self._batches and self._centralize_batch(grads, sums, self._batches[k]):
                done_until = k + len(self._batches[k][0])
                continue
            x = self._views(grads, r)
            if x is None:
                continue
            scratch = scratch_for(x, self.temp_limit_bytes, scratch)
            if one_pass and final and exclusive and centralize_in_one_pass_(x, view, dims, self.temp_limit_bytes, scratch):
                continue  # the slice holds this region's means already
            if exclusive and is_small(x, self.temp_limit_bytes):
                torch.sum(x, dims, keepdim=True, dtype=torch.float32, out=view)
            else:
                add_sums_(x, view, self.temp_limit_bytes, scratch)
            if sq is not None:
                sq[slot] += float(torch.linalg.vector_norm(x, dtype=torch.float32)) ** 2
            if fuse and final:
                view.div_(self._counts_host[lo])
                subtract_means_(x, view, self.temp_limit_bytes, scratch)
        return sums, views, sq

    def _reduce(self, sums: torch.Tensor, stats: GCStats) -> None:
        # One collective per group per step, in the same order on every rank (the
        # order plans list their groups, which adapters derive from global facts).
        for b in self.buckets:
            if b.size == 0:
                continue
            idx = b.index.to(sums.device, non_blocking=True)
            msg = sums.index_select(0, idx)
            dist.all_reduce(msg, group=b.group)
            sums.index_copy_(0, idx, msg)
            stats.bytes_communicated += msg.numel() * msg.element_size()
            stats.collectives += 1

    @torch.no_grad()
    def step(self, stats: GCStats | None = None) -> GCStats:
        """Centralize every planned gradient in place; returns the step's stats."""
        t0 = time.perf_counter()
        stats = stats or GCStats()
        grads = [src() for src in self.sources]
        device = next((g.device for g in grads if g is not None), self._device or torch.device("cpu"))
        if self._device != device:
            self._device, self._buffers = device, {}
            self._counts, self._deferred_counts = self._counts.to(device), self._deferred_counts.to(device)
        for g in grads:
            if g is not None and g.is_sparse:
                raise RuntimeError("dist_gc: sparse gradients are not supported (use a dense nn.Embedding)")
        sums, means_views, sq_before = self._accumulate(grads, "before", fuse=True)
        self._reduce(sums, stats)
        means = sums.div_(self._deferred_counts)  # in place: the cached views now hold means
        stats.max_abs_mean_before = float(means.abs().max()) if means.numel() else 0.0
        scratch: torch.Tensor | None = None
        for (r, *_, final), m in zip(self._items, means_views):
            x = None if final else self._views(grads, r)
            if x is None:
                continue
            scratch = scratch_for(x, self.temp_limit_bytes, scratch)
            subtract_means_(x, m, self.temp_limit_bytes, scratch)
        if self.full_stats:
            self._measure_after(grads, sq_before, stats)
        self.steps += 1
        stats.step = self.steps
        stats.seconds = time.perf_counter() - t0
        return stats

    def _measure_after(self, grads: list[torch.Tensor | None], sq_before: torch.Tensor, stats: GCStats) -> None:
        """Re-measure the means after GC (one extra read + the same collectives) and the
        global norms and max |mean| (two small all-reduces per partition group)."""
        sums, _, sq_after = self._accumulate(grads, "after")
        self._reduce(sums, GCStats())
        after = float(sums.div_(self._counts).abs().max()) if sums.numel() else 0.0
        sq = torch.stack([sq_before, sq_after], dim=1)  # (stat slots, 2)
        maxes = torch.tensor([stats.max_abs_mean_before, after], dtype=torch.float64)
        # Slot 0 holds tensors this rank holds whole (counted once); every other slot
        # holds disjoint pieces, summed over each of the slot's partition groups.
        for i, groups in enumerate(self._stat_keys):
            for group in groups:
                dev = self._comm_device(group)
                t, m = sq[i].to(dev), maxes.to(dev)
                dist.all_reduce(t, group=group)
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
                sq[i], maxes = t.cpu(), m.cpu()
        stats.max_abs_mean_before, stats.max_abs_mean_after = float(maxes[0]), float(maxes[1])
        stats.grad_norm_before = float(sq[:, 0].sum().sqrt())
        stats.grad_norm_after = float(sq[:, 1].sum().sqrt())
