"""The fused C++ CPU kernel (dist_gc/kernels/gc_cpu.cpp) against the oracle and the
torch ops, on every region shape the layouts build; its build, cache and fallback.

The distributed runs (flat shards over gloo at W=1..4, each kernel) are in
tests/test_engine_dist.py; here everything is in one process."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

from dist_gc.core.centralize import geometry_of
from dist_gc.engine.engine import GCEngine, compile_plans
from dist_gc.engine.layout import plan_flat_shard, plan_whole
from dist_gc.kernels import cpu
from dist_gc.kernels.table import kernel_items
from tests.oracle import oracle_centralize

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (shape, mode, output_dim, batch_dims, groups): rows long and short, a strided output
# dim (1 and last), mode="tensor", a blocked geometry (stacked experts / grouped
# ConvTranspose) and a tensor large enough for the threaded paths (> 2**16 elements).
SHAPES = [
    ((7, 13), "channel", 0, 0, 1), ((5, 3, 4), "channel", 1, 0, 1), ((9, 4, 3), "channel", -1, 0, 1),
    ((33, 70), "tensor", 0, 0, 1), ((600, 300), "channel", 0, 0, 1), ((300, 600), "channel", 1, 0, 1),
    ((3, 700, 130), "tensor", 0, 0, 1), ((4, 6, 5), "channel", 1, 1, 1), ((6, 2, 3, 3), "channel", 1, 0, 3),
    ((2, 3000, 40), "channel", 2, 0, 1), ((5, 40000), "channel", 0, 0, 1),
]


def _grad(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # a per-channel offset, so GC changes every element by far more than the tolerance
    return (torch.randn(shape, generator=g) + torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) * 3).to(dtype)


def _geometry(shape, mode, dim, batch_dims, groups):
    return geometry_of(shape, mode, dim, batch_dims=batch_dims, groups=groups)


def _tol(dtype, x):
    # fp32: the brief's 1e-5. 16-bit: the result is rounded once to the dtype (half an
    # eps relative) after an fp32 mean; eps * max|x| bounds both.
    return 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps * float(x.float().abs().max())


def _engine(plans, grads, kernel):
    return GCEngine(plans, [lambda g=g: g for g in grads], kernel=kernel)


@pytest.fixture(scope="module", autouse=True)
def _built():
    assert cpu.available(), f"the C++ kernel did not build here: {cpu.error()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whole_tensors_match_the_oracle(dtype):
    grads = [_grad(s, dtype, i) for i, (s, *_) in enumerate(SHAPES)]
    want = []
    for g, (s, mode, dim, b, groups) in zip(grads, SHAPES):
        if groups > 1 or b:
            geo = _geometry(s, mode, dim, b, groups)
            v = g.double().reshape(geo.groups, geo.outer, geo.channels, geo.inner)
            want.append((v - v.mean((1, 3), keepdim=True)).reshape(s))
        else:
            want.append(oracle_centralize(g, mode, dim))
    plans = []
    for i, (s, mode, dim, b, groups) in enumerate(SHAPES):
        geo = _geometry(s, mode, dim, b, groups)
        plans.append(plan_whole(f"t{i}", geo, s, (dim % len(s)) if mode == "channel" else None, source=i))
    engine = _engine(plans, grads, "cpu")
    before = [g.clone() for g in grads]
    engine.step()
    assert engine.backend == "cpu"
    assert not engine._rest, "every whole-tensor region fits the kernel table"
    for i, (g, w, b) in enumerate(zip(grads, want, before)):
        err, atol = float((g.double() - w).abs().max()), _tol(dtype, b)
        assert err <= atol, f"{SHAPES[i]} {dtype}: max err {err:.3g} > {atol:.3g}"
        # negative control: GC changed the tensor by far more than the tolerance (20x:
        # the 16-bit tolerance is eps * max|x|, a few % of the per-channel offsets)
        assert float((b.double() - w).abs().max()) > 20 * atol


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-process gloo group, so plans keep their reductions (the all-reduce is then
    the identity: each rank's shard is centralized as if the others held zeros)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("world", [2, 3, 5])
def test_flat_shard_regions_match_the_torch_ops(dtype, world, one_rank_group):
    """Every region a ZeRO-style concatenated shard produces (partial rows, whole rows,
    partial and whole periods, whole groups; final and non-final), kernel vs torch ops,
    on every rank's shard of ``world`` — the same work, compared to rounding. (The
    cross-rank exactness of shards is tests/test_engine_dist.py's, over real ranks.)"""
    shapes = [s for s, *_ in SHAPES]
    flat = torch.cat([_grad(s, dtype, 10 + i).reshape(-1) for i, s in enumerate(shapes)])
    total = flat.numel()
    part = math.ceil(total / world)
    for rank in range(world):
        lo, hi = rank * part, min(total, (rank + 1) * part)
        if lo >= hi:
            continue
        plans, base = [], 0
        for i, (s, mode, dim, b, groups) in enumerate(SHAPES):
            numel = math.prod(s)
            ranges = [(min(max(r * part - base, 0), numel), min(max((r + 1) * part - base, 0), numel)) for r in range(world)]
            plans.append(plan_flat_shard(f"t{i}", _geometry(s, mode, dim, b, groups), ranges=ranges, rank=rank, group=one_rank_group,
                                         source=0, offset=max(0, base - lo) if ranges[rank][1] > ranges[rank][0] else 0))
            base += numel
        buf = flat[lo:hi].clone()
        ref = buf.clone()
        k_engine, t_engine = _engine(plans, [buf], "cpu"), _engine(plans, [ref], "torch")
        k_engine.step()
        t_engine.step()
        assert k_engine.backend == "cpu" and t_engine.backend is None
        items, rest = kernel_items(k_engine.compiled, plans)
        assert not rest and items
        # one rounding of each result apart at most (the kernel's means are fp64-summed)
        tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps * float(ref.float().abs().max())
        err = float((buf.double() - ref.double()).abs().max())
        assert err <= tol, f"rank {rank}/{world} {dtype}: kernel vs torch ops {err:.3g} > {tol:.3g}"
        assert float((buf.double() - flat[lo:hi].double()).abs().max()) > 20 * tol, "GC changed nothing: the test cannot fail"


def test_non_final_items_and_shared_slots():
    """Regions whose means need a collective (non-final) are summed by ``accumulate``
    and subtracted by ``subtract`` after the divide; regions sharing a slot add."""
    s = (6, 50)
    geo = geometry_of(s, "channel", 1)
    # two ranks' shards of one tensor held by one process: every column is split, so its
    # sums come from several regions of this "rank" (shared slots) — summed, then one
    # explicit divide, then subtract.
    g = _grad(s, torch.float32, 3)
    flat = g.reshape(-1).clone()
    plans = [plan_flat_shard("w", geo, ranges=[(0, 130), (130, 300)], rank=0, group=None, source=0, offset=0),
             plan_flat_shard("w", geo, ranges=[(0, 130), (130, 300)], rank=1, group=None, source=0, offset=130)]
    # merge both into one plan whose regions share the tensor's sums
    merged = replace(plans[0], regions=plans[0].regions + plans[1].regions, reductions=(), shard_groups=())
    comp = compile_plans([merged])
    items, rest = kernel_items(comp, [merged])
    assert not rest and any(not it.exclusive for it in items) and not any(it.final for it in items)
    engine = _engine([merged], [flat], "cpu")
    engine.step()
    assert engine.backend == "cpu"
    want = oracle_centralize(g, "channel", 1)
    assert float((flat.view(s).double() - want).abs().max()) <= 1e-5


def test_bit_identical_across_thread_counts():
    """Every sum is one thread's or fixed chunks combined in order: the thread count
    does not change a bit (DDP replicas stay identical)."""
    def run():
        grads = [_grad(s, torch.bfloat16, i) for i, (s, *_) in enumerate(SHAPES)]
        plans = [plan_whole(f"t{i}", _geometry(s, m, d, b, gr), s, (d % len(s)) if m == "channel" else None, source=i)
                 for i, (s, m, d, b, gr) in enumerate(SHAPES)]
        _engine(plans, grads, "cpu").step()
        return grads

    _assert_same_bits_on_1_2_3_threads(run)


def _assert_same_bits_on_1_2_3_threads(run):
    """``run()`` (which builds its inputs afresh and returns its results) gives the same
    bits with 1, 2 and 3 threads."""
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(run())
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_negative_control_a_wrong_table_fails_the_same_check():
    """The comparison above can fail: the kernel run on a table whose means are shifted
    by one slot gives errors far above the tolerance."""
    s = (40, 30)
    g = _grad(s, torch.float32, 5)
    plan = plan_whole("w", geometry_of(s, "channel", 0), s, 0, source=0)
    comp = compile_plans([plan])
    items, _ = kernel_items(comp, [plan])
    wrong = [replace(it, shape=(1, 1, it.shape[2] - 1, it.shape[3])) for it in items]  # drops the last row's mean
    wrong = [replace(wrong[0], sum_start=1)]
    table = cpu.Table(wrong, [torch.float32])
    x = g.clone().reshape(-1)
    sums = torch.zeros(comp.num_sums + 1)
    cpu.accumulate(table, [x[: wrong[0].numel]], sums, True)
    want = oracle_centralize(g, "channel", 0)
    rows_ok = float((x.view(s)[:-1].double() - want[:-1]).abs().max())
    assert rows_ok <= 1e-5  # the rows the table describes are right ...
    assert float((x.view(s).double() - want).abs().max()) > 1e-2  # ... the row it leaves out is not: detected


def test_falls_back_to_torch_ops_for_what_the_kernel_does_not_take():
    s = (8, 6, 3, 3)
    # channels-last (non-contiguous) and fp64 gradients: torch ops, same result
    g = _grad(s, torch.float32, 9).to(memory_format=torch.channels_last)
    want = oracle_centralize(g, "channel", 0)
    plan = plan_whole("w", geometry_of(s, "channel", 0), s, 0, source=0)
    e = _engine([plan], [g], "auto")
    e.step()
    assert e.backend is None and float((g.double() - want).abs().max()) <= 1e-5
    g64 = _grad(s, torch.float64, 9)
    want64 = oracle_centralize(g64, "channel", 0)
    e = _engine([plan], [g64], "auto")
    e.step()
    assert e.backend is None and float((g64 - want64).abs().max()) <= 1e-12
    with pytest.raises(RuntimeError, match=r"kernel='cpu' takes fp32/bf16/fp16 gradients, not \['torch.float64'\]"):
        _engine([plan], [_grad(s, torch.float64, 9)], "cpu").step()


def test_bad_kernel_names_are_refused_naming_the_value(monkeypatch):
    plan = plan_whole("w", geometry_of((3, 4), "channel", 0), (3, 4), 0, source=0)
    with pytest.raises(ValueError, match=r"kernel='cuda' is not a kernel backend \(allowed: auto, torch, cpu, triton\)"):
        GCEngine([plan], [lambda: None], kernel="cuda")
    monkeypatch.setenv("DIST_GC_KERNEL", "fast")
    with pytest.raises(ValueError, match=r"DIST_GC_KERNEL='fast' is not a kernel backend"):
        GCEngine([plan], [lambda: None])


_BUILD = textwrap.dedent("""
    import os, sys, time, warnings, torch
    from dist_gc.kernels import cpu
    from dist_gc.core.centralize import geometry_of
    from dist_gc.engine.engine import GCEngine
    from dist_gc.engine.layout import plan_whole
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ok = cpu.available()
    g = torch.randn(64, 33) + torch.arange(64.0)[:, None]
    want = g - g.mean(1, keepdim=True)
    e = GCEngine([plan_whole("w", geometry_of(g.shape, "channel", 0), g.shape, 0, source=0)], [lambda: g])
    e.step()
    err = float((g - want).abs().max())
    print(ok, e.backend, f"{err:.2e}", f"{time.perf_counter() - t0:.1f}", "|".join(str(x.message) for x in w))
""")


def _run_build(tmp_path, timeout=600, **env):
    full = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), **env}
    full.pop("DIST_GC_KERNEL", None)
    out = subprocess.run([sys.executable, "-c", _BUILD], env=full, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    fields = out.stdout.strip().split(" ", 4)
    return fields + [""] * (5 - len(fields))


def test_cold_build_then_cached(tmp_path):
    """A fresh cache builds the library (seconds: no torch headers); a second process
    loads it from the cache without compiling."""
    ok, backend, err, _, warns = _run_build(tmp_path)
    assert (ok, backend) == ("True", "cpu") and float(err) <= 1e-5, (ok, backend, err, warns)
    built = sorted(p.name for p in (tmp_path / "ext").rglob("*.so"))
    assert built, "no library in the cache"
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "ext").rglob("*.so")}
    ok, backend, err, _, _ = _run_build(tmp_path)
    assert (ok, backend) == ("True", "cpu")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ext").rglob("*.so")} == stamp, "the cached library was rebuilt"


def test_a_failed_build_warns_once_and_falls_back(tmp_path):
    """No working compiler: one warning naming the fix, and the torch ops give the same
    result (the fallback is the tested torch path)."""
    ok, backend, err, _, warns = _run_build(tmp_path, CXX="/bin/false")
    assert (ok, backend) == ("False", "None"), (ok, backend, warns)
    assert float(err) <= 1e-5
    assert "fused CPU kernel could not be built" in warns and "DIST_GC_KERNEL=torch" in warns


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_subtraction_rounds_like_torch(dtype):
    """``x - mean`` is computed in fp32 and rounded once, to nearest even, exactly as
    torch's ``(x.float() - mean).to(dtype)`` (the vector paths and the scalar tails
    alike: 1,000,003 elements); NaN stays NaN, infinities stay infinite."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1_000_003, generator=g) * 3).to(dtype)
    x[5], x[17], x[-2] = float("nan"), float("inf"), -float("inf")
    means = torch.tensor([0.123456789], dtype=torch.float32)
    want = (x.float() - means).to(dtype)
    item = kernel_items(compile_plans([plan_whole("w", geometry_of(x.shape, "tensor"), x.shape, None, source=0)]),
                        [plan_whole("w", geometry_of(x.shape, "tensor"), x.shape, None, source=0)])[0][0]
    got = x.clone()
    cpu.subtract(cpu.Table([replace(item, final=False)], [dtype]), [got], means)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan], want[~nan]), "rounding differs from torch's"


_PORTABLE = textwrap.dedent("""
    import torch
    from dist_gc.kernels import cpu
    from dist_gc.core.centralize import geometry_of
    from dist_gc.engine.engine import GCEngine
    from dist_gc.engine.layout import plan_whole
    assert cpu.available(), cpu.error()
    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape, mode, dim in (((70, 1000), "channel", 0), ((300, 700), "tensor", 0), ((40, 90), "channel", 1)):
            g = (torch.randn(shape) + torch.rand(shape[0], 1) * 3).to(dtype)
            want = g.double() - (g.double().mean() if mode == "tensor" else g.double().mean(1 - dim, keepdim=True))
            e = GCEngine([plan_whole("w", geometry_of(shape, mode, dim), shape, dim if mode == "channel" else None, source=0)], [lambda: g])
            e.step()
            assert e.backend == "cpu"
            tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps * float(want.abs().max() + 3)
            worst = max(worst, float((g.double() - want).abs().max()) / tol)
        x = (torch.randn(100_003) * 3).to(dtype)
        m = torch.tensor([0.3])
        got = x.clone()
        from dist_gc.kernels.table import KernelItem
        cpu.subtract(cpu.Table([KernelItem(0, 0, 0, (1, 1, 1, x.numel()), 0, False, True, 1.0)], [dtype]), [got], m)
        assert torch.equal(got, (x.float() - m).to(dtype)), dtype
    print(worst <= 1.0, worst)
""")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the vector paths are x86 ones")
def test_portable_paths_without_avx512_and_f16c(tmp_path):
    """The scalar/auto-vectorized paths a CPU without AVX-512 or F16C builds (the other
    x86 machines, and the code ARM builds), built here with those features disabled."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "DIST_GC_KERNEL_CFLAGS": "-mno-avx512f -mno-f16c"}
    env.pop("DIST_GC_KERNEL", None)
    out = subprocess.run([sys.executable, "-c", _PORTABLE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[0] == "True", out.stdout


def test_a_lock_left_by_a_dead_builder_does_not_hang(tmp_path):
    """A rank killed mid-build (torchrun, SLURM) leaves torch's build lock behind, and
    torch's builder would wait on it forever. dist_gc builds under its own flock (freed
    by the kernel when its holder dies), so a torch lock found under it is stale: it is
    removed with a warning naming it, and the build goes on."""
    from dist_gc.kernels.cpu import _cpu_tag

    lock = tmp_path / "ext" / f"dist_gc_cpu_{_cpu_tag()}" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    ok, backend, err, _, warns = _run_build(tmp_path, timeout=120)
    assert (ok, backend) == ("True", "cpu") and float(err) <= 1e-5, (ok, backend, warns)
    assert f"removing {lock}" in warns and "left by a kernel build that did not finish" in warns
    # a build killed mid-way (SIGKILL while holding the flock) blocks nobody either
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext2")}
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; d = sys.argv[1]; os.makedirs(d); f = open(os.path.join(d, 'dist_gc.flock'), 'a'); "
        "fcntl.flock(f, fcntl.LOCK_EX); open(os.path.join(d, 'lock'), 'w').close(); print('held', flush=True); time.sleep(600)"),
        str(tmp_path / "ext2" / f"dist_gc_cpu_{_cpu_tag()}")], env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    ok, backend, err, _, warns = _run_build(tmp_path / "x", timeout=120, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext2"))
    assert (ok, backend) == ("True", "cpu"), (ok, backend, warns)


def test_adversarial_cancellation_is_the_same_on_any_thread_count():
    """Values that cancel (|x| up to 2**24 beside small ones) make the order of additions
    visible; the path that sums a tensor depends on its shape only, so 1, 2 and 3
    threads give the same bits (rows: the chunked line path; strided: row chunks)."""
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(4, 131072, generator=g)
    rows[:, ::2] += 2.0**24
    rows[:, 1::2] -= 2.0**24
    strided = torch.randn(16384, 8, generator=g)
    strided[::2] += 2.0**24
    strided[1::2] -= 2.0**24
    def run():
        xs = [rows.clone(), strided.clone()]
        plans = [plan_whole("rows", geometry_of(rows.shape), rows.shape, 0, source=0),
                 plan_whole("strided", geometry_of(strided.shape, "channel", 1), strided.shape, 1, source=1)]
        _engine(plans, xs, "cpu").step()
        return xs

    _assert_same_bits_on_1_2_3_threads(run)


def test_a_gradient_that_changed_shape_raises_naming_it():
    """A Parameter whose ``.data`` was replaced by another shape keeps its identity: the
    engine compares shapes at every step rather than reading the plan's elements."""
    plan = plan_whole("lin.weight", geometry_of((4, 5)), (4, 5), 0, source=0)
    holder = [torch.randn(4, 5)]
    e = _engine([plan], [], "auto")
    e.sources = [lambda: holder[0]]
    e.step()
    for shape in ((4, 6), (5, 4), (2, 10), (20,)):
        holder[0] = torch.randn(shape)
        with pytest.raises(RuntimeError, match=r"the gradient of 'lin.weight' has shape .* but GC was planned for \(4, 5\).*attach again"):
            e.step()


@pytest.mark.parametrize("kernel", ["cpu", "torch"])
def test_non_contiguous_blocked_gradients_are_exact(kernel):
    """A grouped ConvTranspose weight in channels-last (and a transposed stacked-expert
    gradient) is viewed flat by its blocked geometry: it is centralized through a
    contiguous copy and written back."""
    w = _grad((6, 3, 4, 4), torch.float32, 4).to(memory_format=torch.channels_last)
    assert not w.is_contiguous()
    geo = geometry_of(w.shape, "channel", 1, groups=2)
    v = w.double().contiguous().reshape(geo.groups, geo.outer, geo.channels, geo.inner)
    want = (v - v.mean((1, 3), keepdim=True)).reshape(w.shape)
    experts = _grad((4, 16, 8), torch.float32, 5).transpose(1, 2)  # (E, 8, 16), non-contiguous
    egeo = geometry_of(experts.shape, "channel", 1, batch_dims=1)
    ewant = experts.double() - experts.double().mean(2, keepdim=True)
    plans = [plan_whole("deconv.weight", geo, w.shape, 1, source=0), plan_whole("experts", egeo, experts.shape, 1, source=1)]
    _engine(plans, [w, experts], kernel).step()
    assert float((w.double() - want).abs().max()) <= 1e-5
    assert float((experts.double() - ewant).abs().max()) <= 1e-5
    assert not w.is_contiguous()  # written back into the caller's tensor, layout kept
