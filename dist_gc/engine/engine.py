"""The shared engine: local fp32 partial sums -> one all-reduce per group -> subtract.

Bytes on the wire per optimizer step, per process group ``g``::

    4 * sum over targets t reduced over g of |split channels of t|

where a channel is "split" when two or more ranks of ``g`` hold some of its elements
(for output dim 0 that is at most one row per shard boundary; for a strided output
dim or ``mode="tensor"`` it is every channel of a tensor cut by a boundary). The size
is independent of tensor sizes and is reported in :attr:`GCStats.bytes_communicated`.

Two steps, kept apart: :func:`compile_plans` (pure: plans -> the typed per-region
items, collective buckets, batches and divisors; unit-testable without tensors) and
:meth:`GCEngine.step` (per optimizer step: read the gradients, sum, reduce, subtract).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from ..core.centralize import DEFAULT_TEMP_BYTES, add_sums_, centralize_in_one_pass_, fits_mixed_kernels, scratch_for, subtract_means_
from ..core.device import on_accelerator, pretend_accelerator
from ..kernels import Bound, resolve_kernel, select_backend
from ..kernels.table import kernel_items
from .collectives import comm_device
from .layout import Region, TensorPlan

__all__ = ["GCEngine", "GCStats", "CompiledPlans", "compile_plans"]

Source = Callable[[], "torch.Tensor | None"]


@dataclass(slots=True)
class GCStats:
    """What the last GC step did, on this rank (globally reduced where noted)."""

    step: int = 0
    centralized: list[str] = field(default_factory=list)
    """Parameters centralized in this step (planned and with a gradient)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """``{name: reason}`` for parameters GC leaves alone."""
    without_grad: list[str] = field(default_factory=list)
    """Planned parameters that had no gradient in this step (unused in the forward)."""
    max_abs_mean_before: float = 0.0
    """Largest |channel mean| GC removed (this rank's channels; global with full_stats).
    NaN when any mean is not finite (see ``nonfinite``)."""
    nonfinite: int = 0
    """Channels whose mean is NaN/inf (this rank's; with full_stats the largest count of
    any rank, so > 0 on every rank when any has one). Counted explicitly: a MAX
    all-reduce over gloo drops NaN, which would hide a diverged gradient."""
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
        d["centralized"], d["skipped"], d["without_grad"] = len(self.centralized), len(self.skipped), len(self.without_grad)
        return {k: v for k, v in d.items() if v is not None}

    def merge(self, other: "GCStats") -> "GCStats":
        """Add the statistics of another part of the same training step (disjoint
        parameters, e.g. the next DeepSpeed param group) into ``self``; returns ``self``."""

        def norm(x: float | None, y: float | None) -> float | None:
            return None if x is None or y is None else (x * x + y * y) ** 0.5

        self.max_abs_mean_before = _nanmax(self.max_abs_mean_before, other.max_abs_mean_before)
        self.nonfinite += other.nonfinite
        if self.max_abs_mean_after is not None and other.max_abs_mean_after is not None:
            self.max_abs_mean_after = _nanmax(self.max_abs_mean_after, other.max_abs_mean_after)
        self.grad_norm_before = norm(self.grad_norm_before, other.grad_norm_before)
        self.grad_norm_after = norm(self.grad_norm_after, other.grad_norm_after)
        self.centralized = [*self.centralized, *other.centralized]
        self.without_grad = [*self.without_grad, *other.without_grad]
        self.bytes_communicated += other.bytes_communicated
        self.collectives += other.collectives
        self.seconds += other.seconds
        return self


def _nanmax(a: float, b: float) -> float:
    return float("nan") if math.isnan(a) or math.isnan(b) else max(a, b)


# --------------------------------------------------------------------------- compile
@dataclass(frozen=True, slots=True)
class _Item:
    """One region, placed at ``[sum_start, sum_stop)`` of the engine-wide ``sums`` buffer."""

    region: Region
    dims: tuple[int, ...]
    """Averaged dims of the region's view (size 1 in its sums shape)."""
    sum_start: int
    sum_stop: int
    exclusive: bool
    """No other region of this rank writes its sums slice: its partial sums can be
    written with one ``sum(out=...)`` call — per tensor, as few kernel calls as the
    per-tensor loop."""
    final: bool
    """Exclusive, and no collective completes its slice: its means are known as soon
    as it is summed, so it is centralized right away while still in cache (whole
    tensors, and whole rows inside a shard)."""
    stat_slot: int
    """Index into ``CompiledPlans.stat_groups``; -1: not counted in statistics (a replica)."""
    numel: int
    plan: int
    """Index of the plan the region belongs to."""


@dataclass(frozen=True, slots=True)
class _Bucket:
    """The slots of ``sums`` completed by one all-reduce over one group."""

    group: Any
    slices: tuple[tuple[int, int], ...]
    size: int


@dataclass(frozen=True, slots=True)
class _Batch:
    """A run of small final items centralized together (see :func:`_compile_batches`)."""

    items: tuple[int, ...]
    seglen: int
    sum_start: int
    sum_stop: int


@dataclass(frozen=True, slots=True)
class CompiledPlans:
    """The engine's per-step program, derived from the plans alone."""

    items: tuple[_Item, ...]
    buckets: tuple[_Bucket, ...]
    """One per process group, in the order plans first name their groups (which
    adapters derive from global facts, so every rank issues the same collectives)."""
    batches: dict[int, _Batch]
    """Keyed by the index of the batch's first item."""
    counts: tuple[float, ...]
    """Elements averaged by each sums slot."""
    deferred_counts: tuple[float, ...]
    """Divisor applied after the collectives (1 for final slots: divided already)."""
    stat_groups: tuple[tuple[Any, ...], ...]
    """Statistics slots: one per distinct tuple of shard groups, in plan order
    (identical on every rank); slot 0 is "held whole by this rank"."""
    num_sums: int
    plan_sources: tuple[tuple[int, ...], ...]
    """Per plan, the sources its regions view (empty: this rank holds none of it)."""


#: Batching of small final regions (see ``_compile_batches``): tensors up to this many
#: elements, batches up to one CPU chunk.
BATCH_MAX_TENSOR_ELEMS = 2**16
BATCH_MAX_ELEMS = 2**20
_BATCH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def compile_plans(plans: Sequence[TensorPlan]) -> CompiledPlans:
    """Flatten ``plans`` into the engine's items, buckets, batches and divisors."""
    offsets: list[int] = []
    counts: list[float] = []
    bucket_slices: dict[Any, list[tuple[int, int]]] = {}
    total = 0
    for plan in plans:
        offsets.append(total)
        counts += [float(plan.elements_per_mean)] * plan.num_sums
        for red in plan.reductions:
            bucket_slices.setdefault(red.group, []).append((total + red.sum_start, total + red.sum_stop))
        total += plan.num_sums
    buckets = tuple(_Bucket(g, tuple(s), sum(hi - lo for lo, hi in s)) for g, s in bucket_slices.items())
    stat_groups = tuple(dict.fromkeys([(), *(p.shard_groups for p in plans)]))
    items = []
    for p_index, (plan, base) in enumerate(zip(plans, offsets)):
        # A replica (TensorPlan.counted False) is left out of model-wide statistics.
        slot = stat_groups.index(plan.shard_groups) if plan.counted else -1
        spans = [(r.sum_start, r.sum_stop) for r in plan.regions]
        g = plan.geometry
        for r in plan.regions:
            shape = r.shape if r.shape is not None else r.source_shape
            numel = math.prod(shape) if shape is not None else g.numel
            overlaps = sum(1 for lo, hi in spans if lo < r.sum_stop and r.sum_start < hi)
            reduced = any(red.sum_start < r.sum_stop and r.sum_start < red.sum_stop for red in plan.reductions)
            dims = tuple(i for i, b in enumerate(r.sum_shape) if b == 1)
            items.append(_Item(r, dims, base + r.sum_start, base + r.sum_stop, overlaps == 1 and bool(dims),
                               overlaps == 1 and not reduced, slot, numel, p_index))
    deferred = list(counts)
    for it in items:
        if it.final:
            deferred[it.sum_start : it.sum_stop] = [1.0] * (it.sum_stop - it.sum_start)
    plan_sources = tuple(tuple(sorted({r.source for r in p.regions})) for p in plans)
    return CompiledPlans(tuple(items), buckets, _compile_batches(items), tuple(counts), tuple(deferred), stat_groups, total, plan_sources)


def _compile_batches(items: Sequence[_Item]) -> dict[int, _Batch]:
    """Runs of small final regions centralized together, keyed by the first item.

    Why: per tensor the loop ``g.sub_(g.mean(...))`` costs two kernel calls (plus a
    cast each way for 16-bit gradients), which dominates for many small tensors — on
    CPU through per-call overhead, on GPUs through launches. A run of consecutive
    regions whose channels are contiguous segments of one common length, and whose
    sums slices are adjacent, is concatenated into one fp32 buffer (at most one CPU
    chunk), viewed as ``(segments, length)``, centralized with one mean and one
    subtraction, and copied back with one multi-tensor copy."""
    batches: dict[int, _Batch] = {}
    run: list[int] = []
    seglen = total = 0

    def close() -> None:
        if len(run) > 1:
            batches[run[0]] = _Batch(tuple(run), seglen, items[run[0]].sum_start, items[run[-1]].sum_stop)
        run.clear()

    for k, it in enumerate(items):
        segs = it.sum_stop - it.sum_start
        shape = it.region.sum_shape
        ok = (it.final and it.exclusive and 0 < it.numel <= BATCH_MAX_TENSOR_ELEMS and segs > 0 and it.numel % segs == 0
              and shape[0] == segs and all(b == 1 for b in shape[1:]))
        length = it.numel // segs if ok else 0
        if not ok or not run or length != seglen or it.sum_start != items[run[-1]].sum_stop or total + it.numel > BATCH_MAX_ELEMS:
            close()
            total = 0
        if ok:
            run.append(k)
            seglen, total = length, total + it.numel
    close()
    return batches


# --------------------------------------------------------------------------- engine
class GCEngine:
    """Runs GC over a fixed set of :class:`TensorPlan` s.

    ``sources[i]()`` returns the current local gradient that regions with
    ``source == i`` view (or ``None`` when it has none this step: it then contributes
    zero partial sums and is not modified, but the collectives still run).

    ``temp_limit_bytes`` bounds the fp32 temporaries of the low-precision path; by
    default ``max(DEFAULT_TEMP_BYTES, 1% of the local gradient bytes)``, measured at
    the first step that has gradients.

    The sums live on the gradients' device; each all-reduce runs on its group's comm
    device (:func:`~dist_gc.engine.collectives.comm_device`). When they differ —
    CPU-offloaded gradients (FSDP2 ``CPUOffloadPolicy``, FSDP1 ``CPUOffload``) with an
    NCCL group — only the message (4 B per split channel) is copied there and back;
    offload changes neither the temporaries nor the message size.

    ``kernel`` (default ``$DIST_GC_KERNEL`` or ``"auto"``) picks how the sums and the
    subtraction run: one fused multi-tensor call per step (:mod:`dist_gc.kernels`: C++
    on CPU, Triton on CUDA) or torch ops per region; the results agree to rounding."""

    def __init__(self, plans: Sequence[TensorPlan], sources: Sequence[Source], *, temp_limit_bytes: int | None = None, full_stats: bool = False,
                 kernel: str | None = None) -> None:
        self.plans = list(plans)
        self.kernel = resolve_kernel(kernel)
        """Requested backend (see :mod:`dist_gc.kernels`); ``backend`` is the one the
        last step used (``None``: torch ops)."""
        self.backend: str | None = None
        self.sources = list(sources)
        self.full_stats = full_stats
        self.compiled = compile_plans(self.plans)
        # The fused kernels' view of the items; the few no kernel takes (`_rest`) go
        # through the torch ops beside them.
        self._kitems, self._rest = kernel_items(self.compiled, self.plans)
        # Sources viewed as themselves must keep their planned shape (a Parameter whose
        # .data was replaced keeps its identity); sources viewed through flat slices must
        # be contiguous (a channels-last grouped ConvTranspose weight is copied for the step).
        self._source_shapes: dict[int, tuple[torch.Size, str]] = {}
        self._flat_sources: set[int] = set()
        for it in self.compiled.items:
            r = it.region
            if r.shape is None and r.source_shape is not None:
                self._source_shapes[r.source] = (torch.Size(r.source_shape), self.plans[it.plan].name)
            elif r.shape is not None:
                self._flat_sources.add(r.source)
        self._bound: dict[tuple, Bound] = {}
        self._backends: dict[tuple, str | None] = {}
        self._temp_limit = temp_limit_bytes
        self._device: torch.device | None = None
        self._acc_dtype = torch.float32
        self._names = tuple(p.name for p in self.plans)
        self._counts = torch.tensor(self.compiled.counts, dtype=torch.float32)
        self._deferred_counts = torch.tensor(self.compiled.deferred_counts, dtype=torch.float32)
        self._bucket_index = [torch.cat([torch.arange(lo, hi) for lo, hi in b.slices]) if b.slices else torch.empty(0, dtype=torch.long)
                              for b in self.compiled.buckets]
        self._buffers: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        # Only the sources some region views are read each step (a description lists
        # every parameter's buffer, skipped ones included).
        self._used = sorted({it.region.source for it in self.compiled.items})
        # Where each bucket's group communicates (see _reduce); filled at the first step
        # and reset with the buffers when the gradients move.
        self._wire_devices: dict[Any, torch.device] = {}
        self.steps = 0

    @property
    def buckets(self) -> tuple[_Bucket, ...]:
        return self.compiled.buckets

    @property
    def temp_limit_bytes(self) -> int:
        return self._temp_limit or DEFAULT_TEMP_BYTES

    def _buffer(self, key: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A persistent fp32 sums buffer on the gradients' device, with one cached
        broadcast-shaped view per region (no per-step view construction)."""
        if key not in self._buffers:
            buf = torch.zeros(self.compiled.num_sums, dtype=self._acc_dtype, device=self._device)
            views = [buf[it.sum_start : it.sum_stop].view(it.region.sum_shape) for it in self.compiled.items]
            self._buffers[key] = (buf, views)
        return self._buffers[key]

    # ------------------------------------------------------------------ checks
    def verify_collectives(self) -> None:
        """Check, once, that every rank of every group derived the same message size.

        A disagreement would otherwise hang or corrupt silently; here it raises on
        every rank of the group (all see the same reduced values)."""
        for b in self.compiled.buckets:
            t = torch.tensor([b.size, -b.size], dtype=torch.int64, device=comm_device(b.group))
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=b.group)
            if t[0].item() != b.size or -t[1].item() != b.size:
                raise RuntimeError(
                    f"dist_gc: ranks disagree on the GC message size over a process group "
                    f"(this rank: {b.size}, max: {t[0].item()}, min: {-t[1].item()}); the layouts differ between ranks"
                )

    # ------------------------------------------------------------------ step
    @staticmethod
    def _view(grads: list[torch.Tensor | None], region: Region) -> torch.Tensor | None:
        g = grads[region.source]
        if g is None:
            return None
        if region.shape is None:
            return g
        if not g.is_contiguous():
            raise RuntimeError(f"dist_gc: a gradient buffer of shape {tuple(g.shape)} is not contiguous; its layout needs a flat view")
        return g.view(-1)[region.start : region.stop].view(region.shape)

    def _centralize_batch(self, grads: list[torch.Tensor | None], sums: torch.Tensor, batch: _Batch) -> bool:
        """Centralize one batch (see :func:`_compile_batches`); False if this step's
        gradients do not allow it (a missing gradient, mixed or fp64 dtypes)."""
        items = self.compiled.items
        first = grads[items[batch.items[0]].region.source]
        if first is None or first.dtype not in _BATCH_DTYPES or (first.dtype == torch.float32 and not on_accelerator(first.device)):
            return False  # (measured: on CPU fp32 tensors are as fast one by one: no casts to save)
        xs = [self._view(grads, items[k].region) for k in batch.items]
        if any(x is None or x.dtype != first.dtype for x in xs):
            return False
        dtype = first.dtype
        flat = torch.cat([x.reshape(-1) for x in xs])
        rows = (flat if dtype == torch.float32 else flat.float()).view(-1, batch.seglen)
        means = sums[batch.sum_start : batch.sum_stop].view(-1, 1)
        torch.mean(rows, 1, keepdim=True, out=means)
        rows.sub_(means)
        pieces = torch.split(rows.view(-1), [items[k].numel for k in batch.items])
        torch._foreach_copy_(xs, [p.view(x.shape) for p, x in zip(pieces, xs)])
        return True

    def _accumulate(self, grads: list[torch.Tensor | None], key: str, fuse: bool = False, only: Sequence[int] | None = None,
                    zero: bool = True) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """Partial channel sums of every region (``only``: of these items) into the
        ``key`` buffer (zeroed first unless ``zero`` is False). With ``full_stats`` also
        the squared norm per stats slot. With ``fuse``, final regions are centralized
        right after their sums (their slice then holds means)."""
        sums, views = self._buffer(key)
        if zero:
            sums.zero_()
        sq = torch.zeros(len(self.compiled.stat_groups), dtype=torch.float64) if self.full_stats else None
        scratch: torch.Tensor | None = None  # one fp32 chunk buffer, reused for the step
        one_pass = fuse and sq is None  # (full_stats needs each region's norm before GC)
        limit = self.temp_limit_bytes
        batches = self.compiled.batches
        done_until = 0
        for k in range(len(self.compiled.items)) if only is None else only:
            it, view = self.compiled.items[k], views[k]
            if k < done_until:
                continue  # centralized with its batch
            if one_pass and only is None and k in batches and self._centralize_batch(grads, sums, batches[k]):
                done_until = k + len(batches[k].items)
                continue
            x = self._view(grads, it.region)
            if x is None:
                continue
            scratch = scratch_for(x, limit, scratch)
            if one_pass and it.final and it.exclusive and centralize_in_one_pass_(x, view, it.dims, limit, scratch):
                continue  # the slice holds this region's means already
            if it.exclusive and fits_mixed_kernels(x, limit):
                torch.sum(x, it.dims, keepdim=True, dtype=view.dtype, out=view)
            else:
                add_sums_(x, view, limit, scratch)
            if sq is not None and it.stat_slot >= 0:
                sq[it.stat_slot] += float(torch.linalg.vector_norm(x, dtype=torch.float32)) ** 2
            if fuse and it.final:
                view.div_(self.compiled.counts[it.sum_start])
                subtract_means_(x, view, limit, scratch)
        return sums, views, sq

    def _kernel_for(self, grads: list[torch.Tensor | None]) -> tuple[Bound | None, list[torch.Tensor], Sequence[int]]:
        """The fused backend for this step, the 1-D views of its items, and the items
        left to the torch ops (all of them when no backend runs: ``kernel="torch"``,
        ``full_stats`` — which needs each region's norm before GC —, fp64 gradients).
        Items of a missing gradient are left out; a non-contiguous gradient (a
        channels-last weight) goes through the torch ops."""
        every = range(len(self.compiled.items))
        if self.kernel == "torch" or self.full_stats or not self._kitems:
            return None, [], every
        present, rest = [], list(self._rest)
        for it in self._kitems:
            g = grads[it.source]
            if g is None:
                continue
            if g.is_contiguous():
                present.append(it)
            else:
                rest.append(it.item)
        if not present:
            return None, [], every
        dtypes = tuple(grads[it.source].dtype for it in present)
        # The choice depends only on the device and the dtypes: made once per pair (an
        # explicit kernel that cannot run raises here, at its first step, and every step).
        choice = (self._device, frozenset(dtypes))
        if choice not in self._backends:
            self._backends[choice] = select_backend(self.kernel, self._device, sorted(choice[1], key=str))
        backend = self._backends[choice]
        if backend is None:
            return None, [], every
        key = (backend, tuple(it.item for it in present), dtypes)
        bound = self._bound.get(key)
        if bound is None:
            bound = self._bound[key] = Bound(backend, present, dtypes)
        views = [grads[it.source].view(-1)[it.start : it.start + it.numel] for it in present]
        for it, v in zip(present, views):
            if v.numel() != it.numel:  # (a slice past the end is silently short: never hand that to a kernel)
                raise RuntimeError(f"dist_gc: {self._names[self.compiled.items[it.item].plan]!r}: its gradient buffer holds {grads[it.source].numel()} "
                                   f"elements, the plan views [{it.start}, {it.start + it.numel}); the layout does not match the gradient")
        return bound, views, sorted(rest)

    def _reduce(self, sums: torch.Tensor, stats: GCStats) -> None:
        # One collective per group per step, in the same order on every rank.
        for b, index in zip(self.compiled.buckets, self._bucket_index):
            if b.size == 0:
                continue
            idx = index.to(sums.device, non_blocking=True)
            msg = sums.index_select(0, idx)
            # The sums live with the gradients, which need not be where the group
            # communicates: CPU-offloaded gradients (FSDP2 CPUOffloadPolicy, FSDP1
            # CPUOffload) with an NCCL group, which only takes CUDA tensors. The
            # message (4 B per split channel) then travels to the comm device and back.
            dev = self._wire_devices.get(b.group)
            if dev is None:
                dev = self._wire_devices[b.group] = comm_device(b.group, prefer=msg.device)
            # (under the test-only accelerator switch the transfer branch always runs)
            wire = msg if msg.device == dev and not pretend_accelerator() else msg.to(dev, copy=True)
            dist.all_reduce(wire, group=b.group)
            if wire is not msg:
                msg.copy_(wire)
            sums.index_copy_(0, idx, msg)
            stats.bytes_communicated += msg.numel() * msg.element_size()
            stats.collectives += 1

    def _prepare(self, grads: list[torch.Tensor | None]) -> None:
        device = next((g.device for g in grads if g is not None), self._device or torch.device("cpu"))
        # Statistics in the wider of fp32 and the gradients' dtype (fp64 models stay exact).
        acc = torch.float64 if any(g is not None and g.dtype == torch.float64 for g in grads) else torch.float32
        if self._device != device or self._acc_dtype != acc:
            self._device, self._acc_dtype, self._buffers, self._wire_devices = device, acc, {}, {}
            self._counts = self._counts.to(device=device, dtype=acc)
            self._deferred_counts = self._deferred_counts.to(device=device, dtype=acc)
        if self._temp_limit is None and any(g is not None for g in grads):
            local = sum(g.numel() * g.element_size() for g in grads if g is not None)
            self._temp_limit = max(DEFAULT_TEMP_BYTES, local // 100)
        for g in grads:
            if g is not None and g.is_sparse:
                raise RuntimeError("dist_gc: sparse gradients are not supported (use a dense nn.Embedding)")
        for i, (shape, name) in self._source_shapes.items():
            g = grads[i]
            if g is not None and g.shape != shape:
                raise RuntimeError(f"dist_gc: the gradient of {name!r} has shape {tuple(g.shape)}, but GC was planned for {tuple(shape)}: "
                                   "the parameter changed shape after attach; call handle.remove() and attach again")

    def _presence(self, grads: list[torch.Tensor | None], stats: GCStats) -> None:
        """Fill ``stats.centralized`` / ``without_grad`` for this step; raise when no
        planned parameter has a gradient (GC would silently do nothing)."""
        if all(grads[i] is not None for i in self._used):
            stats.centralized = list(self._names)
            return
        held = [k for k, srcs in enumerate(self.compiled.plan_sources) if srcs]
        missing = {k for k in held if all(grads[i] is None for i in self.compiled.plan_sources[k])}
        if held and len(missing) == len(held):
            first = ", ".join(self._names[k] for k in held[:4])
            raise RuntimeError(
                f"dist_gc: none of the {len(held)} parameters GC planned on this rank has a gradient at this step "
                f"({first}{', ...' if len(held) > 4 else ''}): the optimizer is stepping tensors other than the ones that "
                "received gradients, so GC would silently do nothing. Attach after deepspeed.initialize / "
                "accelerator.prepare (to the engine), and call step after backward"
            )
        stats.centralized = [n for k, n in enumerate(self._names) if k not in missing]
        stats.without_grad = [self._names[k] for k in sorted(missing)]

    @torch.no_grad()
    def step(self, stats: GCStats | None = None) -> GCStats:
        """Centralize every planned gradient in place; returns the step's stats."""
        t0 = time.perf_counter()
        stats = stats or GCStats()
        grads: list[torch.Tensor | None] = [None] * len(self.sources)
        for i in self._used:
            grads[i] = self.sources[i]()
        copies = []  # (gradient, contiguous copy) of non-contiguous sources viewed flat
        for i in self._flat_sources:
            g = grads[i]
            if g is not None and not g.is_contiguous() and not g.is_sparse:
                grads[i] = g.contiguous()
                copies.append((g, grads[i]))
        self._prepare(grads)
        self._presence(grads, stats)
        limit = self.temp_limit_bytes
        bound, views, rest = self._kernel_for(grads)
        self.backend = None if bound is None else bound.backend
        if bound is not None:
            sums, means_views = self._buffer("before")
            sums.zero_()
            bound.accumulate(views, sums)
            self._accumulate(grads, "before", fuse=True, only=rest, zero=False)
            sq_before = None
        else:
            sums, means_views, sq_before = self._accumulate(grads, "before", fuse=True)
        self._reduce(sums, stats)
        means = sums.div_(self._deferred_counts)  # in place: the cached views now hold means
        if means.numel():
            # One device sync for both: the largest |mean| (NaN if any is NaN) and how
            # many means are not finite.
            top, bad = torch.stack([means.abs().max(), (~torch.isfinite(means)).sum().to(means.dtype)]).tolist()
            stats.max_abs_mean_before, stats.nonfinite = (float("nan") if bad else top), int(bad)
        scratch: torch.Tensor | None = None
        if bound is not None:
            bound.subtract(views, means)  # (its final items were centralized by accumulate)
        for k in rest:
            it, m = self.compiled.items[k], means_views[k]
            x = None if it.final else self._view(grads, it.region)
            if x is None:
                continue
            scratch = scratch_for(x, limit, scratch)
            subtract_means_(x, m, limit, scratch)
        if self.full_stats:
            self._measure_after(grads, sq_before, stats)
        for g, c in copies:
            g.copy_(c)
        self.steps += 1
        stats.step = self.steps
        stats.seconds = time.perf_counter() - t0
        return stats

    def _measure_after(self, grads: list[torch.Tensor | None], sq_before: torch.Tensor, stats: GCStats) -> None:
        """Re-measure the means after GC (one extra read + the same collectives) and the
        global norms and max |mean| (two small all-reduces per shard group)."""
        sums, _, sq_after = self._accumulate(grads, "after")
        self._reduce(sums, GCStats())
        after = float(sums.div_(self._counts).abs().max()) if sums.numel() else 0.0
        sq = torch.stack([sq_before, sq_after], dim=1)  # (stat slots, 2)
        # NaN never enters a MAX all-reduce (gloo drops it): finite maxima and the count
        # of non-finite means are reduced, and NaN is put back afterwards.
        finite = [0.0 if math.isnan(v) else v for v in (stats.max_abs_mean_before, after)]
        maxes = torch.tensor([*finite, float(stats.nonfinite or math.isnan(after))], dtype=torch.float64)
        # Slot 0 holds tensors this rank holds whole (counted once); every other slot
        # holds disjoint pieces, summed over each of the slot's shard groups.
        for i, groups in enumerate(self.compiled.stat_groups):
            for group in groups:
                dev = comm_device(group)
                t, m = sq[i].to(dev), maxes.to(dev)
                dist.all_reduce(t, group=group)
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
                sq[i], maxes = t.cpu(), m.cpu()
        stats.nonfinite = int(maxes[2])
        if stats.nonfinite:
            stats.max_abs_mean_before = stats.max_abs_mean_after = float("nan")
        else:
            stats.max_abs_mean_before, stats.max_abs_mean_after = float(maxes[0]), float(maxes[1])
        stats.grad_norm_before = float(sq[:, 0].sum().sqrt())
        stats.grad_norm_after = float(sq[:, 1].sum().sqrt())
