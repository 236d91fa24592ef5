"""FSDP1 (FullyShardedDataParallel) on CPU/gloo: GC through ``dist_gc.attach`` and the
pre-reduce comm hook, exact against the single-process oracle at W = 2, 3, 4.

One spawn per world size runs every case: FULL_SHARD / SHARD_GRAD_OP / NO_SHARD
(+ HYBRID_SHARD on a 2x2 mesh at W=4) x use_orig_params x flat/nested wrapping x
channel/tensor x no clip/clip, a tied-weight model, bf16 mixed precision, the comm
hook, and on every configuration a negative control (naive GC on what the optimizer
sees) that must miss the oracle.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, replace

import pytest
import torch

import dist_gc
import dist_gc.hooks
from dist_gc.core.select import clean_name
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

CLIP_FRACTION = 0.5  # clip at half the global gradient norm: clipping is active


@dataclass(frozen=True)
class Case:
    strategy: str
    orig: bool
    mode: str
    model: str = "net"
    nested: bool = False
    clip: float | None = None
    variant: str = "gc"  # gc | hook | naive | forced | none
    mp: str | None = None  # None | "bf16" (reduce fp32) | "bf16-reduce" | "bf16-lowgrads"

    @property
    def id(self) -> str:
        parts = [self.model, self.strategy, "orig" if self.orig else "flat", "nested" if self.nested else "single", self.mode]
        parts += [f"clip={self.clip:.3g}"] if self.clip else []
        parts += [self.mp] if self.mp else []
        return "/".join(parts + [self.variant])

    @property
    def readout(self) -> bool:
        return self.mp is not None


def _model(name: str):
    if name == "net":
        return models.make_model(), models.make_batch(), models.loss_on, models.GCTestNet.OUTPUT_DIMS
    return models.make_tied(), models.make_tied_batch(), models.tied_loss_on, models.TiedNet.OUTPUT_DIMS


def _clip_for(model_name: str) -> float:
    model, batch, loss_on, _ = _model(model_name)
    return CLIP_FRACTION * oracle_norm(model, lambda m: loss_on(m, batch))


def cases_for(world_size: int) -> list[Case]:
    strategies = ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"] + (["HYBRID_SHARD"] if world_size == 4 else [])
    clip = _clip_for("net")
    out: list[Case] = []
    for strategy, orig, nested, mode, c in itertools.product(strategies, (False, True), (False, True), ("channel", "tensor"), (None, clip)):
        base = Case(strategy, orig, mode, nested=nested, clip=c)
        out += [base, replace(base, variant="naive"), replace(base, variant="forced")]
    for orig, mode in itertools.product((False, True), ("channel", "tensor")):
        tied = Case("FULL_SHARD", orig, mode, model="tied", clip=_clip_for("tied"))
        out += [tied, replace(tied, variant="naive")]
        # Comm hook: GC before the reduce-scatter; equal to the oracle without clipping,
        # and with clipping equal to the documented order (GC, then clip).
        for strategy in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"):
            out.append(Case(strategy, orig, mode, nested=True, variant="hook"))
        out.append(Case("FULL_SHARD", orig, mode, nested=True, variant="hook", clip=clip))
        # Mixed precision: bf16 compute; fp32 or bf16 reduction; bf16 gradients kept.
        for mp in ("bf16", "bf16-reduce", "bf16-lowgrads"):
            out += [Case("FULL_SHARD", orig, mode, nested=True, mp=mp, variant=v) for v in ("gc", "none")]
    return out


# ----------------------------------------------------------------------------- workers
_MESH = {}


def _wrap(case: Case, model: torch.nn.Module, world_size: int):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    kw = dict(device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy[case.strategy], use_orig_params=case.orig)
    if case.nested:
        kw["auto_wrap_policy"] = ModuleWrapPolicy({torch.nn.Conv2d, torch.nn.Linear})
    if case.strategy in ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"):
        if "hsdp" not in _MESH:
            from torch.distributed.device_mesh import init_device_mesh

            _MESH["hsdp"] = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
        kw["device_mesh"] = _MESH["hsdp"]
    if case.mp:
        kw["mixed_precision"] = MixedPrecision(
            param_dtype=torch.bfloat16,
            reduce_dtype=torch.float32 if case.mp == "bf16" else torch.bfloat16,
            keep_low_precision_grads=case.mp == "bf16-lowgrads",
        )
    return FSDP(model, **kw)


def _full(fsdp_model) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(fsdp_model):
        return {clean_name(n): p.detach().double().clone() for n, p in fsdp_model.named_parameters()}


def _run_case(rank: int, world_size: int, case: Case) -> dict:
    model, batch, loss_on, _ = _model(case.model)
    fm = _wrap(case, model, world_size)
    opt = torch.optim.SGD(fm.parameters(), lr=1.0)
    config = dist_gc.GCConfig(mode=case.mode)
    handle, hook_states = None, {}
    if case.variant == "gc":
        handle = dist_gc.attach(opt, model=fm, config=config)
    elif case.variant == "hook":
        hook_states = dist_gc.hooks.register_fsdp_gc_hook(fm, config)
    elif case.variant in ("naive", "forced"):
        opt.register_step_pre_hook(naive_hook(case.variant))
    snap: dict[int, torch.Tensor] = {}
    if case.readout:
        opt.register_step_pre_hook(snapshot_hook(snap))
    loss_on(fm, models.local_slice(batch, rank, world_size)).backward()
    norm = float(fm.clip_grad_norm_(case.clip)) if case.clip else None
    opt.step()
    out = {"norm": norm, "engine": handle.label if handle else None}
    if handle is not None:
        out["bytes"], out["collectives"] = handle.stats.bytes_communicated, handle.stats.collectives
    if hook_states:
        engines = [s.engine for s in hook_states.values() if s.engine is not None]
        out["hook_calls"] = sum(e.steps for e in engines)
        out["bytes"] = sum(s.stats.bytes_communicated for s in hook_states.values())
        out["collectives"] = sum(s.stats.collectives for s in hook_states.values())
    out["params"] = _full(fm)
    if case.readout:
        # Read the gradients the update used out exactly: write them into the (same
        # layout) local parameter shards and gather those.
        with torch.no_grad():
            for p in opt.param_groups[0]["params"]:
                if id(p) in snap:
                    p.data.copy_(snap[id(p)].to(p.dtype).view(p.shape))
        out["grads"] = _full(fm)
        out["grad_dtype"] = str(next(iter(snap.values())).dtype)
    return out


def _refusals(rank: int, world_size: int) -> dict[str, str]:
    """FSDP1 parameters without model= cannot be laid out: attach must say so, never
    fall back to treating the 1-D shards as ordinary tensors."""
    out = {}
    for orig in (False, True):
        fm = _wrap(Case("FULL_SHARD", orig, "channel"), models.make_model(), world_size)
        try:
            dist_gc.attach(torch.optim.SGD(fm.parameters(), lr=1.0))
            out[f"orig={orig}"] = ""
        except ValueError as exc:
            out[f"orig={orig}"] = str(exc)
    return out


def fsdp1_worker(rank: int, world_size: int, cases: list[Case]) -> dict:
    warnings.filterwarnings("ignore", category=FutureWarning)  # NO_SHARD deprecation, once per unit
    results = []
    for case in cases:
        try:
            r = _run_case(rank, world_size, case)
        except Exception as exc:  # name the case in the rank's traceback
            raise RuntimeError(f"case {case.id} failed on rank {rank}") from exc
        if rank != 0:  # gathered full tensors are identical on every rank
            r.pop("params"), r.pop("grads", None)
        results.append(r)
    return {"results": results, "refusals": _refusals(rank, world_size)}


# ----------------------------------------------------------------------------- checks
def _check(world_size: int, cases: list[Case], per_rank: list[list[dict]]) -> None:
    oracle_cache: dict = {}

    def oracle(model_name: str, mode: str | None, clip: float | None, kind: str, gc_before_clip: bool = False):
        key = (model_name, mode, clip, kind, gc_before_clip)
        if key not in oracle_cache:
            model, batch, loss_on, dims = _model(model_name)
            fn = lambda m: loss_on(m, batch)  # noqa: E731
            if kind == "params":
                oracle_cache[key] = oracle_params(model, fn, dims, mode, clip, gc_before_clip)
            else:
                oracle_cache[key] = oracle_grads(model, fn, dims, mode, clip)
        return oracle_cache[key]

    for r in per_rank:
        for key, msg in r["refusals"].items():
            assert "model=" in msg, f"attach without model= on FSDP1 ({key}) did not refuse clearly: {msg!r}"
    by_id = {c.id: (c, [r["results"][i] for r in per_rank]) for i, c in enumerate(cases)}
    for case, results in by_id.values():
        r0 = results[0]
        dims = _model(case.model)[3]
        if case.clip:
            assert r0["norm"] > case.clip, f"{case.id}: clipping was not active (norm {r0['norm']} <= {case.clip})"
        if case.variant == "gc" and not case.readout:
            assert_matches(case.id, r0["params"], oracle(case.model, case.mode, case.clip, "params"), **FP32_TOL)
        elif case.variant == "hook":
            # The hook centralizes before the reduction, hence before clipping.
            assert_matches(case.id, r0["params"], oracle(case.model, case.mode, case.clip, "params", gc_before_clip=True), **FP32_TOL)
            if case.clip:  # ... which is a different order: show it differs from clip-then-GC
                assert_fails(case.id + " vs clip-then-GC", r0["params"], oracle(case.model, case.mode, case.clip, "params"))
        elif case.variant in ("naive", "forced"):
            assert_fails(case.id, r0["params"], oracle(case.model, case.mode, case.clip, "params"))
        if case.variant == "gc":
            sizes = {r["bytes"] for r in results}
            if case.strategy == "NO_SHARD":
                assert sizes == {0}, f"{case.id}: NO_SHARD holds whole tensors, yet GC communicated {sizes} bytes"
            else:
                assert len(sizes) == 1 and sizes.pop() > 0, f"{case.id}: shards straddle channels, expected equal non-zero traffic, got {sizes}"
                assert {r["collectives"] for r in results} == {1}, f"{case.id}: expected ONE all-reduce per step"
        if case.variant == "hook":
            assert all(r["hook_calls"] > 0 for r in results), f"{case.id}: the GC comm hook never ran"
            assert {(r["bytes"], r["collectives"]) for r in results} == {(0, 0)}, f"{case.id}: the pre-reduce hook must not communicate"
        if case.readout and case.variant == "gc":
            check_mixed_precision(case.id, r0, by_id[replace(case, variant="none").id][1][0], dims, case.mode, oracle(case.model, None, None, "grads"))


# ----------------------------------------------------------------------------- tests
def test_gc_changes_every_weight_update():
    """Once per model and mode: the oracle with GC differs from the oracle without it
    on every >= 2-D tensor by far more than the tolerance (a no-op cannot pass)."""
    for name in ("net", "tied"):
        model, batch, loss_on, dims = _model(name)
        fn = lambda m: loss_on(m, batch)  # noqa: E731
        without = oracle_grads(model, fn, dims, None)
        for mode in ("channel", "tensor"):
            assert_gc_matters(f"{name}/{mode}", oracle_grads(model, fn, dims, mode), without, dims)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_fsdp1_matches_oracle(world_size):
    cases = cases_for(world_size)
    per_rank = (run_distributed(fsdp1_worker, world_size, cases))
    _check(world_size, cases, per_rank)
