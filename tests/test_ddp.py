"""Single process and DDP (gloo, W = 1..4) against the single-process oracle, for both
strategies: the optimizer pre-step hook (``dist_gc.attach``) and the DDP comm hooks."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import dist_gc
from dist_gc import GCConfig
from dist_gc.hooks import GCHookState, gc_allreduce_hook, gc_wrapper
from tests.harness import run_distributed
from tests.models import GCTestNet, local_slice, loss_on, make_batch, make_model
from tests.oracle import naive_centralize, oracle_step

CLIP = 0.05  # well below the gradient norm, so clipping is active


def _cases():
    for mode in ("channel", "tensor"):
        for dtype in ("float32", "bfloat16"):
            yield ("attach", mode, dtype, None)
            yield ("comm_hook", mode, dtype, None)
        yield ("attach", mode, "float32", CLIP)
        yield ("comm_hook", mode, "float32", CLIP)  # documented order: GC, then clip
        yield ("comm_hook_bf16_compress", mode, "float32", None)
    yield ("naive", "channel", "float32", None)


CASES = list(_cases())


def _run_case(rank, world, strategy, mode, dtype_name, clip):
    dtype = getattr(torch, dtype_name)
    model = make_model(0, dtype)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=1.0)
    config = GCConfig(mode=mode)
    handle = None
    if strategy == "attach":
        handle = dist_gc.attach(opt, model=ddp, config=config)
    elif strategy == "comm_hook":
        ddp.register_comm_hook(GCHookState.from_model(ddp, config), gc_allreduce_hook)
    elif strategy == "comm_hook_bf16_compress":
        ddp.register_comm_hook(GCHookState.from_model(ddp, config, inner_state=dist.group.WORLD), gc_wrapper(bf16_compress_hook))
    elif strategy == "naive":  # what peers do: dim 0, inside the optimizer
        def naive_hook(o, args, kwargs):
            for p in ddp.parameters():
                p.grad.copy_(naive_centralize(p.grad))

        opt.register_step_pre_hook(naive_hook)
    batch = local_slice(make_batch(1, dtype), rank, world)
    loss_on(ddp, batch).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), clip)
    opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = None
    if handle is not None:
        stats = (handle.stats.bytes_communicated, sorted(handle.stats.centralized), dict(handle.stats.skipped))
    return params, stats


def ddp_worker(rank, world, cases):
    return {case: _run_case(rank, world, *case) for case in cases}


def _tolerance(dtype: torch.dtype, want: torch.Tensor, grad_scale: float, world: int, compressed: bool) -> float:
    if dtype == torch.float32 and not compressed:
        return 1e-5
    # bf16 parameters (or a bf16-compressed all-reduce): the oracle's and the run's
    # gradients differ by bf16 rounding of the backward pass and of the W-way reduction
    # (each <= eps/2 relative, ~(W + 4) roundings of values <= max|g|), and the updated
    # parameter is rounded once more to bf16 (eps/2 * max|p_new|).
    eps = torch.finfo(torch.bfloat16).eps
    param_rounding = eps / 2 * float(want.abs().max()) if dtype != torch.float32 else 0.0
    return param_rounding + (world + 4) * eps / 2 * grad_scale


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ddp_matches_oracle(world):
    per_rank = run_distributed(ddp_worker, world, CASES)
    failures = []
    for case in CASES:
        strategy, mode, dtype_name, clip = case
        dtype = getattr(torch, dtype_name)
        model = make_model(0, dtype)
        batch = make_batch(1, dtype)
        want = oracle_step(model, functools.partial(loss_on, batch=batch), GCTestNet.OUTPUT_DIMS, mode, clip=clip,
                           gc_before_clip=strategy.startswith("comm_hook"))
        no_gc = oracle_step(model, functools.partial(loss_on, batch=batch), {}, mode, clip=clip)
        params, stats = per_rank[0][case]
        for r in range(1, world):  # every rank holds the same result
            for n in params:
                assert torch.equal(params[n], per_rank[r][case][0][n]), f"{case}: rank {r} differs on {n}"
        grad_scale = max(float((no_gc[n] - p.detach().double()).abs().max()) for n, p in model.named_parameters())
        errs = {n: float((params[n].double() - want[n]).abs().max()) for n in want}
        tol = {n: _tolerance(dtype, want[n], grad_scale, world, "compress" in strategy) for n in want}
        bad = {n: e for n, e in errs.items() if e > tol[n]}
        if strategy == "naive":
            # Negative control: hard-coded dim 0 is wrong on ConvTranspose (dim 1) and
            # Conv1D (last dim) by far more than the tolerance.
            for n in ("deconv.weight", "proj.weight"):
                if errs[n] < 100 * tol[n]:
                    failures.append(f"{case}: naive GC matched the oracle on {n} (err {errs[n]:.3g})")
            continue
        if bad:
            failures.append(f"{case}: " + ", ".join(f"{n} err {e:.3g} > {tol[n]:.3g}" for n, e in bad.items()))
        if stats is not None:
            assert stats[0] == 0, "DDP holds whole gradients: GC must not communicate"
            assert stats[1] == sorted(GCTestNet.OUTPUT_DIMS), stats[1]
            assert {"conv.bias", "norm.weight", "head.bias"} <= set(stats[2]), stats[2]
    assert not failures, "\n".join(failures)


def test_gc_changes_every_weight_by_far_more_than_tolerance():
    model, batch = make_model(0), make_batch(1)
    loss = functools.partial(loss_on, batch=batch)
    for mode in ("channel", "tensor"):
        with_gc = oracle_step(model, loss, GCTestNet.OUTPUT_DIMS, mode)
        without = oracle_step(model, loss, {}, mode)
        for n in GCTestNet.OUTPUT_DIMS:
            change = float((with_gc[n] - without[n]).abs().max())
            assert change > 1e-3, f"{mode}: GC changes {n} by only {change:.3g} (tolerance 1e-5)"


def test_single_process_attach_stats_remove_and_adam():
    model, batch = make_model(0), make_batch(1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = dist_gc.attach(opt, model=model, config=GCConfig(full_stats=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_on(model, batch).backward()
    opt.step()
    s = handle.stats
    assert s.step == 1 and s.max_abs_mean_before > 1e-3
    assert s.max_abs_mean_after is not None and s.max_abs_mean_after < 1e-6
    # GC is an orthogonal projection: it can only shrink the gradient norm.
    assert s.grad_norm_after < s.grad_norm_before
    assert s.bytes_communicated == 0 and s.collectives == 0 and s.seconds > 0
    assert set(s.as_dict()) >= {"step", "max_abs_mean_before", "grad_norm_before", "bytes_communicated"}
    for n in GCTestNet.OUTPUT_DIMS:  # SGD(lr=1): the update is the centralized gradient
        update = (before[n] - model.get_parameter(n).detach()).double()
        d = GCTestNet.OUTPUT_DIMS[n] % update.dim()
        dims = tuple(i for i in range(update.dim()) if i != d)
        assert float(update.mean(dims).abs().max()) < 1e-6, n
    # remove() restores plain behaviour exactly.
    handle.remove()
    plain_model = copy.deepcopy(model)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=1.0)
    for m, o in ((model, opt), (plain_model, plain_opt)):
        o.zero_grad()
        loss_on(m, batch).backward()
        o.step()
    for (n, p), q in zip(model.named_parameters(), plain_model.parameters()):
        assert torch.equal(p, q), n
    # Adam: GC runs before the moment estimates, i.e. Adam sees the centralized grad.
    m1, m2 = make_model(0), make_model(0)
    o1, o2 = torch.optim.Adam(m1.parameters(), lr=1e-2), torch.optim.Adam(m2.parameters(), lr=1e-2)
    dist_gc.attach(o1, model=m1)
    loss_on(m1, batch).backward()
    loss_on(m2, batch).backward()
    for n, p in m2.named_parameters():
        if n in GCTestNet.OUTPUT_DIMS:
            dist_gc.centralize_(p.grad, output_dim=GCTestNet.OUTPUT_DIMS[n])
    o1.step()
    o2.step()
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


def test_trust_ratio_optimizer_warns():
    class Lamb(torch.optim.SGD):
        pass

    model = make_model(0)
    with pytest.warns(UserWarning, match="trust-ratio"):
        dist_gc.attach(Lamb(model.parameters(), lr=0.1), model=model)


def test_disabled_config_attaches_nothing():
    model = make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = dist_gc.attach(opt, model=model, config={"enabled": False})
    assert not handle.enabled and not opt._optimizer_step_pre_hooks


def test_flat_parameter_without_model_is_refused():
    from torch.distributed.fsdp._flat_param import FlatParameter

    p = FlatParameter(torch.zeros(8), requires_grad=True)
    with pytest.raises(ValueError, match="FlatParameter"):
        dist_gc.attach(torch.optim.SGD([p], lr=1.0))
