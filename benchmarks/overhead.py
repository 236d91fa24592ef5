"""Training-step overhead of GC and its extra communication, per engine.

Each rank alternates steps with GC on and off (GC is detached and re-attached between
them, outside the timed region), so both see the same machine state; the figure is
the ratio of the medians. Communication is counted from ``handle.stats`` (bytes and
collectives GC issued) against the gradient bytes the engine itself reduces.

CPU: W = 2 over gloo, the 4.3M-parameter reference model. CUDA: by default W = 1 over
NCCL (one GPU cannot host two NCCL ranks) and a larger model (``MODELS["gpu"]``); the
step is synchronized before its end time is taken, and a global optimizer step
pre-hook synchronizes before every optimizer step (GC on and off alike) so that GC's
own time (``handle.stats.seconds``) does not include backward kernels still queued.
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


class Block(nn.Module):
    """q/k/v/o and gate/up/down linears with RMSNorms (attention mixing left out: the
    gradient set, not the model quality, is what the benchmark needs)."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)
        self.n1, self.n2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.n1(x)
        x = x + self.o(self.v(h) * torch.sigmoid(self.q(h) * self.k(h)))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class RefModel(nn.Module):
    """A Llama-shaped stack (embedding, blocks, final RMSNorm, untied head), ~4.3M
    parameters."""

    def __init__(self, vocab: int = 2048, hidden: int = 256, inter: int = 704, layers: int = 4) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden, inter) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x)
        return self.head(self.norm(x))


#: Model sizes: "ref" ~4.3M parameters (CPU); "gpu" ~166M (vocab 32000, hidden 1024, 8 blocks).
MODELS = {"ref": dict(vocab=2048, hidden=256, inter=704, layers=4), "gpu": dict(vocab=32000, hidden=1024, inter=2816, layers=8)}


def _ddp(model, device):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    return ddp, opt, lambda cfg: dist_gc.attach(opt, model=ddp, config=cfg), opt.step


def _fsdp2(model, device):
    from torch.distributed.fsdp import fully_shard

    for blk in model.layers:
        fully_shard(blk)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    return model, opt, lambda cfg: dist_gc.attach(opt, model=model, config=cfg), opt.step


def _zero(stage):
    def build(model, device):
        import deepspeed

        # Joins the harness' process group (gloo, or NCCL for a W=1 CUDA run).
        deepspeed.init_distributed(dist_backend=str(dist.get_backend()))
        cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
               "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3), config=cfg)
        return engine, opt, lambda c: dist_gc.attach(engine, config=c), engine.step

    return build


class CollectiveCounter:
    """Counts the collectives issued through ``torch.distributed``'s Python API (and the
    bytes of their tensors) while active — independent of dist_gc's own stats. The
    engines' internal traffic that bypasses Python (DDP's C++ reducer) is not seen; the
    difference between a GC-on and a GC-off step is GC's extra traffic."""

    NAMES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "reduce_scatter", "all_gather", "broadcast", "reduce")

    def __init__(self) -> None:
        self.calls = self.bytes = 0
        self._saved: dict = {}

    def __enter__(self) -> "CollectiveCounter":
        for name in self.NAMES:
            fn = getattr(dist, name)
            self._saved[name] = fn

            def counted(*args, _fn=fn, **kwargs):
                self.calls += 1
                t = args[0] if args and isinstance(args[0], torch.Tensor) else None
                self.bytes += 0 if t is None else t.numel() * t.element_size()
                return _fn(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


ENGINES = {"DDP": _ddp, "FSDP2": _fsdp2, "ZeRO-2": _zero(2), "ZeRO-3": _zero(3)}


def overhead_worker(rank: int, world: int, engine_name: str, tokens: int, reps: int, device: str = "cpu", model_size: str = "ref") -> dict:
    dev = torch.device(device)
    sync_hook = None
    if dev.type == "cuda":
        # Every rank on the one GPU (a W=2 run shares it over gloo); DeepSpeed places
        # its engine by LOCAL_RANK.
        dev = torch.device("cuda", 0)
        torch.cuda.set_device(dev)
        os.environ["LOCAL_RANK"] = "0"
        # TF32 on, as most GPU training runs: faster steps make GC's share larger, not smaller.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        # Runs before every optimizer's own pre-hooks (GC's among them), GC on and off.
        sync_hook = torch.optim.optimizer.register_optimizer_step_pre_hook(lambda *_: torch.cuda.synchronize())
    torch.manual_seed(0)
    model = RefModel(**MODELS[model_size]).to(dev)
    numel = sum(p.numel() for p in model.parameters())
    wrapped, opt, attach, step = ENGINES[engine_name](model, dev)
    g = torch.Generator().manual_seed(rank)
    batch = torch.randint(0, model.vocab, (1, tokens), generator=g).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def train_step(counter: CollectiveCounter | None = None) -> float:
        dist.barrier()
        if counter is not None:
            with counter:
                return run_step()
        return run_step()

    def run_step() -> float:
        sync()
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
        sync()
        dist.barrier()
        return time.perf_counter() - t0

    on, off, gc_seconds, stats = [], [], [], None
    count_on, count_off = CollectiveCounter(), CollectiveCounter()
    handle = attach(dist_gc.GCConfig())
    for i in range(reps + 1):
        # The last pair also counts collectives (outside the timed steps).
        t_on = train_step(count_on if i == reps else None)
        stats = handle.stats
        handle.remove()
        t_off = train_step(count_off if i == reps else None)
        handle = attach(dist_gc.GCConfig())
        if i:  # the first pair is warm-up
            on.append(t_on)
            off.append(t_off)
            gc_seconds.append(stats.seconds)
    if sync_hook is not None:
        sync_hook.remove()
    return {
        "engine": engine_name, "world": world, "device": str(dev), "backend": str(dist.get_backend()), "params": numel, "tokens_per_rank": tokens,
        "step_on_ms": statistics.median(on) * 1e3, "step_off_ms": statistics.median(off) * 1e3,
        "overhead_pct": 100 * (statistics.median(on) / statistics.median(off) - 1),
        "gc_pct_of_step": 100 * statistics.median(gc_seconds) / statistics.median(off),
        "gc_bytes_per_step": stats.bytes_communicated, "gc_collectives_per_step": stats.collectives,
        # Counted at the torch.distributed API: GC-on step minus GC-off step.
        "counted_extra_collectives": count_on.calls - count_off.calls,
        "counted_extra_bytes": count_on.bytes - count_off.bytes,
        # Gradient payload the engine itself reduces per step (all-reduce or
        # reduce-scatter of every fp32 gradient element).
        "engine_grad_bytes_per_step": numel * 4,
        "gc_bytes_fraction": stats.bytes_communicated / (numel * 4),
    }
