"""Training-step overhead of GC and its extra communication, per engine, at W = 2.

Each rank alternates steps with GC on and off (GC is detached and re-attached between
them, outside the timed region), so both see the same machine state; the figure is
the ratio of the medians. Communication is counted from ``handle.stats`` (bytes and
collectives GC issued) against the gradient bytes the engine itself reduces.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dist_gc  # noqa: E402


class RefModel(nn.Module):
    """A Llama-shaped stack (embedding, q/k/v/o and gate/up/down linears, RMSNorms,
    an untied head) without attention mixing, ~5M parameters."""

    def __init__(self, vocab: int = 2048, hidden: int = 256, inter: int = 704, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            blk = nn.Module()
            for n in ("q", "k", "v", "o"):
                setattr(blk, n, nn.Linear(hidden, hidden, bias=False))
            blk.gate, blk.up = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
            blk.down = nn.Linear(inter, hidden, bias=False)
            blk.n1, blk.n2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
            self.layers.append(blk)
        self.norm = nn.RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for b in self.layers:
            h = b.n1(x)
            x = x + b.o(b.v(h) * torch.sigmoid(b.q(h) * b.k(h)))
            h = b.n2(x)
            x = x + b.down(F.silu(b.gate(h)) * b.up(h))
        return self.head(self.norm(x))


def _ddp(model):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    return ddp, opt, lambda cfg: dist_gc.attach(opt, model=ddp, config=cfg), opt.step


def _fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    for blk in model.layers:
        fully_shard(blk)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    return model, opt, lambda cfg: dist_gc.attach(opt, model=model, config=cfg), opt.step


def _zero(stage):
    def build(model):
        import deepspeed

        cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3), config=cfg)
        return engine, opt, lambda c: dist_gc.attach(engine, config=c), engine.step

    return build


ENGINES = {"DDP": _ddp, "FSDP2": _fsdp2, "ZeRO-2": _zero(2), "ZeRO-3": _zero(3)}


def overhead_worker(rank: int, world: int, engine_name: str, tokens: int, reps: int) -> dict:
    torch.manual_seed(0)
    model = RefModel()
    numel = sum(p.numel() for p in model.parameters())
    wrapped, opt, attach, step = ENGINES[engine_name](model)
    g = torch.Generator().manual_seed(rank)
    batch = torch.randint(0, 2048, (1, tokens), generator=g)

    def train_step() -> float:
        dist.barrier()
        t0 = time.perf_counter()
        logits = wrapped(batch)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), batch.view(-1))
        if hasattr(wrapped, "backward"):
            wrapped.backward(loss)
        else:
            loss.backward()
        step()
        if hasattr(opt, "zero_grad"):
            opt.zero_grad(set_to_none=True)
        dist.barrier()
        return time.perf_counter() - t0

    on, off, gc_seconds, stats = [], [], [], None
    handle = attach(dist_gc.GCConfig())
    for i in range(reps + 1):
        t_on = train_step()
        stats = handle.stats
        handle.remove()
        t_off = train_step()
        handle = attach(dist_gc.GCConfig())
        if i:  # the first pair is warm-up
            on.append(t_on)
            off.append(t_off)
            gc_seconds.append(stats.seconds)
    return {
        "engine": engine_name, "world": world, "params": numel, "tokens_per_rank": tokens,
        "step_on_ms": statistics.median(on) * 1e3, "step_off_ms": statistics.median(off) * 1e3,
        "overhead_pct": 100 * (statistics.median(on) / statistics.median(off) - 1),
        "gc_pct_of_step": 100 * statistics.median(gc_seconds) / statistics.median(off),
        "gc_bytes_per_step": stats.bytes_communicated, "gc_collectives_per_step": stats.collectives,
        # Gradient payload the engine itself reduces per step (all-reduce or
        # reduce-scatter of every fp32 gradient element).
        "engine_grad_bytes_per_step": numel * 4,
        "gc_bytes_fraction": stats.bytes_communicated / (numel * 4),
    }
