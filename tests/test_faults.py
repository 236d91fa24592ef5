"""Fault injection: what works today stays true.

* A rank killed inside ``optimizer.step`` (after GC ran) makes the survivor fail
  quickly with GC on — no slower than with GC off (gloo sees the closed connection).
* A skipped step (fp16 ``GradScaler`` overflow) runs no GC; the next good step does.
* Gradient accumulation: GC runs once per real update, on the accumulated gradient.
* Resume from a checkpoint is bit-exact, GC's step count included.
* No memory growth over a long run.
"""

from __future__ import annotations

import io
import os
import time

import torch

import dist_gc
from tests import models
from tests.harness import run_distributed
from tests.oracle import oracle_step


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not in /proc/self/status")


def killed_rank_worker(rank: int, world: int, gc_on: bool) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = models.make_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    if gc_on:
        dist_gc.attach(opt, model=ddp)
    if rank == 1:
        def die(optimizer, args, kwargs):  # registered after GC's hook: dies inside step, after GC
            if die.calls == 1:
                os._exit(17)
            die.calls += 1

        die.calls = 0
        opt.register_step_pre_hook(die)
    batch = models.local_slice(models.make_batch(), rank, world)
    t_dead = None
    try:
        for _ in range(5):
            opt.zero_grad()
            models.loss_on(ddp, batch).backward()
            opt.step()
            t_dead = time.monotonic()  # (rank 0) the last step that completed
    except Exception as exc:  # noqa: BLE001 - the survivor's error is the result
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}", "seconds": time.monotonic() - t_dead}
    return {"error": None, "seconds": None}


def test_survivor_fails_fast_when_a_rank_dies_inside_step():
    results = {}
    for gc_on in (False, True):
        per_rank = run_distributed(killed_rank_worker, 2, gc_on, timeout=300, may_die=(1,))
        assert per_rank[1] is None, "rank 1 must have died"
        results[gc_on] = per_rank[0]
        assert per_rank[0]["error"] is not None, f"gc_on={gc_on}: the survivor ran on as if nothing happened"
    # Quickly, and no slower with GC than without (margin for a machine twice as slow).
    assert results[True]["seconds"] < 60, results
    assert results[True]["seconds"] <= results[False]["seconds"] + 20, results


def test_overflow_step_runs_no_gc_and_the_next_good_step_does():
    model = models.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = dist_gc.attach(opt, model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=1000)  # overflows in fp16 first
    batch = models.make_batch()
    steps = []
    for _ in range(40):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = models.loss_on(model, batch)
        scaler.scale(loss).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        scaler.step(opt)
        scaler.update()
        changed = any(not torch.equal(before[n], p) for n, p in model.named_parameters())
        steps.append((changed, handle.steps))
        if changed:
            break
    assert len(steps) > 1 and not steps[0][0], "the first steps must overflow and be skipped"
    assert all(gc_steps == 0 for changed, gc_steps in steps if not changed), steps
    assert steps[-1] == (True, 1), steps


def test_accumulation_centralizes_the_accumulated_gradient_once():
    model = models.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = dist_gc.attach(opt, model=model)
    batch = models.make_batch()
    want = oracle_step(model, lambda m: models.loss_on(m, batch), models.GCTestNet.OUTPUT_DIMS, "channel")
    for k in range(2):  # two equal micro-batches: the mean of their mean losses is the batch mean
        (models.loss_on(model, models.local_slice(batch, k, 2)) / 2).backward()
    opt.step()
    assert handle.steps == 1
    for n, p in model.named_parameters():
        assert float((p.detach().double() - want[n]).abs().max()) <= 1e-5, n


def test_resume_is_bit_exact_including_the_gc_step():
    def run(steps: int, state: bytes | None = None):
        model = models.make_model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        handle = dist_gc.attach(opt, model=model)
        if state is not None:
            saved = torch.load(io.BytesIO(state), weights_only=False)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
        batch = models.make_batch()
        for _ in range(steps):
            opt.zero_grad()
            models.loss_on(model, batch).backward()
            opt.step()
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        return model, handle, buf.getvalue()

    straight, h_straight, _ = run(4)
    _, _, half = run(2)
    resumed, h_resumed, _ = run(2, half)
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{n} differs after resume"
    assert h_straight.stats.step == h_resumed.stats.step == 4


def test_no_memory_growth_over_a_long_run():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    dist_gc.attach(opt, model=model, config={"full_stats": True})
    x = torch.randn(8, 16)
    baseline = None
    for step in range(3000):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        if step == 500:
            baseline = _rss_mb()
    growth = _rss_mb() - baseline
    assert growth < 8, f"RSS grew by {growth:.1f} MB over 2500 steps"
