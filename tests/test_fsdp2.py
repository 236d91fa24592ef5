"""FSDP2 (fully_shard) and DTensor tensor parallelism on CPU/gloo: exact GC against the
single-process oracle at W = 2, 3, 4.

One spawn per world size runs every case: Shard(0) (nested fully_shard), a
``shard_placement_fn`` that shards dim 1, and at W=4 HSDP (2x2 mesh, Replicate x Shard)
and FSDP2 + TP (2x2 mesh, ColwiseParallel / RowwiseParallel) — each in channel and
tensor mode, with and without clipping, each with two negative controls (naive GC on the
DTensor gradients and on their local shards) — plus bf16 mixed precision and a bf16
model. Shard(0) in channel mode must communicate zero bytes.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, replace

import pytest
import torch

import dist_gc
from tests import models
from tests.fsdp_common import (
    FP32_TOL,
    assert_fails,
    assert_gc_matters,
    assert_matches,
    check_mixed_precision,
    naive_hook,
    oracle_grads,
    oracle_norm,
    oracle_params,
    snapshot_hook,
)
from tests.harness import run_distributed

CLIP_FRACTION = 0.5
ZERO_TRAFFIC_EXCLUDE = ("deconv.weight", "proj.weight")
#: (bytes, collectives) per step for GCTestNet under Shard(0) (and HSDP, whose replicate
#: axis never carries statistics): channel mode sends the per-channel sums of the two
#: tensors whose output dim is not dim 0 — ConvTranspose (4 channels) and Conv1D
#: (7 channels) — as fp32: 4 * (4 + 7) = 44 bytes; tensor mode one fp32 sum for each of
#: the 6 weights: 24 bytes; both in ONE all-reduce.
EXPECTED_SHARD0_TRAFFIC = {"channel": (44, 1), "tensor": (24, 1)}


@dataclass(frozen=True)
class Case:
    layout: str  # shard0 | shard1 | hsdp | tp
    mode: str
    clip: float | None = None
    variant: str = "gc"  # gc | naive | local | none
    mp: str | None = None  # None | "bf16" (reduce fp32) | "bf16-reduce" | "bf16-model"
    exclude: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        parts = [self.layout, self.mode] + ([f"clip={self.clip:.3g}"] if self.clip else []) + ([self.mp] if self.mp else [])
        parts += [f"exclude={','.join(self.exclude)}"] if self.exclude else []
        return "/".join(parts + [self.variant])

    @property
    def dims(self) -> dict[str, int]:
        """Output dims of the tensors the oracle centralizes."""
        return {n: d for n, d in _model(self.model_name)[3].items() if n not in self.exclude}

    @property
    def model_name(self) -> str:
        return "tp" if self.layout == "tp" else "net"

    @property
    def readout(self) -> bool:
        return self.mp is not None


def _model(name: str, dtype: torch.dtype = torch.float32):
    if name == "net":
        return models.make_model(dtype=dtype), models.make_batch(dtype=dtype), models.loss_on, models.GCTestNet.OUTPUT_DIMS
    return models.make_tpnet(dtype=dtype), models.make_tp_batch(), models.tp_loss_on, models.TPNet.OUTPUT_DIMS


def _clip_for(name: str) -> float:
    model, batch, loss_on, _ = _model(name)
    return CLIP_FRACTION * oracle_norm(model, lambda m: loss_on(m, batch))


def cases_for(world_size: int) -> list[Case]:
    layouts = ["shard0", "shard1"] + (["hsdp", "tp"] if world_size == 4 else [])
    out: list[Case] = []
    for layout, mode in itertools.product(layouts, ("channel", "tensor")):
        for clip in (None, _clip_for("tp" if layout == "tp" else "net")):
            base = Case(layout, mode, clip)
            out += [base, replace(base, variant="naive"), replace(base, variant="local")]
    for mode, mp in itertools.product(("channel", "tensor"), ("bf16", "bf16-reduce", "bf16-model")):
        out += [Case("shard0", mode, mp=mp), Case("shard0", mode, mp=mp, variant="none")]
    # The zero-communication fast path: Shard(0) in channel mode with only output-dim-0
    # weights selected (ConvTranspose and Conv1D are cut on an averaged dim by Shard(0)).
    # No negative control here: local GC IS exact on this layout — that is the point.
    for layout in ("shard0", "hsdp") if world_size == 4 else ("shard0",):
        out.append(Case(layout, "channel", exclude=ZERO_TRAFFIC_EXCLUDE))
    return out


# ----------------------------------------------------------------------------- workers
_MESHES: dict = {}


def _mesh(world_size: int, kind: str):
    from torch.distributed.device_mesh import init_device_mesh

    if kind not in _MESHES:
        if kind == "1d":
            _MESHES[kind] = init_device_mesh("cpu", (world_size,))
        else:  # 2x2: HSDP (replicate, shard) or FSDP + TP (dp, tp)
            _MESHES[kind] = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("outer", "inner"))
    return _MESHES[kind]


def _shard_dim1_where_even(world_size: int):
    from torch.distributed.tensor import Shard

    # FSDP2 requires even sharding on a non-zero dim (used e.g. for MoE experts).
    return lambda p: Shard(1) if p.dim() >= 2 and p.shape[1] % world_size == 0 else None


def _build(case: Case, rank: int, world_size: int):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = torch.bfloat16 if case.mp == "bf16-model" else torch.float32
    model, batch, loss_on, _ = _model(case.model_name, dtype)
    kw = {}
    if case.mp in ("bf16", "bf16-reduce"):
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32 if case.mp == "bf16" else torch.bfloat16)
    if case.layout == "tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = _mesh(world_size, "2d")
        parallelize_module(model, mesh["inner"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(model, mesh=mesh["outer"], **kw)
        dp_rank, dp_size = mesh.get_coordinate()[0], 2  # TP ranks see the same data
        return model, models.local_slice(batch, dp_rank, dp_size), loss_on
    mesh = _mesh(world_size, "2d" if case.layout == "hsdp" else "1d")
    if case.layout == "shard1":
        kw["shard_placement_fn"] = _shard_dim1_where_even(world_size)
    for sub in (model.conv, model.fc1):  # nested: bottom-up groups, then the root
        fully_shard(sub, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model, models.local_slice(batch, rank, world_size), loss_on


def _clip_(params, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ on DTensors; FSDP2 + TP puts parameters on two
    meshes (2-D for TP'd layers, 1-D dp for the rest), which torch's helper cannot stack,
    so the norms are made plain first (same formula: max_norm / (total + 1e-6))."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = [torch.linalg.vector_norm(g) for g in grads]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    with torch.no_grad():
        for g in grads:
            g.mul_(coef)
    return float(total)


def _run_case(rank: int, world_size: int, case: Case) -> dict:
    model, batch, loss_on = _build(case, rank, world_size)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = None
    if case.variant == "gc":
        handle = dist_gc.attach(opt, model=model, config=dist_gc.GCConfig(mode=case.mode, exclude=list(case.exclude)))
    elif case.variant in ("naive", "local"):
        opt.register_step_pre_hook(naive_hook(case.variant))
    snap: dict[int, torch.Tensor] = {}
    if case.readout:
        opt.register_step_pre_hook(snapshot_hook(snap))
    loss_on(model, batch).backward()
    if case.clip:
        if case.layout == "tp":
            norm = _clip_(list(model.parameters()), case.clip)
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), case.clip).full_tensor())
    else:
        norm = None
    opt.step()
    out = {"norm": norm}
    if handle is not None:
        out.update(bytes=handle.stats.bytes_communicated, collectives=handle.stats.collectives, engine=handle.label)
    out["params"] = {n: p.full_tensor().detach().double() for n, p in model.named_parameters()}
    if case.readout:
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().copy_(snap[id(p)].to_local())
        out["grads"] = {n: p.full_tensor().detach().double() for n, p in model.named_parameters()}
        out["grad_dtype"] = str(next(iter(snap.values())).dtype)
    return out


def _refusals(rank: int, world_size: int) -> dict[str, str]:
    """Layouts dist_gc cannot handle raise, naming the parameter and the placement."""
    from torch.distributed.tensor import DTensor, Partial

    mesh = _mesh(world_size, "1d")
    p = torch.nn.Parameter(DTensor.from_local(torch.ones(3, 4), mesh, [Partial()]))
    try:
        dist_gc.attach(torch.optim.SGD([p], lr=1.0), config=dist_gc.GCConfig())
    except ValueError as exc:
        return {"partial": str(exc)}
    return {"partial": ""}


def fsdp2_worker(rank: int, world_size: int, cases: list[Case]) -> dict:
    warnings.filterwarnings("ignore", category=UserWarning)  # FSDP2 view-output / DTensor notes
    results = []
    for case in cases:
        try:
            r = _run_case(rank, world_size, case)
        except Exception as exc:
            raise RuntimeError(f"case {case.id} failed on rank {rank}") from exc
        if rank != 0:
            r.pop("params"), r.pop("grads", None)
        results.append(r)
    return {"results": results, "refusals": _refusals(rank, world_size)}


# ----------------------------------------------------------------------------- checks
def _check(cases: list[Case], per_rank: list[dict]) -> None:
    cache: dict = {}

    def oracle(case: Case, kind: str, gc: bool = True):
        key = (case.model_name, case.mode if gc else None, case.clip, case.exclude, kind)
        if key not in cache:
            model, batch, loss_on, _ = _model(case.model_name)
            fn = lambda m: loss_on(m, batch)  # noqa: E731
            mode = case.mode if gc else None
            cache[key] = oracle_params(model, fn, case.dims, mode, case.clip) if kind == "params" else oracle_grads(model, fn, case.dims, mode, case.clip)
        return cache[key]

    by_id = {c.id: (c, [r["results"][i] for r in per_rank]) for i, c in enumerate(cases)}
    for case, results in by_id.values():
        r0 = results[0]
        if case.clip:
            assert r0["norm"] > case.clip, f"{case.id}: clipping was not active"
        if case.variant == "gc" and not case.readout:
            assert_matches(case.id, r0["params"], oracle(case, "params"), **FP32_TOL)
        elif case.variant in ("naive", "local"):
            assert_fails(case.id, r0["params"], oracle(case, "params"))
        if case.variant == "gc":
            _check_traffic(case, results)
        if case.readout and case.variant == "gc":
            none = by_id[replace(case, variant="none").id][1][0]
            check_mixed_precision(case.id, r0, none, case.dims, case.mode, oracle(case, "grads", gc=False))
    for r in per_rank:
        msg = r["refusals"]["partial"]
        assert "'0'" in msg or "param_groups[0][0]" in msg, f"Partial placement was not refused naming the parameter: {msg!r}"
        assert "Partial" in msg, f"refusal does not name the placement: {msg!r}"


def _check_traffic(case: Case, results: list[dict]) -> None:
    got = [(r["bytes"], r["collectives"]) for r in results]
    if case.exclude:
        assert set(got) == {(0, 0)}, f"{case.id}: Shard(0) channel GC must not communicate, got (bytes, collectives) {got}"
    elif case.layout in ("shard0", "hsdp"):
        want = EXPECTED_SHARD0_TRAFFIC[case.mode]
        assert set(got) == {want}, f"{case.id}: expected (bytes, collectives) {want} on every rank, got {got}"
    elif case.layout == "shard1":
        # Sizes depend on which dims W divides; every rank of the one group agrees.
        assert len(set(got)) == 1 and got[0][1] == 1, f"{case.id}: expected equal traffic in ONE all-reduce, got {got}"
    else:
        # FSDP + TP: one all-reduce over the TP axis (RowwiseParallel cuts dim 1) and one
        # over the FSDP axis (Conv1D's averaged dim 0, and all axes in tensor mode).
        assert {c for _, c in got} == {2}, f"{case.id}: expected one all-reduce per mesh axis, got {got}"


# ----------------------------------------------------------------------------- layout
def _simulate_blocks(shape, mesh_shape, cuts, rng):
    """Per mesh coordinate, the index set held along every tensor dim: each mesh axis
    ``a`` with ``cuts[a] = d`` splits the indices that earlier axes left on dim ``d``
    into ``mesh_shape[a]`` random (possibly empty, non-contiguous) subsets — the
    product structure shared by Shard and _StridedShard; ``None`` = Replicate."""
    coords = list(itertools.product(*[range(n) for n in mesh_shape]))
    splits = {}  # (axis, coords of earlier axes cutting the same dim) -> list of subsets

    def subset(coord, d):
        idx = list(range(shape[d]))
        for a, cut in enumerate(cuts):
            if cut != d:
                continue
            key = (a, tuple(coord[b] for b in range(a) if cuts[b] == d))
            if key not in splits:
                owner = [rng.randrange(mesh_shape[a]) for _ in idx]
                splits[key] = [[i for i, o in zip(idx, owner) if o == c] for c in range(mesh_shape[a])]
            idx = splits[key][coord[a]]
        return idx

    return {c: [subset(c, d) for d in range(len(shape))] for c in coords}


@pytest.mark.parametrize("mode", ["channel", "tensor"])
def test_plan_block_against_brute_force(mode):
    """plan_block on simulated N-D blocks (random meshes of up to 3 axes, each axis
    cutting a random dim or replicating, random non-contiguous splits): local sums,
    reductions summed over each group in axis order (what the engine's all-reduces do),
    then subtracting the means reproduces the oracle on every rank."""
    import random

    from dist_gc.core.centralize import add_sums_, geometry_of, normalize_dim, subtract_means_
    from dist_gc.engine.layout import ShardAxis, plan_block
    from tests.oracle import oracle_centralize

    rng = random.Random(0)
    for trial in range(200):
        ndim = rng.randint(2, 4)
        shape = tuple(rng.randint(1, 5) for _ in range(ndim))
        k = normalize_dim(rng.randrange(-ndim, ndim), ndim)
        mesh_shape = tuple(rng.randint(1, 3) for _ in range(rng.randint(1, 3)))
        cuts = [rng.choice([None, *range(ndim)]) for _ in mesh_shape]
        g = torch.randn(shape, dtype=torch.float64) + 0.5
        geo = geometry_of(shape, mode, k)
        blocks = _simulate_blocks(shape, mesh_shape, cuts, rng)
        state = {}
        for coord, idx in blocks.items():
            local = g
            for d, ix in enumerate(idx):
                local = local.index_select(d, torch.tensor(ix, dtype=torch.long))
            # A group = the ranks that differ only in axis a's coordinate.
            groups = [ShardAxis((a, coord[:a] + coord[a + 1 :]), d) for a, d in enumerate(cuts) if d is not None]
            plan = plan_block("t", geo, shape=shape, local_shape=local.shape, kept_dims=(k,) if mode == "channel" else (), shard_axes=groups, source=0)
            sums = torch.zeros(plan.num_sums, dtype=torch.float64)
            for r in plan.regions:
                add_sums_(local, sums[r.sum_start : r.sum_stop].view(r.sum_shape))
            state[coord] = (local, idx, plan, sums)
        for a in range(len(mesh_shape)):  # one all-reduce per mesh axis, in axis order
            totals: dict = {}
            for coord, (_, _, plan, sums) in state.items():
                for red in plan.reductions:
                    if red.group[0] == a:
                        totals[red.group] = totals.get(red.group, 0) + sums[red.sum_start : red.sum_stop]
            for coord, (_, _, plan, sums) in state.items():
                for red in plan.reductions:
                    if red.group[0] == a:
                        sums[red.sum_start : red.sum_stop] = totals[red.group]
        want = oracle_centralize(g, mode, k)
        for coord, (local, idx, plan, sums) in state.items():
            for r in plan.regions:
                subtract_means_(local, (sums / geo.count)[r.sum_start : r.sum_stop].view(r.sum_shape))
            expect = want
            for d, ix in enumerate(idx):
                expect = expect.index_select(d, torch.tensor(ix, dtype=torch.long))
            torch.testing.assert_close(local, expect, rtol=0, atol=1e-6, msg=lambda m: f"trial {trial}: {shape} dim {k} mesh {mesh_shape} cuts {cuts} at {coord}: {m}")


# ----------------------------------------------------------------------------- tests
def test_gc_changes_every_weight_update():
    model, batch, loss_on, dims = _model("tp")
    fn = lambda m: loss_on(m, batch)  # noqa: E731
    without = oracle_grads(model, fn, dims, None)
    for mode in ("channel", "tensor"):
        assert_gc_matters(f"tp/{mode}", oracle_grads(model, fn, dims, mode), without, dims)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_fsdp2_matches_oracle(world_size):
    cases = cases_for(world_size)
    per_rank = (run_distributed(fsdp2_worker, world_size, cases))
    _check(cases, per_rank)
