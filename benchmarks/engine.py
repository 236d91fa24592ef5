"""Engine throughput: dist_gc vs the per-tensor loop peers use vs a plain copy of the
same bytes, on a Llama-style gradient set, for full tensors and 1-D ZeRO-style shards.

Every figure is a ratio of medians measured side by side in one run, with the
variants alternated inside each repetition so machine noise hits all of them alike.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

from dist_gc.core.centralize import geometry_of
from dist_gc.engine.engine import GCEngine
from dist_gc.engine.layout import plan_flat_shard, plan_whole


def llama_shapes(vocab: int, hidden: int, inter: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"layers.{i}."
        shapes += [(p + n, (hidden, hidden)) for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")]
        shapes += [(p + "gate_proj.weight", (inter, hidden)), (p + "up_proj.weight", (inter, hidden)), (p + "down_proj.weight", (hidden, inter))]
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    shapes.append(("norm.weight", (hidden,)))
    return shapes


PRESETS = {
    # ~97M parameters, 47 tensors: fits a 2-core CPU run.
    "cpu": dict(vocab=32000, hidden=1024, inter=2816, layers=5),
    # ~1.2B parameters, 290 tensors.
    "gpu": dict(vocab=32000, hidden=2048, inter=5632, layers=32),
    # Many small tensors: 1,051 >= 2-D tensors of 16K-45K elements (~30M parameters),
    # where per-tensor overheads (CPU calls, GPU launches) dominate.
    "many": dict(vocab=512, hidden=128, inter=352, layers=150),
    # Small, for smoke tests.
    "tiny": dict(vocab=512, hidden=64, inter=176, layers=2),
}


def _time(fn: Callable[[], None], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def measure(variants: dict[str, Callable[[], None]], reps: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds of each variant, alternating variants inside each repetition."""
    for fn in variants.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for k, fn in variants.items():
            samples[k].append(_time(fn, sync))
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_engine(preset: str = "cpu", reps: int = 7, device: str = "cpu", dtype: torch.dtype = torch.float32, shard_world: int = 4) -> list[dict]:
    shapes = llama_shapes(**PRESETS[preset])
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=dev).manual_seed(0)
    grads = [torch.randn(s, generator=gen, device=dev, dtype=torch.float32).to(dtype) for _, s in shapes]
    flat_all = torch.cat([g.reshape(-1) for g in grads])
    copy_dst = torch.empty_like(flat_all)
    rows = []
    for mode in ("channel", "tensor"):
        targets = [(i, n, s) for i, (n, s) in enumerate(shapes) if len(s) >= 2]
        # --- full tensors (single process / DDP)
        plans = [plan_whole(n, geometry_of(s, mode, 0), s, 0 if mode == "channel" else None, source=k) for k, (i, n, s) in enumerate(targets)]
        sources = [lambda g=grads[i]: g for i, _, _ in targets]
        engine = GCEngine(plans, sources)
        gc_bytes = sum(grads[i].numel() * grads[i].element_size() for i, _, _ in targets)
        gc_numel = sum(grads[i].numel() for i, _, _ in targets)

        def per_tensor_loop() -> None:
            for i, _, s in targets:
                g = grads[i]
                if mode == "channel":
                    g.sub_(g.mean(tuple(range(1, g.dim())), keepdim=True))
                else:
                    g.sub_(g.mean())

        src, dst = flat_all[:gc_numel], copy_dst[:gc_numel]
        t = measure({"dist_gc": engine.step, "per_tensor_loop": per_tensor_loop, "copy": lambda: dst.copy_(src)}, reps, sync)
        rows.append(_row("full tensors", mode, dtype, len(targets), gc_bytes, t, preset))
        # --- 1-D shard of rank 1 of `shard_world` (ZeRO-1/2 / FSDP1 concat layout)
        total = sum(math.prod(s) for _, _, s in targets)
        part = math.ceil(total / shard_world)
        rank = 1 if shard_world > 1 else 0
        shard = torch.zeros(part, device=dev, dtype=dtype)
        splans, base, off = [], 0, 0
        for _, n, s in targets:
            numel = math.prod(s)
            ranges = [(min(max(r * part - base, 0), numel), min(max((r + 1) * part - base, 0), numel)) for r in range(shard_world)]
            lo, hi = ranges[rank]
            if hi > lo:
                shard[off : off + hi - lo].copy_(flat_all[base + lo : base + hi])
            # A 1-process group stands in for the shard group: the work measured is the
            # local partial sums and subtraction; the all-reduce is timed by step_overhead.
            splans.append(plan_flat_shard(n, geometry_of(s, mode, 0), ranges=ranges, rank=rank, group=None, source=0, offset=off))
            off += hi - lo
            base += numel
        sengine = GCEngine([_local_only(p) for p in splans], [lambda: shard])
        sdst = torch.empty_like(shard)
        t = measure({"dist_gc": sengine.step, "copy": lambda: sdst.copy_(shard)}, reps, sync)
        rows.append(_row(f"1-D shard (rank {rank}/{shard_world})", mode, dtype, len(targets), shard.numel() * shard.element_size(), t, preset))
    return rows


def _local_only(plan):
    """The same plan without its cross-rank reductions (no process group here)."""
    from dataclasses import replace

    return replace(plan, reductions=(), shard_groups=())


def _row(layout: str, mode: str, dtype: torch.dtype, tensors: int, nbytes: int, t: dict[str, float], preset: str) -> dict:
    row = {
        "set": preset, "layout": layout, "mode": mode, "dtype": str(dtype).replace("torch.", ""), "tensors": tensors, "MB": nbytes / 1e6,
        "dist_gc_ms": t["dist_gc"] * 1e3, "copy_ms": t["copy"] * 1e3,
        "dist_gc_vs_copy": t["dist_gc"] / t["copy"],
        # GC must read the gradient twice and write it once; a copy reads once and
        # writes once, so 1.5x a copy is the bandwidth floor: % of limit = 1.5 / ratio.
        "pct_of_limit": 100 * 1.5 * t["copy"] / t["dist_gc"],
    }
    if "per_tensor_loop" in t:
        row["loop_ms"] = t["per_tensor_loop"] * 1e3
        row["speedup_vs_loop"] = t["per_tensor_loop"] / t["dist_gc"]
    return row
