"""Engine throughput: dist_gc vs the per-tensor loop peers use vs a plain copy of the
same bytes, on a Llama-style gradient set, for full tensors and 1-D ZeRO-style shards.

Every figure is a ratio of medians measured side by side in one run, with the
variants alternated inside each repetition so machine noise hits all of them alike.
With several kernel backends (``kernels``), one engine per backend runs in the same
alternating repetitions.

The loop references (what a user would write, computing in the gradient's dtype):

* full tensors: per tensor ``g.sub_(g.mean(dims, keepdim=True))``;
* 1-D shards: the same on every region view of the shard (whole rows, partial rows,
  whole-tensor runs: the views the engine's plans name, built once outside the timed
  region), each over its own averaged dims. It is not exact GC (a row cut by a shard
  boundary needs the other ranks' sums), only the per-view work a loop would do.

On CUDA, :func:`count_launches` counts the kernels one engine step launches (torch
profiler); :func:`bench_launches` compares the 'many' (1,051 tensors) and 'tiny' sets.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from typing import Callable

import torch

from dist_gc.core.centralize import geometry_of
from dist_gc.engine.engine import GCEngine
from dist_gc.engine.layout import plan_flat_shard, plan_whole

#: Kernel backends ``GCEngine(..., kernel=)`` names; "auto" is the engine's default.
KERNELS = ("auto", "torch", "cpu", "triton")


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


def kernel_supported() -> bool:
    """Whether the installed ``GCEngine`` takes a ``kernel=`` argument."""
    return "kernel" in inspect.signature(GCEngine).parameters


def check_kernels(kernels: list[str]) -> None:
    """Raise ``ValueError`` (a message for the command line) for unknown names, or for a
    non-default backend when the installed engine has no ``kernel=`` option."""
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise ValueError(f"--kernel: unknown backend(s) {unknown}; choose from {', '.join(KERNELS)}")
    if any(k != "auto" for k in kernels) and not kernel_supported():
        raise ValueError(
            f"--kernel {','.join(kernels)}: the installed dist_gc engine does not accept kernel= "
            f"(GCEngine{inspect.signature(GCEngine)}); it comes with the fused-kernel engine. Run with --kernel auto "
            "(the engine's default path) or install a dist_gc that has it"
        )


def make_engine(plans, sources, kernel: str = "auto") -> GCEngine:
    """A ``GCEngine``; ``kernel`` is passed only when it is not the default ("auto"), so
    this runs against engines that predate the option."""
    if kernel == "auto":
        return GCEngine(plans, sources)
    check_kernels([kernel])
    return GCEngine(plans, sources, kernel=kernel)


def _time(fn: Callable[[], None], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def measure(variants: dict[str, Callable[[], None]], reps: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds of each variant, alternating variants inside each repetition."""
    for fn in variants.values():  # warm-up (and JIT compilation of any kernel)
        fn()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for k, fn in variants.items():
            samples[k].append(_time(fn, sync))
    return {k: statistics.median(v) for k, v in samples.items()}


# --------------------------------------------------------------------------- launches
def count_launches(fn: Callable[[], None], warmup: int = 1) -> dict[str, int]:
    """Kernel launches of one call of ``fn`` on CUDA, from the torch profiler:
    ``kernels`` — kernel events on the CUDA activity (memcpy/memset excluded);
    ``launch_calls`` — host-side launch API calls (``cudaLaunchKernel*`` /
    ``cuLaunchKernel*``, the latter being how Triton launches)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):  # JIT compilation, caches, first-step set-up
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = calls = 0
    for e in prof.events():
        kind = getattr(e, "activity_type", None)  # "kernel", "gpu_memcpy", "cuda_runtime", "cuda_driver", "cpu_op", ...
        if isinstance(kind, str) and kind:
            kernels += kind == "kernel"
            calls += kind in ("cuda_runtime", "cuda_driver") and "LaunchKernel" in e.name
        elif e.device_type == torch.autograd.DeviceType.CUDA:  # torch without activity types
            kernels += not e.name.startswith(("Memcpy", "Memset", "gpu_user_annotation"))
        elif "LaunchKernel" in e.name:
            calls += 1
    return {"kernels": kernels, "launch_calls": calls}


# --------------------------------------------------------------------------- sets
class GradSet:
    """A preset's gradients on ``device`` in ``dtype``, flattened once for the copy and
    the shards; ``targets`` are the >= 2-D tensors GC centralizes."""

    def __init__(self, preset: str, device: str, dtype: torch.dtype) -> None:
        self.preset, self.dtype = preset, dtype
        self.dev = torch.device(device)
        self.shapes = llama_shapes(**PRESETS[preset])
        gen = torch.Generator(device=self.dev).manual_seed(0)
        self.grads = [torch.randn(s, generator=gen, device=self.dev, dtype=torch.float32).to(dtype) for _, s in self.shapes]
        self.flat = torch.cat([g.reshape(-1) for g in self.grads])
        self.targets = [(i, n, s) for i, (n, s) in enumerate(self.shapes) if len(s) >= 2]
        self.numel = sum(math.prod(s) for _, _, s in self.targets)

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def full(self, mode: str, kernels: list[str]) -> tuple[dict[str, GCEngine], Callable[[], None], int]:
        """Whole tensors (single process / DDP): an engine per kernel, the per-tensor
        loop, and the bytes GC touches."""
        plans = [plan_whole(n, geometry_of(s, mode, 0), s, 0 if mode == "channel" else None, source=k)
                 for k, (_, n, s) in enumerate(self.targets)]
        sources = [lambda g=self.grads[i]: g for i, _, _ in self.targets]
        engines = {k: make_engine(plans, sources, k) for k in kernels}
        tensors = [self.grads[i] for i, _, _ in self.targets]

        def per_tensor_loop() -> None:
            for g in tensors:
                if mode == "channel":
                    g.sub_(g.mean(tuple(range(1, g.dim())), keepdim=True))
                else:
                    g.sub_(g.mean())

        return engines, per_tensor_loop, sum(g.numel() * g.element_size() for g in tensors)

    def shard(self, mode: str, kernels: list[str], world: int = 4) -> tuple[dict[str, GCEngine], Callable[[], None], torch.Tensor, int]:
        """Rank 1 of ``world``'s 1-D shard of every target concatenated (ZeRO-1/2 /
        FSDP1 layout): an engine per kernel, the per-region loop, the shard, the rank."""
        part = math.ceil(self.numel / world)
        rank = 1 if world > 1 else 0
        shard = torch.zeros(part, device=self.dev, dtype=self.dtype)
        plans, base, off = [], 0, 0
        for _, n, s in self.targets:
            numel = math.prod(s)
            ranges = [(min(max(r * part - base, 0), numel), min(max((r + 1) * part - base, 0), numel)) for r in range(world)]
            lo, hi = ranges[rank]
            if hi > lo:
                shard[off : off + hi - lo].copy_(self.flat[base + lo : base + hi])
            # A 1-process group stands in for the shard group: the work measured is the
            # local partial sums and subtraction; the all-reduce is timed by step_overhead.
            plans.append(_local_only(plan_flat_shard(n, geometry_of(s, mode, 0), ranges=ranges, rank=rank, group=None, source=0, offset=off)))
            off += hi - lo
            base += numel
        engines = {k: make_engine(plans, [lambda: shard], k) for k in kernels}
        return engines, region_loop(plans, shard), shard, rank


def region_loop(plans, source: torch.Tensor) -> Callable[[], None]:
    """The per-tensor loop on a shard's region views: for each region view ``v`` of
    ``source``, ``v.sub_(v.mean(dims, keepdim=True))`` over its averaged dims (size 1 in
    its sums shape), in the view's dtype. Views are built once, here."""
    views = []
    for plan in plans:
        for r in plan.regions:
            v = source if r.shape is None else source.view(-1)[r.start : r.stop].view(r.shape)
            dims = tuple(d for d, size in enumerate(r.sum_shape) if size == 1)
            if dims and v.numel():  # (torch reads dims=() as "all dims": never passed)
                views.append((v, dims))

    def loop() -> None:
        for v, dims in views:
            v.sub_(v.mean(dims, keepdim=True))

    loop.regions = len(views)  # type: ignore[attr-defined]
    return loop


def _local_only(plan):
    """The same plan without its cross-rank reductions (no process group here)."""
    from dataclasses import replace

    return replace(plan, reductions=(), shard_groups=())


# --------------------------------------------------------------------------- benches
def bench_engine(preset: str = "cpu", reps: int = 7, device: str = "cpu", dtype: torch.dtype = torch.float32, shard_world: int = 4,
                 kernels: list[str] | tuple[str, ...] = ("auto",), progress=None) -> list[dict]:
    """Rows of dist_gc (one per kernel), loop and copy times for full tensors and the
    1-D shard, in both modes. ``progress``: optional ``(start(label), done(summary))``."""
    kernels = list(kernels)
    gs = GradSet(preset, device, dtype)
    copy_dst = torch.empty_like(gs.flat)
    rows = []
    for mode in ("channel", "tensor"):
        for layout in ("full", "shard"):
            if layout == "full":
                engines, loop, nbytes = gs.full(mode, kernels)
                src, dst = gs.flat[: gs.numel], copy_dst[: gs.numel]
                name = "full tensors"
            else:
                engines, loop, shard, rank = gs.shard(mode, kernels, shard_world)
                src, dst = shard, copy_dst[: shard.numel()]
                nbytes = shard.numel() * shard.element_size()
                name = f"1-D shard (rank {rank}/{shard_world})"
            label = f"{preset} {_dtype_name(dtype)} {mode} {name}"
            if progress is not None:
                progress[0](f"{label}: dist_gc[{','.join(kernels)}] / loop / copy, {reps} alternating reps")
            variants = {f"dist_gc[{k}]": e.step for k, e in engines.items()}
            variants.update(per_tensor_loop=loop, copy=lambda s=src, d=dst: d.copy_(s))
            t = measure(variants, reps, gs.sync)
            new = [_row(name, mode, dtype, len(gs.targets), nbytes, t, preset, k) for k in kernels]
            rows += new
            if progress is not None:
                progress[1](f"{label}: " + "; ".join(
                    f"dist_gc[{r['kernel']}] {r['dist_gc_ms']:.3g} ms = {r['dist_gc_vs_copy']:.3g}x copy, speedup vs loop {r['speedup_vs_loop']:.3g}x"
                    for r in new) + f" (loop {new[0]['loop_ms']:.3g} ms, copy {new[0]['copy_ms']:.3g} ms)")
    return rows


def bench_launches(device: str, kernels: list[str], sets: tuple[str, ...] = ("many", "tiny"), progress=None) -> dict:
    """Kernel launches per engine step for ``sets`` (and for the per-tensor loop), per
    kernel, layout, mode and dtype. A constant-launch path shows the same count for
    every set. On CPU: ``rows`` is None, with the reason."""
    if not device.startswith("cuda"):
        return {"rows": None, "reason": f"kernel launches are counted on CUDA only (torch profiler, CUDA activity); this run is on {device}"}
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        built = {s: GradSet(s, device, dtype) for s in sets}
        for mode in ("channel", "tensor"):
            for layout in ("full", "shard"):
                label = f"launches {_dtype_name(dtype)} {mode} {layout}"
                if progress is not None:
                    progress[0](f"{label}: profiling one step of each of {','.join(kernels)} and the loop on {', '.join(sets)}")
                per_set = {}
                for s, gs in built.items():
                    engines, loop = gs.full(mode, kernels)[:2] if layout == "full" else gs.shard(mode, kernels)[:2]
                    per_set[s] = (len(gs.targets), {k: count_launches(e.step) for k, e in engines.items()}, count_launches(loop))
                for k in [*kernels, "loop"]:
                    row = {"kernel": k, "layout": layout, "mode": mode, "dtype": _dtype_name(dtype)}
                    for s, (n, eng, lp) in per_set.items():
                        c = lp if k == "loop" else eng[k]
                        row.update({f"{s}_tensors": n, f"{s}_kernels": c["kernels"], f"{s}_launch_calls": c["launch_calls"]})
                    row["constant"] = len({row[f"{s}_kernels"] for s in sets}) == 1
                    out.append(row)
                if progress is not None:
                    progress[1](f"{label}: " + "; ".join(
                        f"{r['kernel']} " + "/".join(str(r[f'{s}_kernels']) for s in sets) for r in out[-len(kernels) - 1:])
                        + f" kernels ({'/'.join(sets)})")
    return {"rows": out, "reason": None, "sets": list(sets)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _row(layout: str, mode: str, dtype: torch.dtype, tensors: int, nbytes: int, t: dict[str, float], preset: str, kernel: str) -> dict:
    gc = t[f"dist_gc[{kernel}]"]
    return {
        "set": preset, "layout": layout, "mode": mode, "dtype": _dtype_name(dtype), "kernel": kernel, "tensors": tensors, "MB": nbytes / 1e6,
        "dist_gc_ms": gc * 1e3, "copy_ms": t["copy"] * 1e3, "loop_ms": t["per_tensor_loop"] * 1e3,
        "dist_gc_vs_copy": gc / t["copy"],
        # GC must read the gradient twice and write it once; a copy reads once and
        # writes once, so 1.5x a copy is the bandwidth floor: % of limit = 1.5 / ratio.
        "pct_of_limit": 100 * 1.5 * t["copy"] / gc,
        "loop_vs_copy": t["per_tensor_loop"] / t["copy"],
        "speedup_vs_loop": t["per_tensor_loop"] / gc,
    }
