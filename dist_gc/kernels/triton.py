"""Triton backend: multi-tensor GC kernels whose launches per call do not grow with the
number of tensors.

The multi_tensor_apply pattern
------------------------------
Every launch covers ALL items of one dtype. The host builds, once per distinct item
table (cached), int64 tables on the views' device:

* ``itab`` — per item: its canonical shape ``(k0, a1, k2, a3)``, ``sum_start``, the tile
  path chosen for it and its tiling (see below), and where its partial sums go;
* ``blocks`` — per program: ``(item, local block)``, so one grid walks every item;

and, per call, a table of the views' data addresses (``view.data_ptr()``), which the
kernels load and cast to a typed pointer (``tl.load(ptrs + i).to(tl.pointer_type(DT))``).
Launches per call: ``accumulate`` = one partials launch per dtype + ONE reduce launch
(+ one subtract launch per dtype holding final items when ``fuse``); ``subtract`` = one
launch per dtype. So at most 2*3 + 1 = 7, and 3 for a single-dtype fused step, however
many tensors the step has.

Tiling: each item is seen, per ``i0``, as an ``a1 x (k2*a3)`` row-major matrix whose
column ``q`` belongs to channel ``q // a3``. One kernel holds three tile paths (a runtime
branch on the item's path, so a step of mixed shapes is still one launch):

* ``COL`` (``a3 == 1``, or short ``a3`` with many rows: the strided family
  ``(1, O, C, 1)``, output dim 1 / last dim): a ``(COL_TR, COL_TQ)`` tile walks down a
  box of rows, contiguous along the columns (coalesced), and keeps one fp32 partial per
  column; the columns of one channel (``a3`` of them) are summed by the reduce pass;
* ``MID`` (short-to-medium rows, e.g. ``(1, 1, C, 9)``): a ``(MID_TC, MID_TL)`` tile of
  ``MID_TC`` channels walks along their rows; one partial per channel per box;
* ``LONG`` (long rows ``(1, 1, C, L)``, tensor mode ``(1, 1, 1, N)`` with N up to ~1e8,
  blocked ``(G, O, C, I)`` with long ``I``): a 1-D ``LONG_TL`` tile walks a box of one
  channel (several rows of it and a long stretch of ``a3``); one partial per box.

Boxes are sized to about ``target`` elements, so huge tensors get many programs (the
whole GPU works on one 1e8-element tensor) and tiny ones one program each.

Determinism
-----------
DDP replicas centralize identical gradients and must stay bit-identical, so no float
atomics (their order, hence their rounding, varies run to run). Each program writes the
fp32 partial sums of its box into its own slots of a ``partials`` buffer (fixed tile
shapes, so ``tl.sum``'s tree is fixed). The reduce pass then gives every sums slot ONE
owner lane, which adds the slot's partials in a fixed order (item order, then box order,
in fixed-width vectors) and then adds the total to the slot (or, fused final items,
writes ``total / count``, an IEEE-rounded division as torch's). Items that share slots
(non-exclusive) are therefore summed one after another by construction, without races.
Same inputs -> same bits, whatever the launch or scheduling order.

Memory traffic: the data is read once by the partials pass; the fused subtraction reads
and writes it once more (2 reads + 1 write, the 16-bit views as 16-bit). The partials
are one fp32 per box (~``target`` elements) for ``MID`` / ``LONG``, one per column per
box of rows for ``COL`` (``1/box_rows`` of the elements), and the reduce pass reads
them once. Accumulation is fp32; results are rounded once to the view's dtype (round to
nearest even; bf16 rounded with integer ops, so that the GPU and the interpreter, whose
bf16 casts truncate, give the same bits).

GPU notes (not measured here: no GPU in development; the kernels are compiled for
sm_90 ahead of time to check they build without spills): the data addresses come from a
table, so the compiler knows nothing of their alignment and emits scalar (not 128-bit)
loads; rows shorter than the tile width leave lanes idle (``MID`` at ``a3 = 3`` uses
3/16 of them) though every fetched sector is used.

Importing this module never needs triton: the kernels (:mod:`._triton_kernels`) are
imported on first use.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["accumulate", "subtract", "available"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# item-table fields (NF int64 per item)
_NF = 16
_K0, _A1, _K2, _A3, _SUM_START, _PATH, _N_CB, _N_RB, _N_LB, _BOX_ROWS, _BOX_X, _PBASE, _P = range(13)
COL, MID, LONG = 0, 1, 2


@dataclass(frozen=True)
class Config:
    """Tile sizes (powers of two) and box target; part of the table cache key."""

    col_tr: int = 16
    col_tq: int = 64
    mid_tc: int = 64
    mid_tl: int = 16
    long_tl: int = 1024
    target: int = 16384
    """Elements per program (box), roughly."""
    col_max_a3: int = 8
    """``COL`` takes rows this short when the item has at least ``col_tr`` rows."""
    long_min_a3: int = 512
    red_lanes: int = 2048
    red_max_rb: int = 256
    num_warps: int = 4


CONFIG = Config()
#: Tests only: force one tile path for every item (None: chosen per item).
_FORCE_PATH: int | None = None


def available(device: Any = None) -> bool:
    """Whether this backend can run: triton importable, and for CUDA tensors CUDA
    available; for CPU tensors only under Triton's interpreter: ``TRITON_INTERPRET=1``,
    set before triton was imported (triton's own jit helpers, ``tl.zeros`` and the
    like, are decorated at its import and must be interpreted too).
    ``device=None``: either of the two."""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:
        return False
    interp = os.environ.get("TRITON_INTERPRET") == "1" and isinstance(tl.zeros, InterpretedFunction)
    if device is None:
        return interp or torch.cuda.is_available()
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available()
    return dev.type == "cpu" and interp


# --------------------------------------------------------------------------- kernels
_KERNELS: dict[str, Any] = {}


def _kernels() -> dict[str, Any]:
    """The jit functions (:mod:`._triton_kernels`), imported on first use: triton is
    imported only then. Looked up by name at every launch (tests wrap them to count
    launches). ``triton.jit`` decides compiled vs interpreted when it decorates, so the
    module is re-imported if ``TRITON_INTERPRET`` changed since (a test session that
    sets it after another test imported the kernels for a GPU)."""
    mode = os.environ.get("TRITON_INTERPRET") == "1"
    if _KERNELS.get("interpret") is not mode:
        import importlib

        import triton.language as tl

        from . import _triton_kernels as k

        if (type(k.partials_kernel).__name__ == "InterpretedFunction") is not mode:
            k = importlib.reload(k)
        _KERNELS.clear()
        _KERNELS.update(partials=k.partials_kernel, reduce=k.reduce_kernel, subtract=k.subtract_kernel, tl=tl,
                        interpret=mode)
    return _KERNELS


# --------------------------------------------------------------------------- tables
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _choose_path(a1: int, k2: int, a3: int, cfg: Config) -> int:
    """The tile path for an item (performance only: every path is exact for every shape)."""
    if _FORCE_PATH is not None:
        return _FORCE_PATH
    if a3 == 1 or (a3 <= cfg.col_max_a3 and a1 >= cfg.col_tr):
        return COL
    if a3 >= cfg.long_min_a3:
        return LONG
    # lanes doing work in a MID tile (channels x row chunk) vs a LONG one (row chunk)
    eff_mid = min(k2, cfg.mid_tc) / cfg.mid_tc * a3 / (cfg.mid_tl * _cdiv(a3, cfg.mid_tl))
    eff_long = a3 / (cfg.long_tl * _cdiv(a3, cfg.long_tl))
    return LONG if eff_long >= eff_mid else MID


def _tiling(shape: tuple[int, int, int, int], cfg: Config) -> tuple[int, ...]:
    """``(path, n_cb, n_rb, n_lb, box_rows, box_x, P)`` of one nonempty item: ``n_*`` boxes
    along column / channel blocks, row chunks and (``LONG``) stretches of ``a3``; a box
    has ``box_rows`` rows and ``box_x`` tile blocks (``LONG``: ``box_x`` elements of
    ``a3``); ``P`` partials per channel.

    A box is about ``cfg.target`` elements: large enough that the partials (and the
    reduce pass) stay a small fraction of the traffic, small enough that a single big
    tensor still spreads over thousands of programs."""
    k0, a1, k2, a3 = shape
    path = _choose_path(a1, k2, a3, cfg)
    t = cfg.target
    if path == COL:
        W = k2 * a3
        tq = cfg.col_tq
        box_rows = min(_cdiv(a1, cfg.col_tr) * cfg.col_tr, max(cfg.col_tr, t // tq // cfg.col_tr * cfg.col_tr))
        # few rows: one program also takes several column blocks
        box_x = max(1, t // (box_rows * tq))
        n_cb = _cdiv(_cdiv(W, tq), box_x)
        n_rb = _cdiv(a1, box_rows)
        return path, n_cb, n_rb, 1, box_rows, box_x, n_rb * a3
    if path == MID:
        row = cfg.mid_tc * _cdiv(a3, cfg.mid_tl) * cfg.mid_tl
        box_rows = min(a1, max(1, t // row))
        box_x = max(1, t // (box_rows * row))
        n_cb = _cdiv(_cdiv(k2, cfg.mid_tc), box_x)
        n_rb = _cdiv(a1, box_rows)
        return path, n_cb, n_rb, 1, box_rows, box_x, n_rb
    tl_ = cfg.long_tl
    box_len = min(_cdiv(a3, tl_) * tl_, max(tl_, t // tl_ * tl_))
    n_lb = _cdiv(a3, box_len)
    box_rows = min(a1, max(1, t // box_len))
    n_rb = _cdiv(a1, box_rows)
    return path, k2, n_rb, n_lb, box_rows, box_len, n_rb * n_lb


@dataclass
class _Plan:
    items: tuple
    live: list[int]
    """Indices of the nonempty items."""
    n_partials: int
    table: torch.Tensor
    """All int64 tables in one device tensor (one copy to the device)."""
    itab: torch.Tensor
    rdiv: torch.Tensor
    groups: dict  # dtype -> (blocks_all, n_all, blocks_final, n_final)
    reduce: tuple  # (rslot, uptr, ustart, ulen, n_slots, BS, RB)
    max_slot: int
    ptrs: tuple | None = None
    """The last ``(addresses, device table)``."""


_CACHE: dict = {}
_CACHE_MAX = 32


def _build(items: tuple, dtypes: tuple, device: torch.device, cfg: Config) -> _Plan:
    n = len(items)
    rows = [[0] * _NF for _ in range(n)]
    live: list[int] = []
    nblocks = [0] * n
    pbase = 0
    unit_slot: list[torch.Tensor] = []
    unit_start: list[torch.Tensor] = []
    unit_len: list[torch.Tensor] = []
    unit_div: list[torch.Tensor] = []
    max_slot = -1
    for i, it in enumerate(items):
        k0, a1, k2, a3 = it.shape
        if k0 * a1 * k2 * a3 == 0:
            continue
        if it.final and not it.count > 0:
            raise ValueError(f"dist_gc.kernels.triton: item {it.item}: final with count {it.count}")
        live.append(i)
        path, n_cb, n_rb, n_lb, box_rows, box_x, P = _tiling(it.shape, cfg)
        r = rows[i]
        r[_K0], r[_A1], r[_K2], r[_A3], r[_SUM_START], r[_PATH] = k0, a1, k2, a3, it.sum_start, path
        r[_N_CB], r[_N_RB], r[_N_LB], r[_BOX_ROWS], r[_BOX_X], r[_PBASE], r[_P] = n_cb, n_rb, n_lb, box_rows, box_x, pbase, P
        nblocks[i] = k0 * n_cb * n_rb * n_lb
        nch = k0 * k2
        ch = torch.arange(nch, dtype=torch.int64)
        unit_slot.append(ch + it.sum_start)
        unit_start.append(ch * P + pbase)
        unit_len.append(torch.full((nch,), P, dtype=torch.int64))
        unit_div.append(torch.full((nch,), float(it.count) if it.final else 0.0, dtype=torch.float32))
        pbase += nch * P
        max_slot = max(max_slot, it.sum_start + nch - 1)
    itab = torch.tensor(rows, dtype=torch.int64).reshape(-1) if n else torch.zeros(0, dtype=torch.int64)

    parts = [itab]
    layout: dict = {}

    def add(t: torch.Tensor) -> tuple[int, int]:
        off = sum(p.numel() for p in parts)
        parts.append(t.reshape(-1))
        return off, t.numel()

    def block_table(idx: list[int]) -> tuple[int, int, int]:
        counts = torch.tensor([nblocks[i] for i in idx], dtype=torch.int64)
        total = int(counts.sum()) if idx else 0
        item_ids = torch.repeat_interleave(torch.tensor(idx, dtype=torch.int64), counts)
        starts = torch.cumsum(counts, 0) - counts
        local = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(starts, counts)
        off, _ = add(torch.stack([item_ids, local], 1))
        return off, total

    for dt in dict.fromkeys(dtypes[i] for i in live):
        idx = [i for i in live if dtypes[i] == dt]
        fin = [i for i in idx if items[i].final]
        layout[dt] = (block_table(idx), block_table(fin))

    if live:
        slots = torch.cat(unit_slot)
        order = torch.sort(slots, stable=True).indices  # by slot, then item order
        slots = slots[order]
        ustart, ulen, udiv = torch.cat(unit_start)[order], torch.cat(unit_len)[order], torch.cat(unit_div)[order]
        rslot, counts = torch.unique_consecutive(slots, return_counts=True)
        first = torch.cumsum(counts, 0) - counts
        rdiv = udiv[first]
        if bool((udiv[counts.repeat_interleave(counts) > 1] > 0).any()):
            raise ValueError("dist_gc.kernels.triton: a final item shares sums slots with another item")
        uptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
        maxp = int(ulen.max())
    else:
        rslot = uptr = ustart = ulen = torch.zeros(0, dtype=torch.int64)
        rdiv = torch.zeros(0, dtype=torch.float32)
        maxp = 1
    red = (add(rslot)[0], add(uptr)[0], add(ustart)[0], add(ulen)[0])
    rb = min(cfg.red_max_rb, max(16, _pow2(maxp)))
    bs = max(1, cfg.red_lanes // rb)
    table = torch.cat(parts).to(device)
    nt = itab.numel()

    def view(off: int, size: int) -> torch.Tensor:
        return table[off : off + size]

    groups = {}
    for dt, ((oa, na), (of, nf)) in layout.items():
        groups[dt] = (view(oa, 2 * na), na, view(of, 2 * nf), nf)
    ns = rslot.numel()
    reduce = (view(red[0], ns), view(red[1], ns + 1), view(red[2], ustart.numel()), view(red[3], ulen.numel()), ns, bs, rb)
    return _Plan(items, live, pbase, table, table[:nt], rdiv.to(device), groups, reduce, max_slot)


def _plan(items: Sequence, views: Sequence[torch.Tensor]) -> tuple[_Plan, torch.device]:
    if len(views) != len(items):
        raise ValueError(f"dist_gc.kernels.triton: {len(items)} items but {len(views)} views")
    device = None
    dtypes = []
    for it, v in zip(items, views):
        n = math.prod(it.shape)
        if v.dim() != 1 or v.numel() != n:
            raise ValueError(f"dist_gc.kernels.triton: item {it.item}: a 1-D view of {n} elements expected, got {tuple(v.shape)}")
        dtypes.append(v.dtype)
        if n == 0:
            continue
        if v.dtype not in _DTYPES:
            raise TypeError(f"dist_gc.kernels.triton: item {it.item}: unsupported dtype {v.dtype}")
        if not v.is_contiguous():
            raise ValueError(f"dist_gc.kernels.triton: item {it.item}: view is not contiguous")
        if device is None:
            device = v.device
        elif v.device != device:
            raise ValueError(f"dist_gc.kernels.triton: views on {device} and {v.device}")
    items = tuple(items)
    key = (items, tuple(dtypes), device, CONFIG, _FORCE_PATH)
    plan = _CACHE.get(key)
    if plan is None:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        plan = _CACHE[key] = _build(items, tuple(dtypes), device or torch.device("cpu"), CONFIG)
    return plan, device


def _check_buffer(buf: torch.Tensor, plan: _Plan, device: torch.device, name: str) -> None:
    if buf.dtype != torch.float32 or not buf.is_contiguous() or buf.device != device:
        raise ValueError(f"dist_gc.kernels.triton: {name} must be a contiguous fp32 tensor on {device}")
    if buf.numel() <= plan.max_slot:
        raise ValueError(f"dist_gc.kernels.triton: {name} has {buf.numel()} slots, the items need {plan.max_slot + 1}")


def _pointers(plan: _Plan, views: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The views' data addresses on ``device``. Gradients usually keep their storage from
    step to step (DDP buckets, ZeRO flat buffers), so the last table is reused when the
    addresses are unchanged; otherwise a pinned copy, without syncing the stream."""
    ptrs = [0] * len(views)
    for i in plan.live:
        ptrs[i] = views[i].data_ptr()
    if plan.ptrs is not None and plan.ptrs[0] == ptrs:
        return plan.ptrs[1]
    host = torch.tensor(ptrs, dtype=torch.int64)
    if device.type == "cuda":
        dev = host.pin_memory().to(device, non_blocking=True)
    else:
        dev = host.to(device)
    plan.ptrs = (ptrs, dev)
    return dev


def _tile_args() -> dict:
    c = CONFIG
    return dict(NF=_NF, COL_TR=c.col_tr, COL_TQ=c.col_tq, MID_TC=c.mid_tc, MID_TL=c.mid_tl, LONG_TL=c.long_tl,
                num_warps=c.num_warps)


_TL_DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _subtract_launches(K: dict, plan: _Plan, ptrs: torch.Tensor, means: torch.Tensor, final_only: bool) -> None:
    kw = _tile_args()
    for dt, (blocks_all, n_all, blocks_fin, n_fin) in plan.groups.items():
        blocks, nb = (blocks_fin, n_fin) if final_only else (blocks_all, n_all)
        if nb:
            K["subtract"][(nb,)](ptrs, plan.itab, blocks, means, DT=getattr(K["tl"], _TL_DTYPE[dt]), **kw)


def accumulate(items: Sequence, views: Sequence[torch.Tensor], sums: torch.Tensor, fuse: bool) -> None:
    """Add every item's fp32 channel sums into ``sums`` (see :mod:`dist_gc.kernels`);
    with ``fuse``, final items get their means written and subtracted instead."""
    plan, device = _plan(items, views)
    if not plan.live:
        return
    _check_buffer(sums, plan, device, "sums")
    K = _kernels()
    kw = _tile_args()
    ptrs = _pointers(plan, views, device)
    partials = torch.empty(plan.n_partials, dtype=torch.float32, device=device)
    for dt, (blocks, nb, _, _) in plan.groups.items():
        if nb:
            K["partials"][(nb,)](ptrs, plan.itab, blocks, partials, DT=getattr(K["tl"], _TL_DTYPE[dt]), **kw)
    rslot, uptr, ustart, ulen, ns, bs, rb = plan.reduce
    K["reduce"][(_cdiv(ns, bs),)](partials, sums, rslot, uptr, plan.rdiv, ustart, ulen, ns, FUSE=bool(fuse), BS=bs, RB=rb,
                                  num_warps=CONFIG.num_warps)
    if fuse:
        _subtract_launches(K, plan, ptrs, sums, final_only=True)


def subtract(items: Sequence, views: Sequence[torch.Tensor], means: torch.Tensor) -> None:
    """``view -= means[sum_start + i0*k2 + i2]`` for every item, in fp32, rounded once."""
    plan, device = _plan(items, views)
    if not plan.live:
        return
    _check_buffer(means, plan, device, "means")
    K = _kernels()
    _subtract_launches(K, plan, _pointers(plan, views, device), means, final_only=False)
