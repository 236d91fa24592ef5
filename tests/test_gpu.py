"""GPU checks: CUDA tensors through every adapter, the engine's kernel backends, and
constant kernel launches. Every test is skipped without a CUDA device; run them with
``bash benchmarks/gpu_check.sh`` on a GPU machine (it runs this file, then the GPU
benchmarks).

* every adapter at W=1 over NCCL — plain optimizer, DDP, FSDP1, FSDP2 and (when
  DeepSpeed is importable) ZeRO-1/2/3 — in channel and tensor mode, fp32 and bf16,
  against the single-process oracle (tests/oracle.py: fp64 on the CPU);
* W=2 over gloo with CUDA tensors, both ranks on cuda:0 (one GPU cannot host two NCCL
  ranks; gloo stages CUDA tensors through the host): DDP, FSDP2 and ZeRO-2;
* the engine on CUDA flat shards (W=1 and W=2) with ``kernel="torch"`` and
  ``kernel="triton"``, against the oracle;
* kernel launches per engine step with ``kernel="triton"``: the same count for 3 and for
  300 tensors (torch profiler), while the per-tensor loop's count grows.

Precision: every process turns TF32 off (cuBLAS and cuDNN), so fp32 is fp32 and the
fp32 bar is the CPU tests' atol 1e-5; cuDNN is made deterministic (and cuBLAS given a
fixed workspace) so two DeepSpeed engines built alike compute the same gradient (the
bf16 "projected" check).
bf16 bars are stated next to each assertion.

The workers take the device as an argument, so their logic can be dry-run on the CPU
(``device="cpu"``, gloo) where no GPU exists; the tests themselves always use CUDA.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from dataclasses import dataclass

import pytest
import torch

import dist_gc
from dist_gc.core.centralize import geometry_of
from dist_gc.core.select import clean_name
from dist_gc.engine.engine import GCEngine
from dist_gc.engine.layout import plan_flat_shard, plan_whole
from tests.fsdp_common import FP32_TOL, assert_matches, centralize_like_oracle, oracle_grads, oracle_params, snapshot_hook
from tests.harness import progress, run_distributed
from tests.models import GCTestNet, local_slice, loss_on, make_batch, make_model
from tests.oracle import oracle_centralize

# cuBLAS reads this when its first handle is created: set before any CUDA work, here
# and (inherited through spawn) in every rank.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

HAS_CUDA = torch.cuda.is_available()
GPU = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: run benchmarks/gpu_check.sh on a GPU machine")
MODES = ("channel", "tensor")
DTYPES = ("float32", "bfloat16")
EPS_BF16 = torch.finfo(torch.bfloat16).eps
U_BF16 = EPS_BF16 / 2  # unit roundoff


def _setup(device: str) -> torch.device:
    """Per process: the device (every rank on cuda:0), fp32 without TF32, deterministic
    cuDNN/cuBLAS, and LOCAL_RANK=0 (DeepSpeed places its engine by LOCAL_RANK)."""
    if device != "cuda":
        return torch.device(device)
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    os.environ["LOCAL_RANK"] = "0"
    return dev


def _backend(world: int, device: str) -> str:
    """NCCL for a one-rank CUDA run; gloo otherwise (two ranks share the one GPU)."""
    return "nccl" if device == "cuda" and world == 1 else "gloo"


def _require_kernel_option() -> None:
    if "kernel" not in inspect.signature(GCEngine).parameters:
        pytest.fail(f"GCEngine{inspect.signature(GCEngine)} has no kernel= option: this check needs the fused-kernel engine")


# =========================================================================== torch adapters
@dataclass(frozen=True)
class Case:
    adapter: str  # plain | ddp | fsdp1 | fsdp2
    mode: str
    dtype: str  # float32 | bfloat16

    @property
    def id(self) -> str:
        return f"{self.adapter}/{self.mode}/{self.dtype}"

    @property
    def low(self) -> bool:
        return self.dtype != "float32"


W1_CASES = [Case(a, m, d) for a in ("plain", "ddp", "fsdp1", "fsdp2") for m in MODES for d in DTYPES]
W2_CASES = [Case(a, m, d) for a in ("ddp", "fsdp2") for m in MODES for d in DTYPES]


def _wrap(case: Case, model: torch.nn.Module, world: int, dev: torch.device):
    """The engine around ``model`` (already on ``dev``). bf16: a bf16 model for plain,
    DDP and FSDP2; FSDP1 mixed precision with bf16 gradients kept (``keep_low_precision_grads``)."""
    if case.adapter == "plain":
        return model
    if case.adapter == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if case.adapter == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, MixedPrecision
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        kw = {}
        if case.low:
            kw["mixed_precision"] = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, keep_low_precision_grads=True)
        return FSDP(model, device_id=dev, use_orig_params=False, auto_wrap_policy=ModuleWrapPolicy({torch.nn.Conv2d, torch.nn.Linear}), **kw)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dev.type, (world,))
    for sub in (model.conv, model.fc1):  # nested as in tests/test_fsdp2.py: bottom-up groups, then the root
        fully_shard(sub, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp1_full(fm) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(fm):
        return {clean_name(n): p.detach().double().cpu().clone() for n, p in fm.named_parameters()}


def _readout(case: Case, model, wrapped, opt, snap: dict[int, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Full tensors (fp64, CPU) of the parameters (``snap=None``) or of the gradients a
    snapshot hook recorded, read through each engine's own API (not dist_gc's layouts)."""
    if case.adapter == "fsdp1":
        if snap is None:
            return _fsdp1_full(wrapped)
        # Write the recorded (flat, local) gradients into the flat parameters' shards and
        # gather those (same layout), then restore the parameters.
        params = [p for g in opt.param_groups for p in g["params"]]
        saved = [p.data.clone() for p in params]
        with torch.no_grad():
            for p in params:
                if id(p) in snap:
                    p.data.copy_(snap[id(p)].to(p.dtype).view(p.shape))
        out = _fsdp1_full(wrapped)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.data.copy_(s)
        return out
    out = {}
    for n, p in model.named_parameters():
        t = p if snap is None else snap[id(p)]
        t = t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2: DTensor
        out[n] = t.detach().double().cpu()
    return out


def _run_case(rank: int, world: int, case: Case, dev: torch.device) -> dict:
    dtype = getattr(torch, case.dtype)
    model_dtype = torch.float32 if case.adapter == "fsdp1" else dtype
    model = make_model(0, model_dtype).to(dev)
    batch = tuple(t.to(dev) for t in local_slice(make_batch(1, model_dtype), rank, world))
    wrapped = _wrap(case, model, world, dev)
    opt = torch.optim.SGD(wrapped.parameters(), lr=1.0)
    before: dict[int, torch.Tensor] = {}
    after: dict[int, torch.Tensor] = {}
    # Step pre-hooks run in registration order: one snapshot before GC's, one after it —
    # the gradient of the SAME backward pass before and after GC.
    opt.register_step_pre_hook(snapshot_hook(before))
    handle = dist_gc.attach(opt, model=wrapped, config=dist_gc.GCConfig(mode=case.mode))
    opt.register_step_pre_hook(snapshot_hook(after))
    loss_on(wrapped, batch).backward()
    opt.step()
    grad = next(iter(after.values()))
    return {
        "label": handle.label, "bytes": handle.stats.bytes_communicated, "collectives": handle.stats.collectives,
        "centralized": sorted(handle.stats.centralized), "grad_device": str(grad.device), "grad_dtype": str(grad.dtype),
        "params": _readout(case, model, wrapped, opt, None),
        "before": _readout(case, model, wrapped, opt, before),
        "after": _readout(case, model, wrapped, opt, after),
    }


def torch_worker(rank: int, world: int, cases: list[Case], device: str = "cuda") -> list[dict]:
    dev = _setup(device)
    warnings.filterwarnings("ignore", category=UserWarning)  # FSDP / DTensor notes
    warnings.filterwarnings("ignore", category=FutureWarning)
    out = []
    for case in cases:
        try:
            r = _run_case(rank, world, case, dev)
        except Exception as exc:  # name the case in the rank's traceback
            raise RuntimeError(f"case {case.id} failed on rank {rank} (W={world}, {device})") from exc
        out.append(r)
        progress(case.id)
    return out


def _fp32_oracle():
    model, batch = make_model(0), make_batch(1)
    return model, functools.partial(loss_on, batch=batch)


def check_torch(cases: list[Case], per_rank: list[list[dict]], world: int, device: str = "cuda") -> None:
    """Parent-side checks; raises AssertionError listing every failure."""
    from tests.test_fsdp2 import EXPECTED_SHARD0_TRAFFIC

    model, fn = _fp32_oracle()
    dims = GCTestNet.OUTPUT_DIMS
    fp32_grads = oracle_grads(model, fn, dims, None)  # the oracle's gradient, no GC
    failures = []
    for i, case in enumerate(cases):
        where = f"[W={world} {case.id}]"
        r0 = per_rank[0][i]
        try:
            assert r0["grad_device"].startswith(device), f"{where} gradients on {r0['grad_device']}, not {device}"
            assert r0["centralized"] == sorted(dims), f"{where} centralized {r0['centralized']}"
            for r in range(1, world):  # every rank reads out the same full tensors
                for n, p in r0["params"].items():
                    assert torch.equal(p, per_rank[r][i]["params"][n]), f"{where} rank {r} differs on {n}"
            traffic = {(r[i]["bytes"], r[i]["collectives"]) for r in per_rank}
            if case.adapter == "fsdp2":
                # Shard(0), nested as tests/test_fsdp2.py: the same traffic (a 1-rank mesh
                # too: its group is planned like any other).
                assert traffic == {EXPECTED_SHARD0_TRAFFIC[case.mode]}, f"{where} traffic {traffic}"
            elif case.adapter in ("plain", "ddp") or world == 1:  # whole tensors (FSDP1 at W=1: NO_SHARD)
                assert traffic == {(0, 0)}, f"{where} whole tensors: GC must not communicate, got {traffic}"
            for n in r0["before"]:  # GC touches its targets only
                if n not in dims:
                    assert torch.equal(r0["before"][n], r0["after"][n]), f"{where} GC changed {n}, not a target"
            if not case.low:
                # fp32: the parameters after one SGD(lr=1) step are the oracle's (fp64,
                # global batch, full tensors) to the CPU tests' bar, atol 1e-5.
                assert_matches(where, r0["params"], oracle_params(model, fn, dims, case.mode), **FP32_TOL)
                continue
            # bf16, GC isolated from bf16 compute: the gradient after GC must be the
            # oracle formula applied to the gradient before GC (the same backward pass).
            want = centralize_like_oracle(r0["before"], dims, case.mode)
            bf16_grads = r0["grad_dtype"] == "torch.bfloat16"
            tols: dict[str, float] = {}
            for n in dims:
                # bf16 gradients: means accumulated in fp32 (~1e-7 relative), the result
                # rounded once to bf16: |err| <= u * |G - mean| <= 2u * max|G| = eps_bf16 * max|G|.
                # fp32 gradients (none here, but an engine may upcast): the fp32 bar.
                tol = EPS_BF16 * float(r0["before"][n].abs().max()) if bf16_grads else FP32_TOL["atol"]
                torch.testing.assert_close(r0["after"][n], want[n], rtol=0, atol=tol, msg=lambda m, n=n: f"{where} {n} (GC vs oracle formula): {m}")
                tols[n] = tol
            # Negative control on the same computation: no GC misses by > 10x the bar.
            miss = max(float((r0["before"][n] - want[n]).abs().max()) / tols[n] for n in dims)
            assert miss > 10, f"{where}: no GC is within {miss:.1f}x the bar; the check cannot fail"
            for n, g in fp32_grads.items():
                # The engine's bf16 gradient vs the fp32 oracle's: bf16 compute (parameters,
                # activations and their gradients rounded, u = 2**-8) through 6 layers
                # forward and backward, ~12 roundings of the largest gradient, plus one per
                # rank in a bf16 reduction: 16 u * max|G| (as tests/fsdp_common.py).
                tol = 16 * U_BF16 * float(g.abs().max()) + 1e-6
                torch.testing.assert_close(r0["before"][n], g, rtol=0, atol=tol, msg=lambda m, n=n: f"{where} {n} (bf16 vs fp32 oracle gradient): {m}")
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


@GPU
def test_torch_adapters_cuda_w1_match_oracle():
    """Plain optimizer, DDP, FSDP1, FSDP2 on one GPU (NCCL, W=1), both modes, fp32/bf16."""
    per_rank = run_distributed(torch_worker, 1, W1_CASES, "cuda", pg_backend=_backend(1, "cuda"), timeout=300)
    check_torch(W1_CASES, per_rank, 1)


@GPU
def test_torch_adapters_cuda_w2_gloo_match_oracle():
    """DDP and FSDP2 at W=2 over gloo with CUDA tensors, both ranks on cuda:0."""
    per_rank = run_distributed(torch_worker, 2, W2_CASES, "cuda", pg_backend=_backend(2, "cuda"), timeout=300)
    check_torch(W2_CASES, per_rank, 2)


# =========================================================================== DeepSpeed
def _ds_cases(stages: tuple[int, ...]) -> list[dict]:
    out = []
    for stage in stages:
        out.append({"id": f"z{stage}-fp32", "stage": stage, "controls": True})
        out.append({"id": f"z{stage}-bf16", "stage": stage, "dtype": "bf16"})
    return out


def _device_train_step(engine, case: dict, rank: int, world: int) -> None:
    """tests/ds_cases.train_step with the batch on the engine's device."""
    from tests.ds_cases import DTYPES as DS_DTYPES

    local = local_slice(make_batch(1), rank, world)
    gas = case.get("gas", 1)
    dev = engine.device
    for k in range(gas):
        images, tokens, labels = local_slice(local, k, gas)
        loss = loss_on(engine, (images.to(dev, DS_DTYPES[case.get("dtype", "fp32")]), tokens.to(dev), labels.to(dev)))
        engine.backward(loss)
        engine.step()


def ds_worker(rank: int, world: int, cases: list[dict], device: str = "cuda") -> list[dict]:
    """tests/ds_cases.run_cases (GC in both modes, negative controls, the bf16 projected
    check) with the batch moved to the engine's device."""
    import deepspeed
    import torch.distributed as dist

    from tests import ds_cases

    _setup(device)
    deepspeed.init_distributed(dist_backend=str(dist.get_backend()))  # joins the harness' group
    ds_cases.train_step = _device_train_step  # run_variant looks it up at call time
    results = ds_cases.run_cases(rank, world, cases)
    return results


def _run_ds(world: int, stages: tuple[int, ...]) -> None:
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: the ZeRO GPU checks need it")
    from tests.test_deepspeed import _check  # the CPU suite's checks and tolerances

    cases = _ds_cases(stages)
    results = run_distributed(ds_worker, world, cases, "cuda", pg_backend=_backend(world, "cuda"), timeout=420)
    # fp32: atol 1e-5 vs the oracle; bf16: 4 eps_bf16 * max|update| vs the oracle and
    # 8 eps_fp32 * max|master| vs the projection of DeepSpeed's own GC-off update (see
    # tests/test_deepspeed.py:_tolerances, which states the reasoning).
    _check(results[0], cases, world)


@GPU
def test_deepspeed_zero123_cuda_w1_match_oracle():
    _run_ds(1, (1, 2, 3))


@GPU
def test_deepspeed_zero2_cuda_w2_gloo_matches_oracle():
    _run_ds(2, (2,))


# =========================================================================== engine kernels
def engine_worker(rank: int, world: int, kernels: list[str], device: str = "cuda") -> dict:
    """tests/test_engine_dist.py's flat-shard cases on ``device``, one engine per kernel."""
    import torch.distributed as dist

    from tests.test_engine_dist import CASES, TENSORS, _global_grads, _layout

    dev = _setup(device)
    out = {}
    for kernel in kernels:
        for layout, mode, dtype_name in CASES:
            dtype = getattr(torch, dtype_name)
            grads = _global_grads(dtype)
            ranges = _layout(layout, world)
            pieces, plans, offset = [], [], 0
            for n, s, dim in TENSORS:
                lo, hi = ranges[n][rank]
                plans.append(plan_flat_shard(n, geometry_of(s, mode, dim), ranges=ranges[n], rank=rank, group=dist.group.WORLD, source=0, offset=offset))
                pieces.append(grads[n].reshape(-1)[lo:hi])
                offset += hi - lo
            buf = (torch.cat(pieces) if offset else torch.zeros(0, dtype=dtype)).to(dev)
            kw = {} if kernel == "auto" else {"kernel": kernel}
            engine = GCEngine(plans, [lambda: buf], **kw)
            engine.verify_collectives()
            stats = engine.step()
            out[(kernel, layout, mode, dtype_name)] = (buf.cpu(), stats.bytes_communicated, stats.collectives, str(buf.device))
    return out


def check_engine(per_rank: list[dict], kernels: list[str], world: int, device: str = "cuda") -> None:
    from tests.test_engine_dist import CASES, TENSORS, _assemble, _global_grads

    failures = []
    for kernel in kernels:
        for layout, mode, dtype_name in CASES:
            key = (kernel, layout, mode, dtype_name)
            dtype = getattr(torch, dtype_name)
            grads = _global_grads(dtype)
            assert per_rank[0][key][3].startswith(device), f"{key}: ran on {per_rank[0][key][3]}"
            got = _assemble(per_rank, key, 0, world, layout)
            for n, _, dim in TENSORS:
                want = oracle_centralize(grads[n], mode, dim)
                # fp32: 1e-5. bf16: statistics in fp32, the result rounded once to bf16:
                # |err| <= eps_bf16/2 * |x| plus fp32 noise; eps * max|x| bounds it (as
                # tests/test_engine_dist.py).
                atol = 1e-5 if dtype == torch.float32 else EPS_BF16 * float(grads[n].float().abs().max())
                err = float((got[n].double() - want).abs().max())
                if err > atol:
                    failures.append(f"{key} {n}: max err {err:.3g} > {atol:.3g}")
            nbytes = {r[key][1] for r in per_rank}
            if len(nbytes) != 1 or (world == 1 and nbytes != {0}):
                failures.append(f"{key}: GC bytes per rank {nbytes}")
    assert not failures, "\n".join(failures)


@GPU
@pytest.mark.parametrize("world", [1, 2])
def test_engine_kernels_torch_and_triton_match_oracle_on_cuda(world):
    _require_kernel_option()
    pytest.importorskip("triton", reason="triton is not installed: kernel='triton' cannot run")
    kernels = ["torch", "triton"]
    per_rank = run_distributed(engine_worker, world, kernels, "cuda", timeout=300)  # gloo: W=2 shares the GPU
    check_engine(per_rank, kernels, world)


# =========================================================================== launches
def _benchmark_module():
    """benchmarks/engine.py, imported as benchmarks/run.py imports it."""
    import importlib
    import sys

    from tests.jobs import ROOT

    bench = str(ROOT / "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("engine")


def _engine_and_loop(n: int, mode: str, dtype: torch.dtype, dev: torch.device, kernel: str):
    """``n`` whole 2-D tensors of varied shapes: a GCEngine and the per-tensor loop."""
    shapes = [(32 + 8 * (i % 7), 48 + 16 * (i % 5)) for i in range(n)]
    gen = torch.Generator(device=dev).manual_seed(n)
    grads = [(torch.randn(s, generator=gen, device=dev) + 0.5).to(dtype) for s in shapes]
    plans = [plan_whole(f"w{i}", geometry_of(s, mode, 0), s, 0 if mode == "channel" else None, source=i) for i, s in enumerate(shapes)]
    kw = {} if kernel == "auto" else {"kernel": kernel}
    engine = GCEngine(plans, [lambda g=g: g for g in grads], **kw)

    def loop() -> None:
        for g in grads:
            g.sub_(g.mean(1, keepdim=True) if mode == "channel" else g.mean())

    return engine, loop, grads


@GPU
def test_triton_kernel_launches_constant_from_3_to_300_tensors():
    _require_kernel_option()
    pytest.importorskip("triton", reason="triton is not installed: kernel='triton' cannot run")
    count_launches = _benchmark_module().count_launches  # the benchmark's own counter
    dev = torch.device("cuda", 0)
    failures = []
    for mode in MODES:
        for dtype in (torch.float32, torch.bfloat16):
            counts, loops = {}, {}
            for n in (3, 300):
                engine, loop, grads = _engine_and_loop(n, mode, dtype, dev, "triton")
                counts[n] = count_launches(engine.step)
                loops[n] = count_launches(loop)
                # ... and the step centralized: every mean is ~0 afterwards.
                worst = max(float((g.float().mean(1) if mode == "channel" else g.float().mean()).abs().max()) for g in grads)
                if worst > 1e-2:
                    failures.append(f"{mode} {dtype}: n={n}: |mean| {worst:.3g} left after GC")
            where = f"{mode} {dtype}"
            if counts[3]["kernels"] != counts[300]["kernels"] or counts[3]["kernels"] == 0:
                failures.append(f"{where}: triton engine launched {counts[3]} kernels for 3 tensors, {counts[300]} for 300")
            # The counter sees per-tensor launches: the loop's grow with the tensors, so an
            # equal engine count is not an artefact of counting nothing.
            if not loops[300]["kernels"] > loops[3]["kernels"]:
                failures.append(f"{where}: the loop's launches did not grow ({loops}); the profiler count is not trustworthy")
    assert not failures, "\n".join(failures)
