"""Single-process tests of the :class:`~dist_gc.engine.layout.Split` placement (a
tensor-parallel piece, itself whole or flat-partitioned over a data-parallel group)
against a brute-force oracle: every simulated rank plans with the real planner code,
sums its regions, the simulated collectives sum the reductions' slices over the group
members exactly as the engine issues them (one per group, in the order plans name
them), and the centralized pieces, stitched back together, must equal the
single-process formula."""

from __future__ import annotations

import math
import random

import pytest
import torch

from dist_gc import GCConfig
from dist_gc.core.select import Role, resolve_targets
from dist_gc.engine.layout import FlatShard, Split, TensorLayout, Whole, plan_tensor
from tests.oracle import oracle_centralize


def _cuts(n: int, parts: int, rng: random.Random, even: bool) -> list[int]:
    if even and n % parts == 0:
        return [n // parts] * parts
    cuts = sorted(rng.randint(0, n) for _ in range(parts - 1))
    b = [0, *cuts, n]
    return [b[i + 1] - b[i] for i in range(parts)]


def _simulate(g: torch.Tensor, target, dim: int, sizes: list[int], dp: int, rng: random.Random, whole: bool, drop: str = ""):
    """Centralize ``g`` as ``len(sizes) x dp`` simulated ranks would; returns (result, plans).
    ``drop="tp"``: the negative control, the collectives over the TP group left out."""
    tp = len(sizes)
    pieces = torch.split(g, sizes, dim=dim)
    ranks = [(t, j) for t in range(tp) for j in range(dp)]
    # Random flat cuts of each TP piece over its dp group: the same for every member of
    # one dp group; different dp groups cut differently (uneven pieces give different
    # ZeRO partitions).
    cuts = []
    for t in range(tp):
        c = _cuts(pieces[t].numel(), dp, rng, even=False)
        bounds = [0, *[sum(c[: k + 1]) for k in range(dp)]]
        cuts.append(tuple((bounds[k], bounds[k + 1]) for k in range(dp)))
    state = {}
    for t, j in ranks:
        if whole:
            buf, inner = pieces[t].clone(), Whole(0)
        else:
            s, e = cuts[t][j]
            buf = torch.cat([torch.zeros(2, dtype=g.dtype), pieces[t].reshape(-1)[s:e].clone()])  # the piece at offset 2
            inner = FlatShard(0, 2, cuts[t], j, ("dp", t))
        layout = TensorLayout("w", tuple(g.shape), Split(("tp", j), dim, tuple(sizes), t, inner))
        plan = plan_tensor(layout, target)
        sums = torch.zeros(plan.num_sums, dtype=torch.float64)
        for r in plan.regions:
            view = buf if r.shape is None else buf.view(-1)[r.start : r.stop].view(r.shape)
            dims = tuple(i for i, b in enumerate(r.sum_shape) if b == 1)
            sums[r.sum_start : r.sum_stop].view(r.sum_shape).add_(view.double().sum(dims, keepdim=True) if dims else view.double())
        state[(t, j)] = {"plan": plan, "buf": buf, "sums": sums}
    # Collectives: per rank, one message per group in first-appearance order (the engine's buckets).
    order = {}
    for rk, st in state.items():
        buckets: dict = {}
        for red in st["plan"].reductions:
            if red.group[0] == drop:
                continue
            buckets.setdefault(red.group, []).append((red.sum_start, red.sum_stop))
        order[rk] = list(buckets.items())
    # Run them like blocking collectives: a group's all-reduce completes once each of
    # its members has it next in line; anything else is a hang (or mismatched sizes).
    def members(group) -> list:
        return [rk for rk in ranks if rk[0 if group[0] == "dp" else 1] == group[1]]

    pending = {rk: list(v) for rk, v in order.items()}
    while any(pending.values()):
        ready = {pending[rk][0][0] for rk in ranks if pending[rk]}
        ready = [g for g in ready if all(pending[m] and pending[m][0][0] == g for m in members(g))]
        assert ready, f"the simulated collectives hang: {pending}"
        for group in ready:
            rks = members(group)
            slices = [pending[rk].pop(0)[1] for rk in rks]
            assert len({tuple(hi - lo for lo, hi in sl) for sl in slices}) == 1, f"message sizes differ over {group}"
            msgs = [torch.cat([state[rk]["sums"][lo:hi] for lo, hi in sl]) for rk, sl in zip(rks, slices)]
            total = torch.stack(msgs).sum(0)
            for rk, sl in zip(rks, slices):
                pos = 0
                for lo, hi in sl:
                    state[rk]["sums"][lo:hi] = total[pos : pos + hi - lo]
                    pos += hi - lo
    # Subtract the means; stitch the pieces back together.
    out_pieces = []
    for t in range(tp):
        flat = []
        for j in range(dp):
            st = state[(t, j)]
            plan, buf = st["plan"], st["buf"]
            means = st["sums"] / plan.elements_per_mean
            for r in plan.regions:
                view = buf if r.shape is None else buf.view(-1)[r.start : r.stop].view(r.shape)
                view.sub_(means[r.sum_start : r.sum_stop].view(r.sum_shape).to(view.dtype))
            flat.append(buf.reshape(-1) if whole else buf[2:])
        out_pieces.append(torch.cat([f.reshape(-1) for f in flat]).view(pieces[t].shape))
    return torch.cat(out_pieces, dim=dim), [state[rk]["plan"] for rk in ranks]


@pytest.mark.parametrize("mode", ["channel", "tensor"])
def test_split_layouts_against_brute_force(mode):
    """Random shapes, output dims, batch dims, split dims, uneven TP sizes (empty pieces
    included), dp partitions with random cuts, whole pieces: the planned GC equals the
    formula; a split along an averaged dim reduces over the TP group, one along a kept
    dim never does."""
    rng = random.Random(12)
    seen = {"kept": 0, "averaged": 0}
    controls = 0
    for trial in range(400):
        ndim = rng.randint(2, 4)
        shape = tuple(rng.randint(1, 5) for _ in range(ndim))
        batch = rng.choice([0, 0, 0, 1]) if ndim >= 3 else 0
        out_dim = rng.randrange(batch, ndim)
        dim = rng.randrange(ndim)
        tp = rng.randint(1, 3)
        sizes = _cuts(shape[dim], tp, rng, even=rng.random() < 0.5)
        dp = rng.randint(1, 3)
        whole = dp == 1 and rng.random() < 0.5
        cfg = GCConfig(mode=mode, batch_dims={"w": batch} if batch else {}, skip_degenerate=False, allow_empty=True)
        try:
            target = resolve_targets([("w", shape)], cfg, {"w": Role("test", out_dim)})["w"]
        except ValueError:
            continue  # degenerate (single-element means): not this test's subject
        if target.geometry is None:
            continue
        g = torch.randn(shape, dtype=torch.float64) + 0.5
        state = rng.getstate()
        got, plans = _simulate(g.clone(), target, dim, sizes, dp, rng, whole)
        want = oracle_centralize(g, mode, out_dim) if not batch else _oracle_batched(g, mode, out_dim, batch)
        # sums in fp64 here: only the layout can make an error
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=lambda m: f"{shape} out {out_dim} batch {batch} split {dim} {sizes} dp {dp}: {m}")
        kept = dim in target.kept_dims
        seen["kept" if kept else "averaged"] += 1
        if not kept and min(sizes) > 0 and tp > 1 and target.geometry.count > 1:
            # Negative control: the same plans without the TP all-reduce (each TP rank
            # centralizing its own piece, as GC unaware of tensor parallelism would).
            rng.setstate(state)
            naive, _ = _simulate(g.clone(), target, dim, sizes, dp, rng, whole, drop="tp")
            assert float((naive - want).abs().max()) > 1e-3, (shape, dim, sizes)
            controls += 1
        over_tp = any(red.group[0] == "tp" for p in plans for red in p.reductions)
        assert over_tp == (not kept and tp > 1), (shape, dim, target.kept_dims, tp)
        if tp > 1:
            assert all(("tp", j) in p.shard_groups for p, (t, j) in zip(plans, [(t, j) for t in range(tp) for j in range(dp)])), \
                "statistics must be summed over the TP group"
    assert seen["averaged"] > 50 and seen["kept"] > (50 if mode == "channel" else 10), seen
    assert controls > 50, controls


def _oracle_batched(g: torch.Tensor, mode: str, out_dim: int, batch: int) -> torch.Tensor:
    flat = g.reshape(-1, *g.shape[batch:])
    out = torch.stack([oracle_centralize(x, mode, out_dim - batch) for x in flat])
    return out.view(g.shape)


def test_split_refuses_what_it_cannot_plan():
    target = resolve_targets([("w", (4, 6))], GCConfig(), {"w": Role("test", 0)})["w"]
    bad = TensorLayout("w", (4, 6), Split(("tp", 0), 1, (2, 2), 0, Whole(0)))  # 2 + 2 != 6
    with pytest.raises(ValueError, match="does not fit its global shape"):
        plan_tensor(bad, target)
    deconv = resolve_targets([("d", (4, 3, 2))], GCConfig(), {"d": Role("ConvTranspose1d.weight (groups=2)", 1, groups=2)})["d"]
    with pytest.raises(ValueError, match="grouped ConvTranspose"):
        plan_tensor(TensorLayout("d", (4, 3, 2), Split(("tp", 0), 0, (2, 2), 0, Whole(0))), deconv)


def test_row_parallel_message_size():
    """A row-parallel (dim-1 split) weight reduces all its output channels over the
    data-parallel group and over the TP group: 2 x out channels, whatever its size."""
    target = resolve_targets([("w", (8, 12))], GCConfig(), {"w": Role("Linear.weight", 0)})["w"]
    layout = TensorLayout("w", (8, 12), Split(("tp", 0), 1, (6, 6), 0, FlatShard(0, 0, ((0, 20), (20, 48)), 0, ("dp", 0))))
    plan = plan_tensor(layout, target)
    assert [(r.group, r.sum_stop - r.sum_start) for r in plan.reductions] == [(("dp", 0), 8), (("tp", 0), 8)]
    assert plan.elements_per_mean == 12 and plan.geometry.count == 6
    col = TensorLayout("w", (8, 12), Split(("tp", 0), 0, (4, 4), 0, FlatShard(0, 0, ((0, 30), (30, 48)), 0, ("dp", 0))))
    plan = plan_tensor(col, target)
    # whole output channels per TP rank: only the row the dp cut splits, nothing over TP
    assert [(r.group, r.sum_start, r.sum_stop) for r in plan.reductions] == [(("dp", 0), 2, 3)] and plan.num_sums == 4
    assert plan.geometry.numel == math.prod((4, 12)) and plan.elements_per_mean == 12
