"""The Triton multi-tensor backend (:mod:`dist_gc.kernels.triton`) against an fp64
oracle written with plain torch: on CPU tensors under Triton's interpreter (on a CUDA
machine the same tests run the compiled kernels on the GPU).

Tables come from the real planner (``plan_whole`` / ``plan_flat_shard`` ->
``compile_plans`` -> ``kernel_items``): whole tensors of every shape family, and a
ZeRO-like flat buffer cut at odd offsets over 3 ranks, checked end to end (partial
sums, simulated all-reduce, subtraction) against GC of the full tensors.
"""

from __future__ import annotations

import importlib
import math
import os
import sys

import pytest
import torch

DEV = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
if DEV.type == "cpu":
    # The interpreter needs TRITON_INTERPRET=1 when triton is IMPORTED (its own jit
    # helpers, tl.zeros & co, are decorated then). Set only around the import, so that
    # the rest of the session does not see the triton backend as available on CPU; the
    # fixture below sets it for these tests.
    _prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        triton = pytest.importorskip("triton")
    finally:
        if _prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _prev
else:
    triton = pytest.importorskip("triton")

from dist_gc.core.centralize import geometry_of  # noqa: E402
from dist_gc.engine.engine import compile_plans  # noqa: E402
from dist_gc.engine.layout import plan_flat_shard, plan_whole  # noqa: E402
from dist_gc.kernels import triton as T  # noqa: E402
from dist_gc.kernels.table import KernelItem, kernel_items  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: A config with tiny tiles and boxes: every item spans many programs (multi-box rows,
#: several column / channel blocks per program, several partials per slot).
TINY = T.Config(col_tr=4, col_tq=16, mid_tc=8, mid_tl=8, long_tl=32, target=128, red_lanes=64, red_max_rb=16)


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    """Triton's interpreter for this module's tests only (CPU)."""
    if DEV.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        if not T.available("cpu"):
            pytest.fail("triton was imported before this module could set TRITON_INTERPRET=1: run this file in a process of its own")
    yield


def cpu64(t):
    return t.detach().to("cpu", torch.float64)


# --------------------------------------------------------------------------- tables
# (name, shape, mode, output_dim, extra geometry kwargs, averaged dims of the GLOBAL tensor)
SPECS = [
    ("rows_short", (7, 13), "channel", 0, {}, (1,)),               # (1, 1, 7, 13)
    ("mid_dim", (5, 3, 4), "channel", 1, {}, (0, 2)),              # (1, 5, 3, 4)
    ("tensor_small", (33,), "tensor", None, {}, (0,)),             # (1, 1, 1, 33)
    ("last_dim", (6, 10), "channel", -1, {}, (0,)),                # (1, 6, 10, 1)
    ("strided", (40, 24), "channel", 1, {}, (0,)),                 # (1, 40, 24, 1)
    ("strided_short", (24, 5, 3), "channel", 1, {}, (0, 2)),       # (1, 24, 5, 3)
    ("conv_od1", (8, 3, 3, 3), "channel", 1, {}, (0, 2, 3)),       # (1, 8, 3, 9)
    ("rows_long", (3, 2500), "channel", 0, {}, (1,)),              # (1, 1, 3, 2500)
    ("rows_3", (50, 3), "channel", 0, {}, (1,)),                   # (1, 1, 50, 3)
    ("tensor_big", (20, 1000), "tensor", None, {}, (0, 1)),        # (1, 1, 1, 20000)
    ("bias", (17,), "channel", 0, {}, ()),                         # (1, 1, 17, 1)
    ("strided_tall", (64, 3), "channel", 1, {}, (0,)),             # (1, 64, 3, 1)
    ("rows_mid", (2, 150), "channel", 0, {}, (1,)),                # (1, 1, 2, 150)
]
# blocked geometries: stacked experts (3 experts x (6, 5), output dim 1 of each) and a
# grouped ConvTranspose weight (in=4, out/groups=3, 2, 2) with 2 groups: (G, O, C, I)
BLOCKED = [
    ("experts", (3, 6, 5), "channel", 2, dict(batch_dims=1), None),  # (3, 6, 5, 1)
    ("convT", (4, 3, 2, 2), "channel", 1, dict(groups=2), None),     # (2, 2, 3, 4)
]


def _geo(spec):
    name, shape, mode, od, kw, _ = spec
    return geometry_of(shape, mode, 0 if od is None else od, name=name, **kw)


def whole_table(specs=SPECS + BLOCKED):
    plans = []
    for k, spec in enumerate(specs):
        name, shape, mode, od, kw, _ = spec
        plans.append(plan_whole(name, _geo(spec), shape, None if mode == "tensor" else od, source=k))
    compiled = compile_plans(plans)
    items, rest = kernel_items(compiled, plans)
    assert rest == ()
    return items, compiled


def randn(n, dtype, gen):
    # an offset so that means are far from 0 (a missed subtraction shows)
    return (torch.randn(n, generator=gen, dtype=torch.float64) * 1.5 + 0.75).to(dtype)


def views_for(items, dtypes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(items)
    return [randn(it.numel, dt, gen).to(DEV) for it, dt in zip(items, dtypes)]


# --------------------------------------------------------------------------- oracle
def oracle(items, views, sums, fuse):
    """fp64 sums / means and centralized views (unrounded), from the canonical 4-D view:
    element (i0, j1, i2, j3) of ``(k0, a1, k2, a3)``, its channel (i0, i2)."""
    sums = cpu64(sums).clone()
    outs = []
    for it, v in zip(items, views):
        k0, a1, k2, a3 = it.shape
        x = cpu64(v).reshape(k0, a1, k2, a3)
        s = x.sum(dim=(1, 3)).reshape(-1)
        lo, hi = it.sum_start, it.sum_start + k0 * k2
        if fuse and it.final:
            m = s / it.count
            sums[lo:hi] = m
            outs.append((x - m.reshape(k0, 1, k2, 1)).reshape(-1))
        else:
            sums[lo:hi] += s
            outs.append(cpu64(v))
    return sums, outs


def subtract_oracle(items, views, means):
    outs = []
    for it, v in zip(items, views):
        k0, a1, k2, a3 = it.shape
        m = cpu64(means)[it.sum_start : it.sum_start + k0 * k2].reshape(k0, 1, k2, 1)
        outs.append((cpu64(v).reshape(k0, a1, k2, a3) - m).reshape(-1))
    return outs


def sums_ok(got, ref, abs_ref):
    # fp32 accumulation of n terms: |error| <= ~n*eps32*sum|x| in the worst case, far
    # less in practice (pairwise / tiled sums); 1e-5 relative to sum|x| (+1e-5 absolute).
    return bool(((cpu64(got) - ref).abs() <= 1e-5 * (1 + abs_ref)).all())


def values_ok(got, ref, mean_abs=1.0):
    """``got`` (the kernel's view) vs the fp64 unrounded ``ref``."""
    if got.dtype == torch.float32:
        # fp32 (brief): atol 1e-5 (values ~ N(0.75, 1.5), means computed in fp32)
        return bool(((cpu64(got) - ref).abs() <= 1e-5).all())
    eps = torch.finfo(got.dtype).eps
    # one rounding of the result to the 16-bit dtype (<= eps/2 * |ref|, here eps * |ref|
    # for margin) + the fp32 mean's own error (~1e-6 * (1 + |mean|)) + fp16's subnormal
    # spacing 2**-24
    tol = eps * ref.abs() + 1e-6 * (1 + mean_abs) + 2.0**-24
    return bool(((cpu64(got) - ref).abs() <= tol).all())


def abs_sums(items, views, nsum):
    out = torch.zeros(nsum, dtype=torch.float64)
    for it, v in zip(items, views):
        k0, a1, k2, a3 = it.shape
        out[it.sum_start : it.sum_start + k0 * k2] += cpu64(v).abs().reshape(k0, a1, k2, a3).sum((1, 3)).reshape(-1)
    return out


def check_accumulate(items, views, nsum, fuse, sums0=None):
    orig = [v.clone() for v in views]
    sums = torch.zeros(nsum, device=DEV) if sums0 is None else sums0.clone()
    T.accumulate(items, views, sums, fuse)
    ref_sums, ref_views = oracle(items, orig, torch.zeros(nsum) if sums0 is None else sums0, fuse)
    a = abs_sums(items, orig, nsum)
    final = torch.zeros(nsum, dtype=torch.bool)
    for it in items:
        if fuse and it.final:
            final[it.sum_start : it.sum_start + it.num_sums] = True
    # means: the sum's error divided by the count; compare them as sums
    counts = torch.ones(nsum, dtype=torch.float64)
    for it in items:
        if fuse and it.final:
            counts[it.sum_start : it.sum_start + it.num_sums] = it.count
    assert sums_ok(cpu64(sums) * counts, ref_sums * counts, a), "sums"
    for it, v, r in zip(items, views, ref_views):
        m = ref_sums[it.sum_start : it.sum_start + it.num_sums].abs().max() if fuse and it.final and it.numel else 0.0
        assert values_ok(v, r, float(m)), f"item {it}"
    return sums, views


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_whole_tensors_every_family(dtype, fuse):
    items, compiled = whole_table()
    paths = {T._tiling(it.shape, T.CONFIG)[0] for it in items}
    assert paths == {T.COL, T.MID, T.LONG}  # the table exercises every tile path
    check_accumulate(items, views_for(items, dtype), compiled.num_sums, fuse)


@pytest.mark.parametrize("path", [T.COL, T.MID, T.LONG])
def test_every_path_takes_every_shape(monkeypatch, path):
    """Each tile path is exact for every shape (the choice is performance only), also
    with tiny tiles: boxes split rows, columns and rows' lengths, many partials a slot."""
    # (the largest left out: a path far from its shapes is slow under the interpreter)
    items, compiled = whole_table([s for s in SPECS + BLOCKED if math.prod(s[1]) <= 300])
    monkeypatch.setattr(T, "_FORCE_PATH", path)
    tilings = [T._tiling(it.shape, TINY) for it in items]  # (path, n_cb, n_rb, n_lb, box_rows, box_x, P)
    assert any(t[2] > 1 for t in tilings) and any(t[6] > 1 for t in tilings)  # rows split, several partials a slot
    assert any(t[3] > 1 for t in tilings) if path == T.LONG else any(t[5] > 1 for t in tilings)  # long rows split / blocks a program
    for cfg, dtype, fuse in [(T.CONFIG, torch.bfloat16, True), (TINY, torch.float16, True), (TINY, torch.float32, False)]:
        monkeypatch.setattr(T, "CONFIG", cfg)
        check_accumulate(items, views_for(items, dtype), compiled.num_sums, fuse)


@pytest.mark.parametrize("dtype", DTYPES)
def test_subtract(monkeypatch, dtype):
    items, compiled = whole_table()
    gen = torch.Generator().manual_seed(1)
    means = (torch.randn(compiled.num_sums, generator=gen) * 3).to(DEV)
    for cfg in (T.CONFIG, TINY) if dtype == torch.bfloat16 else (T.CONFIG,):
        monkeypatch.setattr(T, "CONFIG", cfg)
        views = views_for(items, dtype, seed=2)
        refs = subtract_oracle(items, views, means)
        T.subtract(items, views, means)
        for v, r in zip(views, refs):
            assert values_ok(v, r, 3.0 * 5)


def zero_rank_tables(specs, bounds):
    """A ZeRO-like flat buffer: the tensors of ``specs`` concatenated, cut into one
    partition per rank at ``bounds``; per rank its plans' compiled items."""
    sizes = [math.prod(s[1]) for s in specs]
    offs = [sum(sizes[:k]) for k in range(len(specs))]
    world = len(bounds) - 1
    out = []
    for rank in range(world):
        plans = []
        for k, spec in enumerate(specs):
            lo, hi = offs[k], offs[k] + sizes[k]
            ranges = []
            for q in range(world):
                s, e = max(lo, bounds[q]) - lo, min(hi, bounds[q + 1]) - lo
                ranges.append((s, e) if e > s else (0, 0))
            plans.append(plan_flat_shard(spec[0], _geo(spec), ranges=tuple(ranges), rank=rank, group="dp", source=0,
                                         offset=max(lo, bounds[rank]) - bounds[rank]))
        compiled = compile_plans(plans)
        items, rest = kernel_items(compiled, plans)
        assert rest == ()
        out.append((items, compiled))
    return out, offs, sizes


@pytest.mark.parametrize("dtype", DTYPES)
def test_flat_shard_end_to_end(monkeypatch, dtype):
    """3 ranks of a ZeRO partition cut at odd offsets (rows, columns and tensors split
    into several items sharing slots): fused accumulate, a simulated all-reduce of the
    split channels, subtract — equals GC of the full tensors (fp64 torch, by dims)."""
    specs = [s for s in SPECS if s[0] in ("rows_short", "mid_dim", "tensor_small", "last_dim", "strided", "conv_od1", "rows_3")]
    specs.append(("tensor_split", (9, 37), "tensor", None, {}, (0, 1)))
    total = sum(math.prod(s[1]) for s in specs)
    bounds = [0, 301, 787, total]
    ranks, offs, sizes = zero_rank_tables(specs, bounds)
    assert any(not it.exclusive for items, _ in ranks for it in items)  # shared slots
    assert any(it.final for items, _ in ranks for it in items)
    gen = torch.Generator().manual_seed(3)
    flat = randn(total, dtype, gen).to(DEV)
    for cfg in (T.CONFIG, TINY):
        monkeypatch.setattr(T, "CONFIG", cfg)
        bufs = [flat[bounds[r] : bounds[r + 1]].clone() for r in range(len(ranks))]
        sums = []
        for (items, compiled), buf in zip(ranks, bufs):
            s = torch.zeros(compiled.num_sums, device=DEV)
            T.accumulate(items, [buf[it.start : it.start + it.numel] for it in items], s, True)
            sums.append(s)
        compiled0 = ranks[0][1]
        for b in compiled0.buckets:  # the all-reduce (same buckets on every rank)
            for lo, hi in b.slices:
                tot = sum(s[lo:hi] for s in sums)
                for s in sums:
                    s[lo:hi] = tot
        for (items, compiled), buf, s in zip(ranks, bufs, sums):
            means = s / torch.tensor(compiled.deferred_counts, dtype=torch.float32, device=DEV)
            rest = [it for it in items if not it.final]
            T.subtract(rest, [buf[it.start : it.start + it.numel] for it in rest], means)
        got = torch.cat(bufs)
        for spec, o, n in zip(specs, offs, sizes):
            g = cpu64(flat[o : o + n]).reshape(spec[1])
            dims = spec[5]
            ref = g - g.mean(dim=dims, keepdim=True) if dims else torch.zeros_like(g)
            assert values_ok(got[o : o + n], ref.reshape(-1), 5.0), spec[0]


def test_shared_slots_add_and_mixed_dtypes_and_empty():
    """Non-exclusive items sharing slots ADD (onto what ``sums`` already holds); one
    call mixes fp32 / bf16 / fp16 views; 0-size items are skipped."""
    items = (
        KernelItem(0, 0, 0, (1, 1, 4, 10), 0, False, False, 20.0),
        KernelItem(1, 1, 0, (1, 1, 4, 10), 0, False, False, 20.0),   # same slots 0..3
        KernelItem(2, 2, 0, (1, 0, 4, 10), 2, False, False, 20.0),   # empty
        KernelItem(3, 3, 0, (1, 3, 5, 1), 2, False, False, 3.0),     # overlaps slots 2..3
        KernelItem(4, 4, 0, (2, 2, 3, 2), 7, True, True, 4.0),      # blocked, final
        KernelItem(5, 5, 0, (1, 1, 0, 1), 13, True, True, 1.0),      # empty, final
        KernelItem(6, 6, 0, (1, 1, 1, 50), 13, True, True, 50.0),    # tensor mode, final
    )
    dts = [torch.float32, torch.bfloat16, torch.float16, torch.float16, torch.bfloat16, torch.float32, torch.float16]
    views = views_for(items, dts, seed=4)
    sums0 = torch.arange(20, dtype=torch.float32, device=DEV) * 0.5  # must be added to, not overwritten
    for fuse in (False, True):
        check_accumulate(items, [v.clone() for v in views], 20, fuse, sums0)
    # a call whose items are all empty launches nothing and changes nothing
    s = sums0.clone()
    T.accumulate(items[2:3], views[2:3], s, True)
    T.subtract(items[5:6], views[5:6], s)
    assert torch.equal(s, sums0)


def test_deterministic_and_independent_of_batching():
    """Same inputs -> same bits; a slot's result does not depend on which other items
    share the call (the reduce sums each slot's partials in a fixed order)."""
    items, compiled = whole_table()
    views = views_for(items, torch.bfloat16, seed=5)
    runs = []
    for _ in range(2):
        vs = [v.clone() for v in views]
        s = torch.zeros(compiled.num_sums, device=DEV)
        T.accumulate(items, vs, s, True)
        runs.append((s, vs))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    for k in (1, 9):  # alone, in a call of its own
        vs = views[k].clone()
        s = torch.zeros(compiled.num_sums, device=DEV)
        T.accumulate(items[k : k + 1], [vs], s, True)
        sl = slice(items[k].sum_start, items[k].sum_start + items[k].num_sums)
        assert torch.equal(s[sl], runs[0][0][sl]) and torch.equal(vs, runs[0][1][k])


def test_negative_control():
    """The comparison catches a wrong mean index and a skipped subtraction."""
    items, compiled = whole_table()
    views = views_for(items, torch.float32, seed=6)
    orig = [v.clone() for v in views]
    s = torch.zeros(compiled.num_sums, device=DEV)
    T.accumulate(items, views, s, True)
    ref_sums, ref_views = oracle(items, orig, torch.zeros(compiled.num_sums), True)
    assert all(values_ok(v, r) for v, r in zip(views, ref_views))
    # skipped subtraction: the untouched inputs fail the same comparison
    assert not all(values_ok(v, r) for v, r in zip(orig, ref_views))
    # a wrong mean index (each channel takes its neighbour's mean) fails too
    shifted = torch.roll(s, 1)
    wrong = subtract_oracle(items, orig, shifted)
    assert not all(values_ok(w.float(), r) for w, r in zip(wrong, ref_views))
    # the kernel given a wrong mean index (every item's sum_start off by one) fails too
    bad = [KernelItem(it.item, it.source, it.start, it.shape, it.sum_start + 1, it.final, it.exclusive, it.count) for it in items]
    vs = [v.clone() for v in orig]
    T.subtract(bad, vs, torch.cat([s, s[:1]]))
    assert not all(values_ok(v, r) for v, r in zip(vs, ref_views))
    # (while a shift applied to both the writes and the reads is harmless: same bits)
    vs = [v.clone() for v in orig]
    s2 = torch.zeros(compiled.num_sums + 1, device=DEV)
    T.accumulate(bad, vs, s2, True)
    assert torch.equal(s2[1:], s) and all(torch.equal(a, b) for a, b in zip(vs, views))
    # and wrong means fail the sums check (compared as sums: mean * count)
    counts = torch.tensor(compiled.counts, dtype=torch.float64)
    a = abs_sums(items, orig, compiled.num_sums)
    assert sums_ok(cpu64(s) * counts, ref_sums * counts, a)
    assert not sums_ok(cpu64(shifted) * counts, ref_sums * counts, a)


class _Counter:
    """Wraps a jit function: counts ``kernel[grid](...)`` launches."""

    def __init__(self, fn, log, name):
        self.fn, self.log, self.name = fn, log, name

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.fn[grid]


def _count_launches(monkeypatch, items, views, nsum):
    K = T._kernels()
    log: list[str] = []
    for name in ("partials", "reduce", "subtract"):
        monkeypatch.setitem(K, name, _Counter(K[name], log, name))
    check_accumulate(items, views, nsum, True)  # (and the results are right)
    acc = list(log)
    log.clear()
    T.subtract(items, views, torch.zeros(nsum, device=DEV))
    return acc, list(log)


def test_launches_do_not_grow_with_tensors(monkeypatch):
    """3 items or 300 (all shape families, one dtype): the same launches."""
    base, _ = whole_table([s for s in SPECS if s[0] in ("rows_short", "last_dim", "tensor_small")])
    big = []
    sum_start = 0
    shapes = [(1, 1, 3, 5), (1, 4, 3, 1), (1, 1, 1, 7), (2, 2, 2, 2), (1, 1, 2, 300), (1, 20, 2, 3)]
    for k in range(300):
        shape = shapes[k % len(shapes)]
        big.append(KernelItem(k, k, 0, shape, sum_start, k % 4 != 0, True, float(shape[1] * shape[3])))
        sum_start += shape[0] * shape[2]
    assert {T._tiling(it.shape, T.CONFIG)[0] for it in big} == {T.COL, T.MID, T.LONG}
    small = _count_launches(monkeypatch, base, views_for(base, torch.float16), sum(it.num_sums for it in base))
    large = _count_launches(monkeypatch, big, views_for(big, torch.float16), sum_start)
    assert small == large == (["partials", "reduce", "subtract"], ["subtract"])
    # mixed dtypes: one partials / subtract launch per dtype, still one reduce
    few = big[:30]
    mixed = _count_launches(monkeypatch, few, views_for(few, [DTYPES[k % 3] for k in range(30)]), sum_start)
    assert sorted(mixed[0]) == sorted(["partials"] * 3 + ["reduce"] + ["subtract"] * 3) and mixed[1] == ["subtract"] * 3


def test_rejects_bad_views():
    items, compiled = whole_table(SPECS[:2])
    views = views_for(items, torch.float32)
    n = compiled.num_sums
    with pytest.raises(ValueError):
        T.accumulate(items, [views[0], views[1][:-1]], torch.zeros(n, device=DEV), False)
    with pytest.raises(ValueError):
        T.accumulate(items, views, torch.zeros(n, dtype=torch.float64, device=DEV), False)
    with pytest.raises(ValueError):
        T.subtract(items, views, torch.zeros(2, device=DEV))
    with pytest.raises(TypeError):
        T.subtract(items, [v.double() for v in views], torch.zeros(n, device=DEV))


def test_available(monkeypatch):
    assert T.available() and T.available(DEV)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not T.available("cpu")
    assert T.available("cuda") == torch.cuda.is_available()
    # without triton: the module still imports, and says it is unavailable
    import dist_gc.kernels as pkg

    monkeypatch.setattr(pkg, "triton", T)  # the import below rebinds it; restored after
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "dist_gc.kernels.triton")
    fresh = importlib.import_module("dist_gc.kernels.triton")
    assert fresh is not T and not fresh.available() and not fresh.available("cpu")
    monkeypatch.setitem(sys.modules, "dist_gc.kernels.triton", T)


_COMPILE = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dist_gc.kernels import _triton_kernels as K
from dist_gc.kernels.triton import CONFIG as c, _NF
tile = dict(NF=_NF, COL_TR=c.col_tr, COL_TQ=c.col_tq, MID_TC=c.mid_tc, MID_TL=c.mid_tl, LONG_TL=c.long_tl)
common = dict(ptrs="*i64", itab="*i64", blocks="*i64", **{k: "constexpr" for k in ["DT", *tile]})
target = GPUTarget("cuda", 90, 32)
for fn, buf in ((K.partials_kernel, "partials"), (K.subtract_kernel, "means")):
    for dt in (tl.float32, tl.bfloat16, tl.float16):
        src = ASTSource(fn=fn, signature={**common, buf: "*fp32"}, constexprs=dict(DT=dt, **tile))
        assert "cubin" in triton.compile(src, target=target, options=dict(num_warps=c.num_warps)).asm
sig = dict(partials="*fp32", sums="*fp32", rslot="*i64", uptr="*i64", rdiv="*fp32", ustart="*i64", ulen="*i64",
           n_slots="i32", FUSE="constexpr", BS="constexpr", RB="constexpr")
for fuse in (False, True):
    src = ASTSource(fn=K.reduce_kernel, signature=sig, constexprs=dict(FUSE=fuse, BS=8, RB=256))
    assert "cubin" in triton.compile(src, target=target, options=dict(num_warps=c.num_warps)).asm
print("compiled")
"""


def test_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter runs the kernels as Python; this compiles them (every dtype, both
    reduce modes) for sm_90 ahead of time, no GPU needed, in a fresh process without
    TRITON_INTERPRET: what the interpreter forgives (types differing between branches,
    unsupported casts) fails here."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # (silences 3.9's notice; the kernels multiply nothing)
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-4000:]
