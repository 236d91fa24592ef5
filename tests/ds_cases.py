"""Worker-side code of the DeepSpeed tests: build real DeepSpeed engines on the gloo
ranks the harness started, take one training step, read back the full fp32 master
weights, and compare them with the single-process oracle.

Every case runs several engines in the same process group (DeepSpeed start-up is the
cost): GC on, and the negative controls (naive GC as peer libraries apply it to the
tensors the optimizer sees; "forced" GC treating each 1-D partition as one tensor).
Results go back to the parent as plain numbers, checked there with a message naming
the case.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist

from tests.models import GCTestNet, loss_on, local_slice, make_batch, make_model
from tests.oracle import naive_centralize, oracle_centralize, oracle_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("channel", "tensor")
# Parameters frozen in "frozen" cases: one >= 2-D weight and one bias.
FROZEN = ("conv.weight", "fc1.bias")


def ds_config(case: dict[str, Any], world: int, gc: dict | None) -> dict[str, Any]:
    gas = case.get("gas", 1)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 12 // world // gas,
        "gradient_accumulation_steps": gas,
        "zero_optimization": {"stage": case["stage"], **case.get("zero", {})},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    # DeepSpeed clips at 1.0 unless told otherwise: 0.0 turns clipping off.
    cfg["gradient_clipping"] = float(case.get("clip") or 0.0)
    dtype = case.get("dtype", "fp32")
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": case.get("scale_power", 8), "hysteresis": 1, "loss_scale_window": 1000}
    if case.get("opt") in ("ds_adam", "cpuadam"):
        cfg["optimizer"] = {"type": "Adam", "params": {"lr": ADAM["lr"], "betas": ADAM["betas"], "eps": ADAM["eps"], "weight_decay": 0.0, **({"torch_adam": True} if case["opt"] == "ds_adam" else {})}}
    cfg.update(case.get("extra", {}))
    if gc is not None:
        cfg["gradient_centralization"] = gc
    return cfg


ADAM = {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-3}


def _param_groups(model: torch.nn.Module, case: dict[str, Any]) -> list[dict[str, Any]] | list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not case.get("groups"):
        return params
    # Two groups, the strided-output-dim weights first, so group boundaries and
    # partition boundaries fall in different places than with one group.
    first = [model.proj.weight, model.deconv.weight, model.head.bias, model.emb.weight]
    first = [p for p in first if p.requires_grad]
    rest = [p for p in params if all(p is not q for q in first)]
    return [{"params": first}, {"params": rest}]


def _make_model(case: dict[str, Any], cfg: dict[str, Any]) -> GCTestNet:
    if case.get("zero_init"):
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = make_model(0)
    else:
        model = make_model(0)
    for name, p in model.named_parameters():
        if case.get("frozen") and name in FROZEN:
            p.requires_grad_(False)
    return model


def build_engine(case: dict[str, Any], world: int, gc: dict | None, *, via_initialize: bool = True):
    import deepspeed

    import dist_gc.deepspeed

    cfg = ds_config(case, world, gc)
    model = _make_model(case, cfg)
    kwargs: dict[str, Any] = {"model": model, "config": cfg}
    params = _param_groups(model, case)
    if case.get("opt", "sgd") == "sgd":
        kwargs["optimizer"] = torch.optim.SGD(params, lr=1.0)
    elif case["opt"] == "adam":
        kwargs["optimizer"] = torch.optim.Adam(params, lr=ADAM["lr"], betas=ADAM["betas"], eps=ADAM["eps"])
    else:
        kwargs["model_parameters"] = params
    init = dist_gc.deepspeed.initialize if via_initialize else deepspeed.initialize
    engine, _, _, _ = init(**kwargs)
    return engine


# --------------------------------------------------------------------------- readout
def master_weights(engine: Any) -> dict[str, torch.Tensor]:
    """Full fp32 master weights (fp64 copies), read through DeepSpeed's own buffers and
    the 16-bit params' storage placement — not through dist_gc's layouts."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    named = [(n.removeprefix("module."), p) for n, p in engine.module.named_parameters()]
    out: dict[str, torch.Tensor] = {}
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        for n, p in named:
            if p.requires_grad:
                out[n] = safe_get_full_fp32_param(p).detach().double().cpu().view(p.ds_shape)
            else:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    out[n] = p.data.detach().double().cpu().clone()
        return out
    if isinstance(opt, (DeepSpeedZeroOptimizer, BF16_Optimizer, FP16_Optimizer)):
        if isinstance(opt, DeepSpeedZeroOptimizer):
            flats, parts, pgs = opt.bit16_groups_flat, opt.single_partition_of_fp32_groups, opt.real_dp_process_group
        elif isinstance(opt, BF16_Optimizer):
            flats, parts, pgs = opt.bf16_groups_flat, opt.fp32_groups_flat_partition, opt.real_dp_process_group
        else:
            flats, parts, pgs = opt.fp16_groups_flat, opt.fp32_groups_flat, [None] * len(opt.fp32_groups_flat)
        full = []
        for part, pg in zip(parts, pgs):
            if pg is None:
                full.append(part.detach().double().cpu())
                continue
            pieces = [torch.empty_like(part) for _ in range(dist.get_world_size(pg))]
            dist.all_gather(pieces, part.detach().contiguous(), group=pg)
            full.append(torch.cat(pieces).double().cpu())
        for n, p in named:
            for flat, f in zip(flats, full):
                off = (p.data_ptr() - flat.data_ptr()) // flat.element_size()
                if 0 <= off < flat.numel() and p.requires_grad:
                    out[n] = f[off : off + p.numel()].view(p.shape).clone()
                    break
            else:
                out[n] = p.detach().double().cpu().clone()
        return out
    if isinstance(opt, FP16_UnfusedOptimizer):
        hp = {id(lp): h for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, h in zip(lps, hps)}
        return {n: (hp[id(p)] if id(p) in hp else p).detach().double().cpu().clone() for n, p in named}
    return {n: p.detach().double().cpu().clone() for n, p in named}


# --------------------------------------------------------------------------- controls
def _naive_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
    """What pytorch_optimizer / Ranger / the paper's SGD_GC do inside step: centralize
    each grad the optimizer holds along dim 0 when it has more than one dim."""
    for g in optimizer.param_groups:
        for p in g["params"]:
            if p.grad is not None:
                p.grad.copy_(naive_centralize(p.grad))


def _forced_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
    """Naive GC "forced" onto the 1-D flat partition: one mean over the whole piece."""
    for g in optimizer.param_groups:
        for p in g["params"]:
            if p.grad is not None:
                p.grad.sub_(p.grad.mean())


def step_engine(engine: Any, case: dict[str, Any], rank: int, world: int, batch=None) -> None:
    batch = batch if batch is not None else make_batch(1)
    local = local_slice(batch, rank, world)
    gas = case.get("gas", 1)
    for k in range(gas):
        micro = local_slice(local, k, gas)
        images, tokens, labels = micro
        images = images.to(DTYPES[case.get("dtype", "fp32")])
        loss = loss_on(engine, (images, tokens, labels))
        engine.backward(loss)
        engine.step()


def inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return opt.optimizer if hasattr(opt, "optimizer") and isinstance(opt.optimizer, torch.optim.Optimizer) else opt


def run_variant(case: dict[str, Any], rank: int, world: int, variant: str, mode: str) -> dict[str, torch.Tensor]:
    """One engine, one training step; returns the fp32 master weights after it."""
    gc = {"enabled": True, "mode": mode} if variant == "gc" else None
    engine = build_engine(case, world, gc)
    if variant == "gc":
        assert engine.dist_gc is not None and engine.dist_gc.enabled, "GC not attached"
    else:
        assert engine.dist_gc is None
    if variant in ("naive", "forced"):
        inner_optimizer(engine).register_step_pre_hook(_naive_hook if variant == "naive" else _forced_hook)
    step_engine(engine, case, rank, world)
    out = master_weights(engine)
    if variant == "gc":
        out["__gc_steps__"] = torch.tensor(float(engine.dist_gc.engine.steps))
    engine.destroy()
    return out


# --------------------------------------------------------------------------- oracle
def oracle(case: dict[str, Any], mode: str | None) -> dict[str, torch.Tensor]:
    """Single process, global batch, full tensors: new params after clip -> GC -> update
    (SGD lr=1; Adam cases apply torch.optim.Adam in fp64 to the centralized gradient).
    Low-precision cases start from the model cast to that dtype, as DeepSpeed does."""
    dtype = DTYPES[case.get("dtype", "fp32")]
    model = make_model(0).to(dtype)
    for name, p in model.named_parameters():
        if case.get("frozen") and name in FROZEN:
            p.requires_grad_(False)
    batch = make_batch(1)
    batch = (batch[0].to(dtype), batch[1], batch[2])
    dims = dict(GCTestNet.OUTPUT_DIMS) if mode is not None else {}
    new = oracle_step(model, lambda m: loss_on(m, batch), dims, mode or "channel", clip=case.get("clip"))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            new[name] = p.detach().double()
    if case.get("opt") in ("adam", "ds_adam", "cpuadam"):
        out = {}
        for name, p in model.named_parameters():
            w0 = p.detach().double()
            if not p.requires_grad:
                out[name] = w0
                continue
            w = torch.nn.Parameter(w0.clone())
            w.grad = w0 - new[name]  # the clipped, centralized gradient
            torch.optim.Adam([w], lr=ADAM["lr"], betas=ADAM["betas"], eps=ADAM["eps"]).step()
            out[name] = w.detach()
        return out
    return new


def grad_norm(case: dict[str, Any]) -> float:
    """Global gradient norm of the oracle step (to check that clipping is active)."""
    model = make_model(0).to(DTYPES[case.get("dtype", "fp32")])
    batch = make_batch(1)
    loss_on(model, (batch[0].to(DTYPES[case.get("dtype", "fp32")]), batch[1], batch[2])).backward()
    return float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters())))


def max_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: float((a[n] - b[n]).abs().max()) for n in b if not n.startswith("__")}


# --------------------------------------------------------------------------- worker
def run_cases(rank: int, world: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rank body: for each case, GC-on engines in both modes plus the negative controls;
    returns per-case errors against the oracle (computed on every rank, compared in the
    parent)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # reuses the harness' process group
    results = []
    for case in cases:
        res: dict[str, Any] = {"id": case["id"]}
        for mode in case.get("modes", MODES):
            got = run_variant(case, rank, world, "gc", mode)
            want = oracle(case, mode)
            res[f"err_{mode}"] = max_err(got, want)
            res[f"gc_steps_{mode}"] = float(got["__gc_steps__"])
            if case.get("controls", True) and mode == "channel":
                for variant in ("naive", "forced"):
                    res[f"err_{variant}"] = max_err(run_variant(case, rank, world, variant, mode), want)
        off = oracle(case, None)
        res["gc_effect"] = {m: max_err(oracle(case, m), off) for m in case.get("modes", MODES)}
        results.append(res)
    return results
