"""Worker-side code of the DeepSpeed tests (tests/test_deepspeed.py).

Each rank builds real DeepSpeed engines on the gloo group the harness started, takes
one training step, reads back the full fp32 master weights (through DeepSpeed's own
buffers, not dist_gc's layouts) and measures the error against the single-process
oracle. Many engines run per spawn (start-up is the cost). Results go back to the
parent as plain numbers and strings; the parent asserts, naming the case.

Variants per case: GC on in each mode; the negative controls "naive" (what
pytorch_optimizer / Ranger / the paper's SGD_GC do inside ``step`` on the tensors the
optimizer holds: dim 0, only when ``dim() > 1`` — a no-op on 1-D partitions) and
"forced" (one mean over each 1-D partition); and, in 16-bit cases, GC off, whose update
projected by the oracle formula must equal the GC-on update.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import os
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from tests.harness import progress
from tests.models import GCTestNet, loss_on, local_slice, make_batch, make_shifted_model
from tests.oracle import naive_centralize, oracle_centralize, oracle_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("channel", "tensor")
FROZEN = ("conv.weight", "fc1.bias")  # frozen in "frozen" cases: a >= 2-D weight and a bias
ADAM = {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-3}
# Adam made linear for 16-bit checks: betas 0 and lr = eps = 1e6 give the update
# lr * g / (|g| + eps) = g (1 - |g|/1e6): SGD(lr=1) to ~1e-7 relative, so the GC-on
# update can be compared with the projected GC-off update as for SGD.
LINEAR_ADAM = {"lr": 1e6, "betas": (0.0, 0.0), "eps": 1e6}
ADAM_OPTS = ("adam", "ds_adam", "fused_adam", "cpuadam")


# --------------------------------------------------------------------------- setup
def setup_worker() -> None:
    """Join DeepSpeed to the harness' process group and make engine start-up cheap."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # reuses the existing gloo group
    allow_cpu_fp16()
    # DeepSpeed calls gc.collect() in ZeRO-3 start-up (defragment) and in every
    # see_memory_usage(force=True) of BF16_Optimizer; freezing the objects alive now
    # (and after each case, see settle()) makes those ~20x cheaper. Likewise
    # DeepSpeedCPUAdam queries cpuinfo (subprocesses, ~1 s) per instance: the answer
    # is a fact of the machine, so it is cached. DeepSpeed's behaviour is unchanged.
    import cpuinfo

    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.lru_cache(maxsize=1)(cpuinfo.get_cpu_info)
    settle()


def settle() -> None:
    """Collect the garbage of finished engines, then freeze what is left alive."""
    gc.collect()
    gc.freeze()


def allow_cpu_fp16() -> bool:
    """DeepSpeed's CPU accelerator reports fp16 unsupported unless oneDNN has native fp16
    kernels (AVX512-FP16/AMX); torch computes fp16 on any CPU (slowly). Override only
    that capability probe so the real fp16 engines (dynamic loss scaling, overflow
    skip) run here; nothing else of DeepSpeed is changed. Returns whether it was needed."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.is_fp16_supported():
        return False
    acc.is_fp16_supported = lambda: True
    return True


def ds_config(case: dict[str, Any], world: int, gc_block: dict | None) -> dict[str, Any]:
    gas = case.get("gas", 1)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 12 // world // gas,
        "gradient_accumulation_steps": gas,
        "zero_optimization": {"stage": case["stage"], **case.get("zero", {})},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        # DeepSpeed clips at 1.0 unless told otherwise: 0.0 turns clipping off.
        "gradient_clipping": float(case.get("clip") or 0.0),
    }
    dtype = case.get("dtype", "fp32")
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        fp16 = {"enabled": True, "hysteresis": 1, "loss_scale_window": 1000, "min_loss_scale": 1}
        # Dynamic scaling (loss_scale 0) starting at 2**scale_power; or a static scale.
        fp16.update({"loss_scale": 0, "initial_scale_power": case.get("scale_power", 8)} if "static_scale" not in case else {"loss_scale": case["static_scale"]})
        cfg["fp16"] = fp16
    opt = case.get("opt", "sgd")
    if opt in ("ds_adam", "fused_adam", "cpuadam"):
        hp = adam_hparams(case)
        params = {"lr": hp["lr"], "betas": list(hp["betas"]), "eps": hp["eps"], "weight_decay": 0.0}
        if opt == "ds_adam":
            params["torch_adam"] = True  # DeepSpeed builds torch.optim.Adam
        cfg["optimizer"] = {"type": "Adam", "params": params}  # fused_adam/cpuadam: DeepSpeed's own ops
    if case.get("offload"):
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    cfg.update(case.get("extra", {}))
    if gc_block is not None:
        cfg["gradient_centralization"] = gc_block
    return cfg


def adam_hparams(case: dict[str, Any]) -> dict[str, Any]:
    return LINEAR_ADAM if case.get("linear_adam") else ADAM


def is_linear(case: dict[str, Any]) -> bool:
    """Whether the update is (to fp32 precision) minus the gradient."""
    return case.get("opt", "sgd") == "sgd" or bool(case.get("linear_adam"))


def _params(model: torch.nn.Module, case: dict[str, Any]):
    params = [p for p in model.parameters() if p.requires_grad]
    if not case.get("groups"):
        return params
    # Two groups, strided-output-dim weights first, so group and partition boundaries
    # fall in other places than with one group.
    first = [p for p in (model.proj.weight, model.deconv.weight, model.head.bias, model.emb.weight) if p.requires_grad]
    return [{"params": first}, {"params": [p for p in params if all(p is not q for q in first)]}]


def make_case_model(case: dict[str, Any], cfg: dict[str, Any] | None = None) -> GCTestNet:
    if case.get("zero_init"):
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = make_shifted_model(0)
    else:
        model = make_shifted_model(0)
    if case.get("frozen"):
        for name, p in model.named_parameters():
            if name in FROZEN:
                p.requires_grad_(False)
    return model


def build_engine(case: dict[str, Any], world: int, gc_block: dict | None, *, initialize: Callable | None = None):
    import dist_gc.deepspeed

    cfg = ds_config(case, world, gc_block)
    model = make_case_model(case, cfg)
    kwargs: dict[str, Any] = {"model": model, "config": cfg}
    params = _params(model, case)
    opt = case.get("opt", "sgd")
    if opt == "sgd":
        kwargs["optimizer"] = torch.optim.SGD(params, lr=1.0)
    elif opt == "adam":
        kwargs["optimizer"] = torch.optim.Adam(params, **adam_hparams(case))
    else:
        kwargs["model_parameters"] = params
    engine, _, _, _ = (initialize or dist_gc.deepspeed.initialize)(**kwargs)
    return engine


# --------------------------------------------------------------------------- readout
def master_weights(engine: Any) -> dict[str, torch.Tensor]:
    """Full fp32 master weights as fp64 copies, read from DeepSpeed's own buffers and the
    16-bit params' storage placement — independent of dist_gc's layout code."""
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
            out[n] = p.detach().double().cpu().clone()  # frozen params: not in any group
            for flat, f in zip(flats, full):
                off = (p.data_ptr() - flat.data_ptr()) // flat.element_size()
                if p.requires_grad and 0 <= off < flat.numel():
                    out[n] = f[off : off + p.numel()].view(p.shape).clone()
                    break
        return out
    if isinstance(opt, FP16_UnfusedOptimizer):
        hp = {id(lp): h for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, h in zip(lps, hps)}
        return {n: hp.get(id(p), p).detach().double().cpu().clone() for n, p in named}
    return {n: p.detach().double().cpu().clone() for n, p in named}


def inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


def _naive_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
    for g in optimizer.param_groups:
        for p in g["params"]:
            if p.grad is not None:
                p.grad.copy_(naive_centralize(p.grad))


def _forced_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
    for g in optimizer.param_groups:
        for p in g["params"]:
            if p.grad is not None:
                p.grad.sub_(p.grad.float().mean().to(p.grad.dtype))


def train_step(engine: Any, case: dict[str, Any], rank: int, world: int) -> None:
    """One optimizer step on this rank's slice of the global batch (``gas`` micro-steps)."""
    local = local_slice(make_batch(1), rank, world)
    gas = case.get("gas", 1)
    for k in range(gas):
        images, tokens, labels = local_slice(local, k, gas)
        loss = loss_on(engine, (images.to(DTYPES[case.get("dtype", "fp32")]), tokens, labels))
        engine.backward(loss)
        engine.step()


def run_variant(case: dict[str, Any], rank: int, world: int, variant: str, mode: str = "channel") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One engine, one training step: (fp32 masters after it, facts about the run)."""
    block = {"enabled": True, "mode": mode, "full_stats": bool(case.get("full_stats"))}
    engine = build_engine(case, world, block if variant == "gc" else None)
    handle = engine.dist_gc
    facts: dict[str, Any] = {}
    if variant == "gc":
        assert handle is not None and handle.enabled, f"{case['id']}: GC not attached"
        facts["binding"] = handle.label
        facts["phases"] = len(handle.engines)
    else:
        assert handle is None, f"{case['id']}: GC attached without a gradient_centralization block"
    if variant in ("naive", "forced"):
        inner_optimizer(engine).register_step_pre_hook(_naive_hook if variant == "naive" else _forced_hook)
    train_step(engine, case, rank, world)
    facts["skipped_steps"] = engine.skipped_steps
    if handle is not None:
        facts["gc_steps"] = handle.engines[0].steps
        st = handle.stats
        facts["gc_bytes"] = st.bytes_communicated
        facts["stats"] = (st.grad_norm_before, st.grad_norm_after, st.max_abs_mean_before, st.max_abs_mean_after)
    out = master_weights(engine)
    if handle is not None:
        handle.remove()
    engine.destroy()
    return out, facts


# --------------------------------------------------------------------------- oracle
def initial_masters(case: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The fp32 masters DeepSpeed starts from: the model cast to the training dtype."""
    return {n: p.detach().double() for n, p in make_shifted_model(0).to(DTYPES[case.get("dtype", "fp32")]).named_parameters()}


def oracle(case: dict[str, Any], mode: str | None) -> dict[str, torch.Tensor]:
    """Single process, global batch, full tensors: params after clip -> GC (``mode``;
    None = no GC) -> update. SGD(lr=1); Adam cases apply torch.optim.Adam (fp64) to
    the clipped, centralized gradient. 16-bit cases compute from the model cast to that
    dtype, as DeepSpeed trains it."""
    dtype = DTYPES[case.get("dtype", "fp32")]
    model = make_shifted_model(0).to(dtype)
    if case.get("frozen"):
        for name, p in model.named_parameters():
            if name in FROZEN:
                p.requires_grad_(False)
    images, tokens, labels = make_batch(1)
    batch = (images.to(dtype), tokens, labels)
    dims = dict(GCTestNet.OUTPUT_DIMS) if mode is not None else {}
    if case.get("frozen"):
        dims = {n: d for n, d in dims.items() if n not in FROZEN}
    new = oracle_step(model, lambda m: loss_on(m, batch), dims, mode or "channel", clip=case.get("clip"))
    if case.get("opt", "sgd") not in ADAM_OPTS:
        return new
    out = {}
    for name, p in model.named_parameters():
        w0 = p.detach().double()
        if not p.requires_grad:
            out[name] = w0
            continue
        w = torch.nn.Parameter(w0.clone())
        w.grad = w0 - new[name]  # the clipped, centralized gradient
        torch.optim.Adam([w], **adam_hparams(case)).step()
        out[name] = w.detach()
    return out


def oracle_norms(case: dict[str, Any], mode: str) -> tuple[float, float]:
    """Global L2 norm of the GC targets' (clipped) gradient before and after GC, from
    the oracle step (SGD lr=1: the gradient is the parameter change)."""
    w0 = initial_masters(case)
    off, on = oracle(dict(case, opt="sgd"), None), oracle(dict(case, opt="sgd"), mode)
    names = [n for n in GCTestNet.OUTPUT_DIMS if not (case.get("frozen") and n in FROZEN)]
    before = math.sqrt(sum(float((w0[n] - off[n]).pow(2).sum()) for n in names))
    after = math.sqrt(sum(float((w0[n] - on[n]).pow(2).sum()) for n in names))
    return before, after


def project(update: dict[str, torch.Tensor], mode: str, frozen: bool) -> dict[str, torch.Tensor]:
    """GC of an SGD(lr=1) update (minus the gradient) by the oracle formula."""
    dims = {n: d for n, d in GCTestNet.OUTPUT_DIMS.items() if not (frozen and n in FROZEN)}
    return {n: oracle_centralize(u, mode, dims[n]) if n in dims else u for n, u in update.items()}


def errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: float((got[n] - want[n]).abs().max()) for n in want}


# --------------------------------------------------------------------------- suites
def run_cases(rank: int, world: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Exactness cases: per case, per-parameter max errors of every variant."""
    setup_worker()
    results = []
    for case in cases:
        t0 = time.perf_counter()
        res: dict[str, Any] = {"id": case["id"], "err": {}, "projected": {}, "facts": {}}
        low = case.get("dtype", "fp32") != "fp32" and is_linear(case)
        w0 = initial_masters(case)
        masters: dict[str, dict[str, torch.Tensor]] = {}
        for mode in case.get("modes", MODES):
            masters[mode], res["facts"][mode] = run_variant(case, rank, world, "gc", mode)
            if case.get("oracle", True):
                res["err"][mode] = errors(masters[mode], oracle(case, mode))
        if case.get("controls", False):
            for variant in ("naive", "forced"):
                masters[variant], res["facts"][variant] = run_variant(case, rank, world, variant)
                if case.get("oracle", True):
                    res["err"][variant] = errors(masters[variant], oracle(case, "channel"))
        if low:
            # GC-on must equal the oracle projection of DeepSpeed's own GC-off update
            # (same reduced, unscaled, clipped gradient): isolates GC from the 16-bit
            # forward/backward rounding, at fp32 precision.
            off, res["facts"]["off"] = run_variant(case, rank, world, "off")
            for key, got in masters.items():
                mode = key if key in MODES else "channel"
                proj = project({n: off[n] - w0[n] for n in w0}, mode, case.get("frozen", False))
                res["projected"][key] = errors(got, {n: w0[n] + proj[n] for n in w0})
        res["seconds"] = time.perf_counter() - t0
        results.append(res)
        progress(f"{case['id']} ({res['seconds']:.0f} s)")
        settle()
    return results


def run_overflow(rank: int, world: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """fp16 dynamic loss scaling starting far too high: every overflow step must be
    skipped (masters unchanged, GC not run, loss scale lowered); the first good step
    must match the oracle's single step from the initial weights."""
    setup_worker()
    out = []
    for case in cases:
        engine = build_engine(case, world, {"enabled": True, "mode": case.get("mode", "channel")})
        w0 = master_weights(engine)
        log = []
        for _ in range(40):
            scale = float(engine.optimizer.loss_scale)
            skipped = engine.skipped_steps
            train_step(engine, case, rank, world)
            now = master_weights(engine)
            overflow = engine.skipped_steps > skipped
            log.append({
                "scale_before": scale,
                "scale_after": float(engine.optimizer.loss_scale),
                "overflow": overflow,
                "gc_steps": engine.dist_gc.engines[0].steps,
                "changed": max(float((now[n] - w0[n]).abs().max()) for n in w0),
            })
            if not overflow:
                break
        res = {"id": case["id"], "log": log, "err": errors(now, oracle(case, case.get("mode", "channel")))}
        engine.dist_gc.remove()
        engine.destroy()
        out.append(res)
    return out


def _expect_error(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the message is the result
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def run_config_checks(rank: int, world: int, config_dir: str, with_cpu_adam: bool, with_fused_adam: bool) -> dict[str, Any]:
    """The JSON flag, entry points, misuse and unsupported combinations. Every check
    runs on every rank; each returns the error text (or facts) for the parent."""
    import deepspeed

    import dist_gc
    import dist_gc.deepspeed

    res: dict[str, Any] = {}
    # torchrun-style start: drop the harness' group and let DeepSpeed initialise from
    # the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as under torchrun
    # or the deepspeed launcher.
    dist.destroy_process_group()
    deepspeed.init_distributed(dist_backend="gloo")
    res["env_init"] = (dist.is_initialized(), dist.get_world_size(), dist.get_rank())
    allow_cpu_fp16()
    gc.collect()
    gc.freeze()
    base = {"id": "flag", "stage": 2, "clip": 0.5}
    got, facts = run_variant(base, rank, world, "gc", "channel")
    res["env_init_err"] = max(errors(got, oracle(base, "channel")).values())

    def init_with(block: Any, case: dict[str, Any] = base) -> Any:
        cfg = ds_config(case, world, None)
        cfg["gradient_centralization"] = block
        model = make_case_model(case)
        return dist_gc.deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=cfg)

    # Bad blocks: ValueError on every rank before DeepSpeed (or any collective) runs.
    bad = {
        "unknown_key": {"enabled": True, "mdoe": "tensor"},
        "bad_mode": {"mode": "rows"},
        "bad_min_ndim": {"min_ndim": 0},
        "bad_enabled": {"enabled": "yes"},
        "not_a_mapping": ["channel"],
        "include_matches_nothing": {"include": ["nosuch.*"]},
        "exclude_matches_nothing": {"exclude": ["*.nosuch"]},
        "output_dim_out_of_range": {"output_dim": {"fc1.weight": 5}},
    }
    for key, block in bad.items():
        res[f"bad:{key}"] = _expect_error(lambda block=block: init_with(block))
    # Disabled / absent block: no handle, plain DeepSpeed.
    engine = init_with({"enabled": False})[0]
    res["disabled"] = engine.dist_gc is None
    engine.destroy()
    cfg = ds_config(base, world, None)
    model = make_case_model(base)
    engine = dist_gc.deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=cfg)[0]
    res["absent"] = engine.dist_gc is None
    engine.destroy()

    # args.deepspeed_config (a path), as the deepspeed launcher passes it.
    class Args:
        local_rank = rank
        deepspeed_config = os.path.join(config_dir, f"args_{rank}.json")

    with open(Args.deepspeed_config, "w") as f:
        f.write("// DeepSpeed reads configs with hjson: comments are allowed, dist_gc must cope\n")
        json.dump(ds_config(base, world, {"enabled": True, "mode": "tensor", "exclude": ["head.*"]}), f)
    model = make_case_model(base)
    engine = dist_gc.deepspeed.initialize(args=Args(), model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0))[0]
    res["args_path"] = (engine.dist_gc.config.mode, sorted(engine.dist_gc.stats.skipped))
    engine.destroy()

    # Example configs shipped in dist_gc/configs/deepspeed/: each trains one step with GC on.
    res["examples"] = {}
    repo_configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dist_gc", "configs", "deepspeed")
    for fname in sorted(os.listdir(repo_configs)):
        path = os.path.join(repo_configs, fname)
        with open(path) as f:
            cfg = json.load(f)
        if "offload_optimizer" in json.dumps(cfg) and not with_cpu_adam:
            res["examples"][fname] = "skipped: DeepSpeedCPUAdam op unavailable"
            continue
        cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"] = 12 // world, 1
        cfg.pop("train_batch_size", None)
        if "optimizer" in cfg and not with_fused_adam and "offload_optimizer" not in cfg["zero_optimization"]:
            cfg["optimizer"]["params"]["torch_adam"] = True  # FusedAdam's CPU op unavailable here
        local = os.path.join(config_dir, f"{rank}_{fname}")
        with open(local, "w") as f:
            json.dump(cfg, f)
        case = {"stage": cfg["zero_optimization"]["stage"], "dtype": "bf16" if cfg.get("bf16", {}).get("enabled") else "fp32"}
        model = make_case_model(case)
        if "optimizer" in cfg:
            engine = dist_gc.deepspeed.initialize(model=model, model_parameters=model.parameters(), config=local)[0]
        else:  # the accelerate_*.json configs: the script's own torch optimizer
            engine = dist_gc.deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3), config=local)[0]
        train_step(engine, case, rank, world)
        h = engine.dist_gc
        res["examples"][fname] = (h.label, h.engines[0].steps, len(h.stats.centralized))
        h.remove()
        engine.destroy()

    # Misuse: DeepSpeed objects other than the engine.
    engine = build_engine(base, world, None)
    res["attach_wrapper"] = _expect_error(lambda: dist_gc.attach(engine.optimizer))
    res["attach_inner_partitions"] = _expect_error(lambda: dist_gc.attach(engine.optimizer.optimizer))
    res["attach_model_engine"] = _expect_error(lambda: dist_gc.attach(torch.optim.SGD(engine.module.parameters(), lr=1.0), model=engine))
    # An optimizer swapped after attach must not silently turn GC off.
    handle = dist_gc.attach(engine)
    engine.optimizer.optimizer = torch.optim.SGD(engine.optimizer.optimizer.param_groups, lr=1.0)
    res["swapped_optimizer"] = _expect_error(lambda: train_step(engine, base, rank, world))
    handle.remove()
    engine.destroy()
    z3 = build_engine({"id": "z3", "stage": 3}, world, None)
    res["attach_inner_z3"] = _expect_error(lambda: dist_gc.attach(z3.optimizer.optimizer))
    z3.destroy()

    # A layout that disagrees with DeepSpeed's actual buffers is caught at attach time,
    # on every rank: corrupt the metadata dist_gc reads (then restore it).
    engine = build_engine({"id": "rr", "stage": 2, "zero": {"round_robin_gradients": True}}, world, None)
    offsets = engine.optimizer.round_robin_bit16_offsets[0]
    saved = list(offsets)
    offsets[1], offsets[2] = offsets[2], offsets[1]
    res["corrupt_zero2"] = _expect_error(lambda: dist_gc.attach(engine))
    offsets[:] = saved
    handle = dist_gc.attach(engine)  # the true layout verifies
    handle.remove()
    engine.destroy()
    engine = build_engine({"id": "z3", "stage": 3, "zero": {"sub_group_size": 300}}, world, None)
    group = engine.optimizer.fp16_groups[0]
    group[0], group[1] = group[1], group[0]
    res["corrupt_zero3"] = _expect_error(lambda: dist_gc.attach(engine))
    group[0], group[1] = group[1], group[0]
    dist_gc.attach(engine).remove()
    engine.destroy()

    res["engine_block"] = run_engine_block_checks(rank, world)
    # Still refused: ZeRO++ quantized gradients (DeepSpeed builds the engine on CPU; its
    # quantizer only fails in the first backward), with the reason.
    res["qgz"] = _expect_error(lambda: init_with({"enabled": True}, {"id": "qgz", "stage": 3, "zero": {"zero_quantized_gradients": True}}))
    dist.barrier()
    # Supported now: ZeRO++ hierarchical partitioning (hpZ) keeps ZeRO-3's fp32 gradient
    # layout (tests/test_deepspeed_scale.py proves it at W=4). Last here: DeepSpeed keeps
    # the hpZ group process-global and hands it to every later ZeRO-3 engine.
    hpz_case = {"id": "hpz", "stage": 3, "zero": {"zero_hpz_partition_size": world}}
    got, facts = run_variant(hpz_case, rank, world, "gc", "channel")
    res["hpz"] = (facts["binding"], max(errors(got, oracle(hpz_case, "channel")).values()))
    dist.barrier()
    return res


def run_engine_block_checks(rank: int, world: int) -> dict[str, Any]:
    """``dist_gc.attach(engine)`` on engines built by plain ``deepspeed.initialize``:
    the engine's own block is the source of truth (issue 11)."""
    import warnings

    import deepspeed

    import dist_gc

    out: dict[str, Any] = {}
    base = {"id": "block", "stage": 2}

    def engine_with(block: Any, key: str = "gradient_centralization") -> Any:
        cfg = ds_config(base, world, None)
        if block is not None:
            cfg[key] = block
        model = make_case_model(base)
        return deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=cfg)[0]

    engine = engine_with({"enabled": False, "mode": "tensor"})
    handle = dist_gc.attach(engine)
    out["disabled"] = (handle.enabled, engine.optimizer.optimizer._optimizer_step_pre_hooks == {})
    engine.destroy()
    engine = engine_with({"mode": "tensor", "min_ndim": "auto"})  # no "enabled": a present block means on
    out["disagree"] = _expect_error(lambda: dist_gc.attach(engine, config={"mode": "channel"}))
    handle = dist_gc.attach(engine, config={"mode": "tensor"})  # agreeing: fine
    out["from_block"] = (handle.enabled, handle.config.mode, handle.config.min_ndim, handle.source)
    train_step(engine, base, rank, world)
    got = {n: p.detach().double() for n, p in master_weights(engine).items()}
    out["from_block_err"] = max(errors(got, oracle(base, "tensor")).values())
    handle.remove()
    engine.destroy()
    engine = engine_with({})  # {} is on, with the defaults
    handle = dist_gc.attach(engine)
    out["empty_block"] = (handle.enabled, handle.config.mode)
    handle.remove()
    engine.destroy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = engine_with({"mode": "tensor"}, key="gradient_centralisation")  # British spelling: not read
        handle = dist_gc.attach(engine)
    out["near_miss"] = (handle.config.mode, [str(w.message) for w in caught if "gradient_centralisation" in str(w.message)])
    handle.remove()
    engine.destroy()

    # The wrapper's deepspeed.initialize patch: no block -> DIST_GC_CONFIG (accelerate's
    # YAML-only DeepSpeed configs); a block and a disagreeing DIST_GC_CONFIG -> error.
    from dist_gc import _autopatch

    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dist_gc_block_checks_{os.getpid()}.yaml")
    with open(path, "w") as f:
        f.write("mode: tensor\n")
    os.environ["DIST_GC_CONFIG"] = path
    try:
        engine = engine_with(None)
        _autopatch._on_deepspeed_engine(engine)
        h = engine.dist_gc
        out["wrapper_env"] = (h.origin, h.config.mode, h.source)
        out["wrapper_user_again"] = dist_gc.attach(engine, config={"mode": "tensor"}) is h  # one attach per optimizer
        h.remove()
        engine.destroy()
        engine = engine_with({"mode": "channel"})
        out["wrapper_disagree"] = _expect_error(lambda: _autopatch._on_deepspeed_engine(engine))
        engine.destroy()
    finally:
        del os.environ["DIST_GC_CONFIG"]
        os.unlink(path)
    return out
