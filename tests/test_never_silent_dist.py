"""Never a silent no-op, on real process groups (gloo, W = 2 and 3): the grouped /
depthwise ConvTranspose geometry exact against the single-process oracle on DDP (step
hook and comm hook), FSDP1, FSDP2 and ZeRO-1/2/3, with a negative control (the
ungrouped dim-1 mean an ``output_dim`` override alone would give) that must fail; and at
W = 2: FSDP2 applied to a Hugging Face style ``Conv1D`` itself (a generated
``FSDPConv1D`` class), a closure under DDP, a sparse embedding refused at attach on
every rank, and GC attached BEFORE ``deepspeed.initialize`` failing loudly at the first
step on every rank (ZeRO-1/2/3) instead of reporting a raw update as centralized.

One spawn per world size runs every engine (process start-up dominates)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dist_gc
from dist_gc.core.select import clean_name
from tests import models
from tests.harness import run_distributed
from tests.oracle import oracle_centralize, oracle_centralize_conv_transpose

GLOBAL_BATCH = 12
FP32_TOL = 1e-5
FAR = 100 * FP32_TOL
#: ConvTranspose weights and their groups; the head is a Linear (output dim 0).
GROUPS = {"up.weight": 2, "dw.weight": 4}
#: The negative control: an output_dim override alone gives an UNGROUPED dim-1 mean.
UNGROUPED = {"output_dim": {"up.weight": 1, "dw.weight": 1}}


class GroupedNet(nn.Module):
    """A grouped ConvTranspose2d (weight (6, 2, 2, 2): 2 groups of 3 inputs -> 2 outputs
    each), a depthwise ConvTranspose1d (weight (4, 1, 3)) and a Linear head; sizes put
    row and tensor boundaries inside shards at W = 2, 3."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(6, 4, 2, groups=2)
        self.dw = nn.ConvTranspose1d(4, 4, 3, groups=4)
        self.head = nn.Linear(4 * 18, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.up(x))                 # (N, 4, 4, 4)
        h = torch.tanh(self.dw(h.flatten(2)))      # (N, 4, 18)
        return self.head(h.flatten(1))


def make_grouped(seed: int = 0) -> GroupedNet:
    torch.manual_seed(seed)
    return GroupedNet()


def grouped_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(GLOBAL_BATCH, 6, 3, 3, generator=g) + 0.5  # offset: non-zero channel means
    return x, torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)


def grouped_loss(model: nn.Module, batch) -> torch.Tensor:
    x, labels = batch  # MSE to one-hot (softmax gradients would zero tensor-mode means)
    out = model(x).float()
    return F.mse_loss(out, F.one_hot(labels, 5).float()) * models.LOSS_SCALE


def grouped_oracle(ungrouped: bool = False) -> dict[str, torch.Tensor]:
    """Parameters after one SGD(lr=1) step of the full model on the global batch, GC by
    the formula written out per output channel (``ungrouped``: the wrong dim-1 mean)."""
    model = make_grouped()
    grouped_loss(model, grouped_batch()).backward()
    out = {}
    for n, p in model.named_parameters():
        g = p.grad.double()
        if n in GROUPS:
            g = oracle_centralize(g, "channel", 1) if ungrouped else oracle_centralize_conv_transpose(p.grad, GROUPS[n])
        elif p.dim() >= 2:
            g = oracle_centralize(g, "channel", 0)
        out[n] = p.detach().double() - g
    return out


# ----------------------------------------------------------------------------- worker
def _slice(batch, rank: int, world: int):
    return models.local_slice(batch, rank, world)


def _ddp(rank, world, config, hook=False):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_grouped()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=1.0)
    if hook:
        ddp.register_comm_hook(dist_gc.hooks.GCHookState.from_model(ddp, config), dist_gc.hooks.gc_allreduce_hook)
    else:
        dist_gc.attach(opt, model=ddp, config=config)
    grouped_loss(ddp, _slice(grouped_batch(), rank, world)).backward()
    opt.step()
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def _fsdp1(rank, world, config):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    fm = FSDP(make_grouped(), device_id=torch.device("cpu"))
    opt = torch.optim.SGD(fm.parameters(), lr=1.0)
    dist_gc.attach(opt, model=fm, config=config)
    grouped_loss(fm, _slice(grouped_batch(), rank, world)).backward()
    opt.step()
    with FSDP.summon_full_params(fm):
        return {clean_name(n): p.detach().double().clone() for n, p in fm.named_parameters()}


def _fsdp2(rank, world, config):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_grouped()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dist_gc.attach(opt, model=model, config=config)
    grouped_loss(model, _slice(grouped_batch(), rank, world)).backward()
    opt.step()
    return {n: p.full_tensor().detach().double() for n, p in model.named_parameters()}


def _ds_config(stage: int, world: int) -> dict:
    return {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9, "gradient_clipping": 0.0}


def _zero(rank, world, stage, config):
    import deepspeed

    from tests.ds_cases import master_weights

    model = make_grouped()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=_ds_config(stage, world))
    handle = dist_gc.attach(engine, config=config)
    engine.backward(grouped_loss(engine, _slice(grouped_batch(), rank, world)))
    engine.step()
    out = master_weights(engine)
    handle.remove()
    engine.destroy()
    return out


def _attach_before_initialize(rank, world, stage) -> str:
    """The user's mistake: attach to the optimizer, THEN hand it to deepspeed.initialize.
    DeepSpeed swaps its param groups for flat fp32 partitions; GC must fail loudly."""
    import deepspeed

    model = make_grouped()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = dist_gc.attach(opt, model=model)
    engine = None
    try:
        # (ZeRO-1/2 already step the optimizer inside initialize, to create its states.)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config(stage, world))
        engine.backward(grouped_loss(engine, _slice(grouped_batch(), rank, world)))
        engine.step()
        return "no error"
    except Exception as exc:  # noqa: BLE001 - the message is the result
        return f"{type(exc).__name__}: {exc}"
    finally:
        handle.remove()
        if engine is not None:
            engine.destroy()


def _fsdp2_on_conv1d(rank, world) -> dict[str, torch.Tensor]:
    """fully_shard applied to the Conv1D module itself: FSDP2 swaps its class for a
    generated FSDPConv1D; its weight (in, out) must still be centralized along dim -1."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = models.make_model()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model.proj, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert type(model.proj).__name__ == "FSDPConv1D", type(model.proj)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dist_gc.attach(opt, model=model)
    models.loss_on(model, models.local_slice(models.make_batch(), rank, world)).backward()
    opt.step()
    return {n: p.full_tensor().detach().double() for n, p in model.named_parameters()}


def _ddp_closure(rank, world) -> dict[str, torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = models.make_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=1.0)
    dist_gc.attach(opt, model=ddp)
    batch = models.local_slice(models.make_batch(), rank, world)

    def closure():
        opt.zero_grad()
        loss = models.loss_on(ddp, batch)
        loss.backward()
        return loss

    opt.step(closure)
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def _sparse_refused(rank, world) -> str:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(nn.Sequential(nn.Embedding(7, 3, sparse=True), nn.Linear(3, 2)))
    try:
        dist_gc.attach(torch.optim.SGD(ddp.parameters(), lr=1.0), model=ddp)
    except ValueError as exc:
        return str(exc)
    return "no error"


def never_silent_worker(rank: int, world: int) -> dict:
    warnings.filterwarnings("ignore")
    from tests.ds_cases import setup_worker

    setup_worker()
    out: dict = {}
    out["ddp"] = _ddp(rank, world, None)
    out["ddp_hook"] = _ddp(rank, world, None, hook=True)
    out["ddp_ungrouped"] = _ddp(rank, world, UNGROUPED)
    out["fsdp1"] = _fsdp1(rank, world, None)
    out["fsdp2"] = _fsdp2(rank, world, None)
    for stage in (1, 2, 3):
        out[f"zero{stage}"] = _zero(rank, world, stage, None)
    out["zero2_ungrouped"] = _zero(rank, world, 2, UNGROUPED)
    if world == 2:
        out["fsdp2_conv1d"] = _fsdp2_on_conv1d(rank, world)
        out["ddp_closure"] = _ddp_closure(rank, world)
        out["sparse"] = _sparse_refused(rank, world)
        for stage in (1, 2, 3):
            out[f"before_init_zero{stage}"] = _attach_before_initialize(rank, world, stage)
    return out


def _err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: float((got[n] - want[n]).abs().max()) for n in want}


@pytest.mark.parametrize("world", [2, 3])
def test_never_silent_on_sharded_engines(world):
    per_rank = run_distributed(never_silent_worker, world)
    res = per_rank[0]
    want, wrong = grouped_oracle(), grouped_oracle(ungrouped=True)
    # The test can fail: GC changes each ConvTranspose update, and grouping matters.
    plain = make_grouped()
    grouped_loss(plain, grouped_batch()).backward()
    for n in GROUPS:
        assert float((want[n] - (plain.get_parameter(n).detach().double() - plain.get_parameter(n).grad.double())).abs().max()) > FAR
        assert float((want[n] - wrong[n]).abs().max()) > FAR
    failures = []
    for case in ("ddp", "ddp_hook", "fsdp1", "fsdp2", "zero1", "zero2", "zero3"):
        errs = _err(res[case], want)
        bad = {n: e for n, e in errs.items() if e > FP32_TOL}
        if bad:
            failures.append(f"{case}: {bad}")
    for case in ("ddp_ungrouped", "zero2_ungrouped"):  # negative controls must fail
        errs = _err(res[case], want)
        if max(errs[n] for n in GROUPS) < FAR:
            failures.append(f"{case}: the ungrouped control matched the oracle ({errs})")
    assert not failures, "\n".join(failures)
    if world != 2:
        return
    # FSDP2 on Conv1D itself: exact vs the oracle with output dim -1; naive dim 0 is not.
    model, batch = models.make_model(), models.make_batch()
    oracle = functools.partial(models.loss_on, batch=batch)
    from tests.oracle import oracle_step

    exact = oracle_step(model, oracle, models.GCTestNet.OUTPUT_DIMS, "channel")
    errs = _err(res["fsdp2_conv1d"], exact)
    assert max(errs.values()) <= FP32_TOL, errs
    dim0 = oracle_step(model, oracle, {**models.GCTestNet.OUTPUT_DIMS, "proj.weight": 0}, "channel")
    assert float((dim0["proj.weight"] - exact["proj.weight"]).abs().max()) > FAR
    errs = _err(res["ddp_closure"], exact)
    assert max(errs.values()) <= FP32_TOL, f"closure under DDP: {errs}"
    for r in range(world):
        sparse = per_rank[r]["sparse"]
        assert "'0.weight'" in sparse and "sparse" in sparse and "exclude" in sparse, f"rank {r}: {sparse}"
        for stage in (1, 2, 3):
            msg = per_rank[r][f"before_init_zero{stage}"]
            assert msg.startswith("RuntimeError") and "attach after it, to the engine" in msg, f"rank {r} ZeRO-{stage}: {msg}"
