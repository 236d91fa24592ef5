"""Single-process tests of the GC math and of the flat-shard layouts (no collectives)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from dist_gc import GCConfig, centralize_
from dist_gc.core.centralize import geometry_of
from dist_gc.core.centralize import add_sums_, subtract_means_
from dist_gc.core.select import resolve_targets, detect_output_dims, clean_name
from dist_gc.engine.layout import flat_regions, split_channels
from tests.models import make_model
from tests.oracle import oracle_centralize

SHAPES_DIMS = [((7, 13), 0), ((5, 3, 3, 3), 0), ((5, 4, 2, 2), 1), ((13, 7), -1), ((3, 4, 5), 1), ((6, 1), 0), ((2, 3, 4, 5), 2)]


@pytest.mark.parametrize("mode", ["channel", "tensor"])
@pytest.mark.parametrize("shape,dim", SHAPES_DIMS)
def test_centralize_matches_formula_fp32(shape, dim, mode):
    g = torch.randn(shape) + 0.3
    want = oracle_centralize(g, mode, dim)
    got = centralize_(g.clone(), mode=mode, output_dim=dim)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_centralize_low_precision_computes_in_fp32(dtype):
    g = (torch.randn(64, 257) * 3 + 5).to(dtype)
    want = oracle_centralize(g, "channel", 0)
    got = centralize_(g.clone(), mode="channel", output_dim=0)
    assert got.dtype == dtype
    # Statistics in fp32, result rounded once to `dtype`: error <= half an ulp of the
    # result plus fp32 summation error, i.e. <= eps(dtype) * max|x| with margin.
    eps = torch.finfo(dtype).eps
    tol = eps * float(g.float().abs().max())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)


def test_low_precision_temporaries_are_chunked():
    g = (torch.randn(40, 50) + 1).to(torch.bfloat16)
    ref = g.clone()
    sums = torch.zeros(40, 1)
    add_sums_(g, sums, limit_bytes=8 * 7)  # 7 elements per chunk: forces splitting rows
    torch.testing.assert_close(sums, ref.float().sum(1, keepdim=True), rtol=1e-6, atol=1e-4)
    subtract_means_(g, sums / 50, limit_bytes=8 * 7)
    torch.testing.assert_close(g.double(), oracle_centralize(ref, "channel", 0).to(torch.bfloat16).double(), rtol=0, atol=0.02)


def _brute_split(geo, ranges):
    owners = [set() for _ in range(geo.channels)]
    for r, (s, e) in enumerate(ranges):
        for i in range(s, e):
            owners[(i // geo.inner) % geo.channels].add(r)
    return {c for c, o in enumerate(owners) if len(o) >= 2}


def _random_ranges(numel, world, rng):
    cuts = sorted(rng.randint(0, numel) for _ in range(world - 1))
    b = [0, *cuts, numel]
    return [(b[i], b[i + 1]) for i in range(world)]


@pytest.mark.parametrize("mode", ["channel", "tensor"])
def test_flat_layouts_against_brute_force(mode):
    """Regions of every simulated shard sum to the true channel sums, subtracting the
    true means from each shard reproduces the oracle, and split_channels equals a
    per-element ownership count — for random shapes, output dims and cut points."""
    rng = random.Random(0)
    for trial in range(300):
        ndim = rng.randint(2, 4)
        shape = tuple(rng.randint(1, 5) for _ in range(ndim))
        dim = rng.randrange(-ndim, ndim)
        geo = geometry_of(shape, mode, dim)
        numel = math.prod(shape)
        world = rng.randint(1, 5)
        ranges = _random_ranges(numel, world, rng)
        g = torch.randn(shape, dtype=torch.float64) + 0.5
        flat = g.reshape(-1)
        sums = torch.zeros(geo.channels, dtype=torch.float64)
        pieces = []
        for s, e in ranges:
            buf = torch.cat([torch.zeros(3, dtype=torch.float64), flat[s:e].clone()])  # piece at offset 3
            regs = flat_regions(geo, s, e, 0, 3)
            assert sum(r.stop - r.start for r in regs) == e - s
            for r in regs:
                add_sums_(buf[r.start : r.stop].view(r.shape), sums[r.sum_start : r.sum_stop].view(r.sum_shape))
            pieces.append((buf, regs))
        want = oracle_centralize(g, mode, dim).reshape(-1)
        means = sums / geo.count
        for (s, e), (buf, regs) in zip(ranges, pieces):
            for r in regs:
                subtract_means_(buf[r.start : r.stop].view(r.shape), means[r.sum_start : r.sum_stop].view(r.sum_shape))
            # statistics are fp32 by design (even for fp64 gradients): |err| ~ 1e-7
            torch.testing.assert_close(buf[3:], want[s:e], rtol=0, atol=1e-6)
            assert torch.all(buf[:3] == 0), "a region wrote outside its piece"
        got = set()
        for lo, hi in split_channels(geo, ranges):
            got |= set(range(lo, hi))
        assert got == _brute_split(geo, ranges), (shape, dim, ranges)


def test_output_dim_detection():
    dims = detect_output_dims(make_model())
    assert dims == {"emb.weight": 0, "conv.weight": 0, "deconv.weight": 1, "fc1.weight": 0, "proj.weight": -1, "head.weight": 0}


def test_hf_conv1d_detected_when_transformers_installed():
    pytest.importorskip("transformers", reason="checks the real Hugging Face Conv1D class")
    from transformers.pytorch_utils import Conv1D as HFConv1D

    assert detect_output_dims(torch.nn.Sequential(HFConv1D(8, 4)))["0.weight"] == -1


def test_clean_name_strips_wrappers():
    assert clean_name("module._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.fc.weight") == "layers.0.fc.weight"
    assert clean_name("_orig_mod.fc.weight") == "fc.weight"


def test_selection_rules():
    m = make_model()
    named = [(n, tuple(p.shape)) for n, p in m.named_parameters()]
    t = resolve_targets(named, GCConfig(exclude=["head.*"], output_dim={"fc1.weight": 1}), detect_output_dims(m))
    assert t["head.weight"].geometry is None and "excluded" in t["head.weight"].reason
    assert t["conv.bias"].geometry is None and "min_ndim" in t["conv.bias"].reason
    assert t["fc1.weight"].output_dim == 1 and t["fc1.weight"].geometry.channels == 100
    assert t["deconv.weight"].geometry.channels == 4
    conv_only = resolve_targets(named, GCConfig(min_ndim=4), detect_output_dims(m))
    assert {n for n, x in conv_only.items() if x.geometry} == {"conv.weight", "deconv.weight"}


def test_degenerate_tensor_is_skipped_with_warning_or_rejected():
    named = [("lora_a.weight", (8, 1)), ("fc.weight", (4, 3))]
    with pytest.warns(UserWarning, match="lora_a.weight"):
        t = resolve_targets(named, GCConfig(), {})
    assert t["lora_a.weight"].geometry is None and t["fc.weight"].geometry is not None
    with pytest.raises(ValueError, match="skip_degenerate"):
        resolve_targets(named, GCConfig(skip_degenerate=False), {})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["channel", "tensor"])
def test_engine_batches_small_tensors_exactly(dtype, mode):
    """Runs of small whole tensors with a common segment length are centralized as one
    batch; results equal the formula, also when a gradient is missing (fallback)."""
    from dist_gc.engine.engine import GCEngine
    from dist_gc.engine.layout import plan_whole

    shapes = [(8, 16)] * 5 + [(16, 8)] + [(8, 16)] * 3 + [(3, 4, 5)] * 2
    gen = torch.Generator().manual_seed(3)
    for missing in (None, 2):
        grads = [torch.randn(s, generator=gen).add_(0.5).to(dtype) for s in shapes]
        ref = [g.double() for g in grads]
        plans = [plan_whole(f"w{k}", geometry_of(s, mode, 0), s, 0 if mode == "channel" else None, source=k) for k, s in enumerate(shapes)]
        engine = GCEngine(plans, [lambda k=k: None if k == missing else grads[k] for k in range(len(shapes))])
        assert len(engine.compiled.batches) >= 2 if mode == "channel" else len(engine.compiled.batches) >= 1  # the path under test
        stats = engine.step()
        for k, (g, r) in enumerate(zip(grads, ref)):
            want = r if k == missing else oracle_centralize(r, mode, 0)
            # Means and subtraction in fp32, result rounded once to the 16-bit dtype:
            # |err| <= u * |G - mean| with u = eps/2; bound by eps * max|G| (2x margin).
            tol = torch.finfo(dtype).eps * float(r.abs().max())
            torch.testing.assert_close(g.double(), want, rtol=0, atol=tol, msg=lambda m, k=k: f"tensor {k}: {m}")
        # Naive (no-op) GC would miss by far more than the tolerance.
        assert max(float((r - oracle_centralize(r, mode, 0)).abs().max()) for r in ref) > 10 * tol
        assert stats.max_abs_mean_before > 0.1


def _brute_split_blocked(geo, ranges):
    owners = [set() for _ in range(geo.num_channels)]
    for r, (s, e) in enumerate(ranges):
        for i in range(s, e):
            owners[(i // geo.group_numel) * geo.channels + (i // geo.inner) % geo.channels].add(r)
    return {c for c, o in enumerate(owners) if len(o) >= 2}


def _blocked_oracle(g: torch.Tensor, geo) -> torch.Tensor:
    """One mean per (group, channel) of the (groups, outer, channels, inner) view."""
    x = g.double().reshape(geo.groups, geo.outer, geo.channels, geo.inner)
    return (x - x.mean((1, 3), keepdim=True)).reshape(g.shape)


@pytest.mark.parametrize("kind", ["batch_dims", "groups"])
def test_blocked_flat_layouts_against_brute_force(kind):
    """Blocked geometries — stacked experts (leading batch dims) and grouped
    ConvTranspose weights (dim 0 = (groups, in/groups), output dim 1) — on random flat
    shards: regions reproduce the per-(group, channel) oracle and split_channels the
    per-element ownership count."""
    rng = random.Random(1)
    for trial in range(300):
        if kind == "batch_dims":
            shape = (rng.randint(1, 4), rng.randint(1, 5), rng.randint(1, 5)) + ((rng.randint(1, 3),) if rng.random() < 0.5 else ())
            mode = rng.choice(["channel", "tensor"])
            geo = geometry_of(shape, mode, 1, batch_dims=1)
        else:
            groups = rng.randint(2, 3)
            shape = (groups * rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 3)) + ((rng.randint(1, 2),) if rng.random() < 0.5 else ())
            mode = "channel"
            geo = geometry_of(shape, "channel", 1, groups=groups)
        assert geo.numel == math.prod(shape)
        ranges = _random_ranges(geo.numel, rng.randint(1, 5), rng)
        g = torch.randn(shape, dtype=torch.float64) + torch.arange(shape[0], dtype=torch.float64).view(-1, *[1] * (len(shape) - 1))
        flat = g.reshape(-1)
        sums = torch.zeros(geo.num_channels, dtype=torch.float64)
        pieces = []
        for s, e in ranges:
            buf = torch.cat([torch.zeros(2, dtype=torch.float64), flat[s:e].clone()])
            regs = flat_regions(geo, s, e, 0, 2)
            assert sum(r.stop - r.start for r in regs) == e - s
            for r in regs:
                add_sums_(buf[r.start : r.stop].view(r.shape), sums[r.sum_start : r.sum_stop].view(r.sum_shape))
            pieces.append((buf, regs))
        want = _blocked_oracle(g, geo).reshape(-1)
        for (s, e), (buf, regs) in zip(ranges, pieces):
            for r in regs:
                subtract_means_(buf[r.start : r.stop].view(r.shape), (sums / geo.count)[r.sum_start : r.sum_stop].view(r.sum_shape))
            torch.testing.assert_close(buf[2:], want[s:e], rtol=0, atol=1e-9)
            assert torch.all(buf[:2] == 0), "a region wrote outside its piece"
        got = set()
        for lo, hi in split_channels(geo, ranges):
            got |= set(range(lo, hi))
        assert got == _brute_split_blocked(geo, ranges), (kind, shape, ranges)


def test_grouped_block_plan_when_dim0_is_not_sharded():
    """A grouped ConvTranspose weight cut on dim 2 (not on its grouped dim 0): the local
    block is viewed as (groups, in_g, out_g, k) and the partial sums completed over the
    cutting axis reproduce the oracle; cut on dim 0 by two axes it is refused."""
    from dist_gc.engine.layout import ShardAxis, plan_block

    g = torch.randn(6, 2, 4, dtype=torch.float64) + torch.arange(2, dtype=torch.float64).view(1, 2, 1)
    geo = geometry_of(g.shape, "channel", 1, groups=3)
    halves = [g[:, :, :2].contiguous(), g[:, :, 2:].contiguous()]
    plans = [plan_block("w", geo, shape=g.shape, local_shape=h.shape, kept_dims=(1,), grouped_dim=0,
                        shard_axes=(ShardAxis("tp", 2, size=2, index=i),), source=0) for i, h in enumerate(halves)]
    assert all(red.group == "tp" for p in plans for red in p.reductions)
    sums = [torch.zeros(p.num_sums, dtype=torch.float64) for p in plans]
    for h, p, s in zip(halves, plans, sums):
        (r,) = p.regions
        add_sums_(h.view(-1)[r.start : r.stop].view(r.shape), s[r.sum_start : r.sum_stop].view(r.sum_shape))
    total = (sums[0] + sums[1]) / geo.count  # the all-reduce over "tp"
    want = _blocked_oracle(g, geo)
    for i, (h, p) in enumerate(zip(halves, plans)):
        (r,) = p.regions
        subtract_means_(h.view(-1)[r.start : r.stop].view(r.shape), total[r.sum_start : r.sum_stop].view(r.sum_shape))
        torch.testing.assert_close(h, want[:, :, 2 * i : 2 * i + 2], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="grouped ConvTranspose"):
        plan_block("w", geo, shape=g.shape, local_shape=(3, 2, 4), kept_dims=(1,), grouped_dim=0, source=0,
                   shard_axes=(ShardAxis("a", 0, size=2), ShardAxis("b", 0, size=1)))
